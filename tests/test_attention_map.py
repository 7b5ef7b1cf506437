"""`vdep attention-map`: its values are softmax(QKᵀ/√d) of the layer's own projections, the same for a run
directory and its export; the figure and the arrays are written."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdep.attention_map import patch_coverage
from vdep.config import load_config
from vdep.conventions import IMAGE_MARKER
from vdep.data.conversation import Turn
from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing, image_pixels, preprocess_image
from vdep.data.templates import TemplateTokenizer, make_template
from vdep.demo_data import COLOURS, POSITIONS, Scene, draw_scene, object_mask
from vdep.errors import VdepError
from vdep.evaluate import load_trained_model
from vdep.export.hf import export_hf
from vdep.rundir import RunDir
from vdep.train.prepare import prepare_run_dir

pytest.importorskip("matplotlib", reason="the figure needs matplotlib (pip install 'vdep[viz]')")

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def untrained_run(small_data, tmp_path_factory) -> Path:
    """A prepared run directory of the tiny model (random weights, no stage trained), made without training."""
    run_dir = tmp_path_factory.mktemp("attention") / "run"
    prepare_run_dir(load_config("demo-tiny", small_data.overrides(run_dir)), RunDir(run_dir))
    return run_dir


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def direct_attention(run_dir: Path, image, question: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heads, T, T) softmax(QKᵀ/√d) with a causal mask, from the layer's input, norm, q/k projections and
    rotary embedding, computed here step by step; and the image and question positions."""
    trained = load_trained_model(run_dir, allow_base=True)  # sdpa: no attention weights from transformers
    spec, tokenizer = trained.spec, trained.tokenizer
    encoder = TemplateTokenizer(tokenizer, spec.image_token_id, spec.num_image_tokens)
    template = make_template(trained.template, tokenizer)
    ids = encoder.encode(template.prompt_segments([Turn("user", f"{IMAGE_MARKER}\n{question}")], True)).input_ids
    input_ids = torch.tensor([ids])
    lm = trained.model.language_model
    with torch.no_grad():
        embeds = trained.model.embed(input_ids, preprocess_image(image, trained.image_processing).unsqueeze(0), 1)
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states[layer]
        block = lm.layers[layer]
        x = block.input_layernorm(hidden)
        config = lm.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        dim = config.hidden_size // heads
        length = input_ids.shape[1]
        q = block.self_attn.q_proj(x).view(1, length, heads, dim).transpose(1, 2)
        k = block.self_attn.k_proj(x).view(1, length, kv_heads, dim).transpose(1, 2)
        position = torch.arange(length, dtype=torch.float64)
        inverse = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.cat([position[:, None] * inverse[None]] * 2, dim=-1)
        cos, sin = angles.cos().float(), angles.sin().float()
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2))[0] / math.sqrt(dim)
        scores = scores.masked_fill(torch.triu(torch.ones(length, length, dtype=torch.bool), 1), float("-inf"))
        weights = scores.softmax(dim=-1)
    image_positions = torch.nonzero(input_ids[0] == spec.image_token_id).flatten()
    question_positions = torch.arange(int(image_positions.max()) + 1, length)
    return weights, image_positions, question_positions


def test_attention_maps_are_the_layers_softmax_and_agree_with_the_export(untrained_run, small_data, tmp_path):
    from PIL import Image

    from vdep.cli import main

    exported = export_hf(untrained_run, tmp_path / "hf", dtype="fp32").out
    image_path = next((small_data.raw / "images").glob("eval_*"))
    out = tmp_path / "maps" / "fig.png"
    assert main(["attention-map", "--model", str(untrained_run), "--compare", str(exported), "--image", str(image_path),
                 "--question", QUESTION, "--out", str(out), "--layers", "0,1", "--heads", "mean"]) == 0
    arrays = np.load(out.with_suffix(".npz"))
    maps = arrays["maps"]
    assert maps.shape == (2, 2, 4, 4)  # models, layers, the 4x4 patch grid of the tiny tower (32 px / 8 px)
    assert list(arrays["layers"]) == [0, 1]
    image = Image.open(image_path).convert("RGB")
    for layer in (0, 1):
        weights, image_positions, questions = direct_attention(untrained_run, image, QUESTION, layer)
        expected = weights[:, questions][:, :, image_positions].mean(dim=0).mean(dim=0).reshape(4, 4)
        np.testing.assert_allclose(maps[0, layer], expected.numpy(), rtol=1e-4, atol=1e-6)
        assert arrays["image_share"][0, layer] == pytest.approx(float(expected.sum()), rel=1e-4)
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-4, atol=1e-6)  # the export: the same weights
    assert not np.allclose(maps[0, 0], maps[0, 0].mean())  # a map, not a constant
    figure = Image.open(out)
    assert min(figure.size) > 300  # two rows of two cells, at 120 dpi


def test_heads_max_and_answer_tokens_and_bad_layers(untrained_run, small_data, tmp_path):
    from vdep.attention_map import AttentionRequest, compute_maps
    from vdep.errors import VdepError

    image = next((small_data.raw / "images").glob("eval_*"))
    mean, _ = compute_maps(AttentionRequest([untrained_run], image, QUESTION, [1], "mean"))
    peak, _ = compute_maps(AttentionRequest([untrained_run], image, QUESTION, [1], "max"))
    assert (peak[0].maps >= mean[0].maps - 1e-7).all() and (peak[0].maps > mean[0].maps + 1e-6).any()
    answer, _ = compute_maps(AttentionRequest([untrained_run], image, QUESTION, [0], source="answer", max_new_tokens=3))
    assert answer[0].answer and answer[0].maps.shape == (1, 4, 4)
    with pytest.raises(VdepError, match="has 2 layers"):
        compute_maps(AttentionRequest([untrained_run], image, QUESTION, [5]))


def test_patch_coverage_is_each_patchs_share_of_region_pixels():
    rng = np.random.default_rng(0)
    mask = rng.random((12, 12)) < 0.3
    coverage = patch_coverage(mask, 4)
    direct = [[mask[3 * y: 3 * y + 3, 3 * x: 3 * x + 3].mean() for x in range(4)] for y in range(4)]
    np.testing.assert_allclose(coverage, direct)
    with pytest.raises(VdepError, match="does not split into a 5x5 patch grid"):
        patch_coverage(mask, 5)


@pytest.mark.parametrize("shape, fill", [("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)])
def test_the_demo_object_mask_finds_the_shape_in_its_quadrant(shape, fill):
    """The attention-on-object benchmark's region: the painted shape, not the noise or the padding."""
    rng = random.Random(3)
    processing = ImageProcessing(None, (64, 64), None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # the demo tower's
    for colour, position in zip(COLOURS, POSITIONS):
        picture = np.asarray(draw_scene(Scene(colour, shape, position), rng))
        mask = object_mask(picture)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert abs(mask.sum() / box - fill) < 0.12, (colour, position, mask.sum(), box)
        height, width = mask.shape
        assert (ys.min() >= height // 2) == position.startswith("bottom"), position
        assert (xs.min() >= width // 2) == position.endswith("right"), position
        # As the tower sees it (padded to a square with grey, resized): still found, the padding not.
        seen = object_mask(image_pixels(Image.fromarray(picture), processing).permute(1, 2, 0).numpy())
        assert 0.5 < seen.sum() / (mask.sum() * (seen.size / mask.size)) < 1.5


@pytest.mark.parametrize("merge", ["spatial_unpad", "flat"])
def test_a_tiled_image_is_laid_out_whole(small_data, anyres_shards, tmp_path, merge):
    """AnyRes: with spatial_unpad the tiles' tokens (newlines left out) make one grid over the image itself; with
    flat, the tiles' grids side by side over the canvas they were cut from. Cells are the attention to those tokens."""
    from tests.conftest import anyres_overrides
    from vdep.attention_map import load_vdep_attention_model, loaded_vdep_forward, model_maps, reduce_attention

    run_dir = tmp_path / "run"
    prepare_run_dir(load_config("demo-tiny", anyres_overrides(small_data, anyres_shards, run_dir)
                                + [f"model.mm_patch_merge_type={merge}"]), RunDir(run_dir))
    loaded = load_vdep_attention_model(run_dir)
    image = Image.fromarray((np.random.RandomState(0).rand(50, 120, 3) * 255).astype(np.uint8))
    forward = loaded_vdep_forward(loaded, image, QUESTION, 4, want_answer=False)
    maps = model_maps(forward, "run", [0, 1], "mean", "question")
    layout = loaded.trained.spec.geometry.tiled(50, 120)
    values = reduce_attention(forward.attentions[1], forward.question_positions, forward.image_positions, "mean")
    after_base = values[layout.base if merge == "spatial_unpad" else 64:]
    if merge == "spatial_unpad":
        kept = after_base[~layout.newline_mask()[layout.base:]]
        expected = kept.reshape(layout.rows, layout.cols)
        assert forward.picture.shape == (50, 120, 3)  # the image itself: the padding's tokens were removed
    else:
        tiles = after_base.reshape(-1, 8, 8)  # 8×8 tokens a tile; the 50×120 image lies on the 64×128 grid: 1×2 tiles
        expected = torch.cat(list(tiles), dim=1)
        assert forward.picture.shape == (64, 128, 3)
    assert maps.maps.shape[1:] == tuple(expected.shape)
    np.testing.assert_allclose(maps.maps[1], expected.numpy(), rtol=1e-6)
    assert maps.image_share[1] == pytest.approx(float(values.sum()))
