"""The AnyRes recipes (llava-next-vdep, onevision-vdep) build their model and batches as their sources tile.

Each recipe runs with its own image settings (tower image and patch size, aspect mode, grid, merge type,
max_length), with tiny random-init towers and LLMs substituted by overrides, on procedural images whose
sizes pick each grid. The image tokens of its first batches must be what transformers' own processors
count on the source's grid: LLaVA-NeXT's five resolutions, and OneVision's default list (1×1 … 6×6 tiles
of 384 pixels), pinned here rather than read from the recipe, so a recipe with a wrong grid, tile size or
aspect mode fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import build_tiny_model, turns
from vdep.config import load_config
from vdep.data_tools.build_shards import BuildOptions, build_shards
from vdep.rundir import RunDir
from vdep.train.distributed import LaunchEnv
from vdep.train.faults import Faults
from vdep.train.preemption import StopRequest
from vdep.train.setup import RunContext, make_loader

LLAVA_NEXT_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # finetune_clip.sh, [h, w]
# (height, width): each picks another resolution of LLaVA-NeXT's grid; the last fits one tile.
LLAVA_NEXT_SIZES = [(300, 610), (610, 300), (700, 690), (990, 320), (320, 990), (120, 200)]
# OneVision: 1×2 tiles; 3×3 (9: not pooled); 4×4 and 6×6 (pooled to 9 tiles' worth); 1×6; 2×5.
ONEVISION_SIZES = [(380, 760), (1100, 1150), (1500, 1480), (2300, 2290), (380, 2250), (760, 1900)]
FRAMES = 3


def picture(height: int, width: int, seed: int) -> Image.Image:
    """A procedural picture: noise with a bright rectangle, so that resizing has edges to work on."""
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 160).astype(np.uint8)
    pixels[height // 4: height // 2, width // 3: width // 2] = 255
    return Image.fromarray(pixels)


def write_shards(folder: Path, sizes: list[tuple[int, int]], onevision: bool) -> Path:
    """One single-image record per size; for OneVision also a two-image record and a three-frame video."""
    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i, (height, width) in enumerate(sizes):
        picture(height, width, i).save(images / f"s{i}.png")
        records.append({"id": f"single{i}", "image": f"s{i}.png", "conversations": turns("<image>\nWhat is it?", "red")})
    if onevision:
        records.append({"id": "pair", "image": ["s0.png", "s1.png"],
                        "conversations": turns("<image> and <image>: which is wider?", "the first")})
        for f in range(FRAMES):
            picture(240, 320, 100 + f).save(images / f"f{f}.jpg")
        records.append({"id": "video", "video": [f"f{f}.jpg" for f in range(FRAMES)],
                        "conversations": turns("<image> What happens?", "nothing")})
    (folder / "data.json").write_text(json.dumps(records))
    build_shards(BuildOptions([folder / "data.json"], images, folder / "shards", samples_per_shard=4, progress=False))
    return folder / "shards"


def tiny_overrides(recipe: str, tokenizer: Path, shards: Path, run_dir: Path) -> list[str]:
    """The recipe's every stage on `shards`, towers and LLM tiny at the recipe's image and context sizes."""
    config = load_config(recipe, files=False)
    tower, size, llm = ("clip", 336, "llama") if recipe == "llava-next-vdep" else ("siglip", 384, "qwen2")
    overrides = [
        "model.vision_tower.path=null",
        (f"model.vision_tower.tiny={{architecture: {tower}, hidden_size: 32, num_layers: 2, num_heads: 2, "
         f"intermediate_size: 64, image_size: {size}, patch_size: 14}}"),
        "model.language_model.path=null",
        (f"model.language_model.tiny={{architecture: {llm}, hidden_size: 64, num_layers: 2, num_heads: 4, "
         f"num_kv_heads: 2, intermediate_size: 128, max_position_embeddings: {config.data.max_length}}}"),
        f"model.tokenizer={tokenizer}", "model.gradient_checkpointing=false",
        "data.num_workers=0", "data.shuffle_buffer=0", "data.group_by_modality_length=false",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
    ]
    for stage in config.stages:
        overrides += [f"stages.{stage}.shards=[{shards}]", f"stages.{stage}.micro_batch_size=1",
                      f"stages.{stage}.global_batch_size=1"]
    return overrides


def first_batches_image_tokens(recipe: str, overrides: list[str], run_dir: Path) -> dict[str, dict[str, int]]:
    """Per stage, each sample's image placeholder count in the batches the stage's training loader makes,
    with the model built as `vdep train` builds it; the samples the loader skipped, by reason, under "skipped"."""
    from vdep.model.build import load_image_processing
    from vdep.model.tokenizer import prepare_tokenizer

    config = load_config(recipe, overrides)
    tokenizer = prepare_tokenizer(config.model.tokenizer)
    tiny = build_tiny_model(config, tokenizer, run_dir)  # writes the base weights
    run = RunDir(run_dir)
    base = run.base_paths(config.model)
    context = RunContext(config=config, launch=LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "plain"), device=torch.device("cpu"),
                         run=run, tokenizer=tokenizer, base=base,
                         image_processing=load_image_processing(base, config.model.image_aspect_ratio == "pad"),
                         precision="fp32", stop=StopRequest(100), faults=Faults())
    counts = {}
    for name, stage in config.stages.items():
        loader = make_loader(context, stage, tiny.spec, grad_accum_steps=1)
        seen = {"skipped": {}}
        for batch in loader.micro_batches(0):
            (key,) = batch.keys
            seen[key] = int((batch.input_ids == tiny.spec.image_token_id).sum())
            for reason, count in batch.skipped.items():
                seen["skipped"][reason] = seen["skipped"].get(reason, 0) + count
        counts[name] = seen
    return counts


def sample_ids(shards: Path) -> dict[str, str]:
    """Shard key → the record's id."""
    import webdataset as wds

    from vdep.data.shards import discover_shards

    raw = wds.tariterators.tarfile_samples([{"url": s.path} for s in discover_shards([str(shards)])])
    return {s["__key__"]: json.loads(s["json"])["id"] for s in raw}


def test_llava_next_recipe_tiles_on_llava_nexts_grid(small_data, tmp_path):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from vdep.model.tokenizer import prepare_tokenizer

    shards = write_shards(tmp_path / "data", LLAVA_NEXT_SIZES, onevision=False)
    run_dir = tmp_path / "run"
    counts = first_batches_image_tokens("llava-next-vdep", tiny_overrides("llava-next-vdep", small_data.tokenizer, shards,
                                                                          run_dir), run_dir)
    hf = LlavaNextProcessor(
        LlavaNextImageProcessorPil(image_grid_pinpoints=LLAVA_NEXT_GRID, size={"shortest_edge": 336},
                                   crop_size={"height": 336, "width": 336}),
        prepare_tokenizer(small_data.tokenizer), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    expected = dict(zip([f"single{i}" for i in range(len(LLAVA_NEXT_SIZES))],
                        hf._get_num_multimodal_tokens(image_sizes=LLAVA_NEXT_SIZES)["num_image_tokens"]))
    assert len(set(expected.values())) == len(LLAVA_NEXT_SIZES)  # every size picks another grid resolution
    ids = sample_ids(shards)
    assert list(counts) == ["align", "finetune"]
    for stage, seen in counts.items():
        assert seen.pop("skipped") == {}, stage
        assert {ids[key]: tokens for key, tokens in seen.items()} == expected, stage


def test_onevision_recipe_tiles_pools_and_views_as_onevision(qwen2_tokenizer, tmp_path):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from vdep.export.processors import OnevisionProcessor  # transformers' class, buildable without torchvision

    shards = write_shards(tmp_path / "data", ONEVISION_SIZES, onevision=True)
    run_dir = tmp_path / "run"
    tokenizer_folder = Path(qwen2_tokenizer.name_or_path)
    counts = first_batches_image_tokens("onevision-vdep", tiny_overrides("onevision-vdep", tokenizer_folder, shards,
                                                                         run_dir), run_dir)
    # transformers' OneVision defaults: SigLIP's 384-pixel views, the (1x1)…(6x6) grid, anyres_max_9.
    hf = OnevisionProcessor(LlavaOnevisionImageProcessorPil(), qwen2_tokenizer, LlavaOnevisionVideoProcessor(),
                            num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    counted = hf._get_num_multimodal_tokens(image_sizes=ONEVISION_SIZES, video_sizes=[(FRAMES, 240, 320)])
    expected = dict(zip([f"single{i}" for i in range(len(ONEVISION_SIZES))], counted["num_image_tokens"]))
    assert len(set(expected.values())) == len(ONEVISION_SIZES)
    expected["pair"] = 2 * (729 + 1)  # a multi-image sample: one view per image and its newline
    expected["video"] = counted["num_video_tokens"][0]  # frames pooled to 14 × 14, one newline
    ids = sample_ids(shards)
    assert list(counts) == ["align", "knowledge", "single_image", "onevision"]
    for stage, seen in counts.items():
        skipped = seen.pop("skipped")
        if stage == "align":  # plain keeps one <image> marker (LLaVA's captions): the two-image sample is refused
            assert skipped == {"image_marker_mismatch": 1}, skipped
            assert {ids[key]: tokens for key, tokens in seen.items()} == {k: v for k, v in expected.items() if k != "pair"}
        else:
            assert skipped == {}, (stage, skipped)
            assert {ids[key]: tokens for key, tokens in seen.items()} == expected, stage


@pytest.mark.parametrize("recipe", ["llava-next-vdep", "onevision-vdep"])
def test_the_anyres_recipes_state_their_sources_settings(recipe):
    config = load_config(recipe, files=False)
    stages = config.stages
    assert config.model.mm_patch_merge_type == "spatial_unpad" and config.model.vision_tower.feature_layer == -2
    assert stages["align"].trainable == ["projector"] and stages["align"].lr == 1e-3
    assert all(stage.vdep.enabled and stage.vdep.mode_ratio == 0.5 for stage in stages.values())
    if recipe == "llava-next-vdep":
        assert (config.model.image_aspect_ratio, config.model.image_grid_pinpoints) == ("anyres", LLAVA_NEXT_GRID)
        finetune = stages["finetune"]
        assert (finetune.lr, finetune.global_batch_size, config.data.max_length) == (2e-5, 128, 4096)
        assert stages["align"].global_batch_size == 256 and finetune.template == "vicuna_v1"
    else:
        assert (config.model.image_aspect_ratio, config.model.image_grid_pinpoints) == ("anyres_max_9", "(1x1),...,(6x6)")
        assert config.data.max_length == 32768
        for name in ("knowledge", "single_image", "onevision"):
            stage = stages[name]
            assert (stage.lr, stage.global_batch_size, stage.template, stage.zero) == (1e-5, 256, "qwen2", "zero3")
            assert stage.trainable == ["projector", "language_model"]
