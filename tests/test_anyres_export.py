"""AnyRes exports: `anyres` → LlavaNextForConditionalGeneration, `anyres_max_N` → LlavaOnevisionForConditionalGeneration,
each with its processor, `--verify` parity on a tiled and a two-image sample, and transformers' own `generate`
answering from the folder as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ANYRES_OVERRIDES, SmallData


def prepared_run(small_data: SmallData, run_dir: Path, aspect: str, merge: str = "spatial_unpad", seed: int = 0) -> Path:
    """A tiny AnyRes run directory with its base weights (image_newline included): what an export reads."""
    from vdep.config import load_config
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    overrides = [*small_data.overrides(run_dir), *ANYRES_OVERRIDES, f"model.image_aspect_ratio={aspect}",
                 f"model.mm_patch_merge_type={merge}", f"model.init_seed={seed}"]
    prepare_run_dir(load_config("demo-tiny", overrides), RunDir(run_dir))
    return run_dir


@pytest.mark.parametrize("aspect, model_type", [("anyres", "llava_next"), ("anyres_max_2", "llava_onevision")])
def test_anyres_exports_to_its_class_with_parity_on_tiled_and_two_image_samples(small_data, tmp_path, aspect, model_type):
    from vdep.export.hf import export_hf
    from vdep.export.verify import verify_export

    run_dir = prepared_run(small_data, tmp_path / "run", aspect)
    result = export_hf(run_dir, tmp_path / "hf", dtype="fp32")
    report = verify_export(result)
    assert report.passed, report.summary()
    assert [p.name for p in report.probes] == ["one tiled image", "two images",
                                               *(["a video"] if model_type == "llava_onevision" else [])]
    assert all(p.greedy_equal and len(p.vdep_tokens) > 0 for p in report.probes)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["image_grid_pinpoints"] == [[64, 64], [64, 128], [128, 64], [128, 128]]
    if model_type == "llava_onevision":
        assert config["vision_aspect_ratio"] == "anyres_max_2"
    names = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "image_newline" in names
    processor = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert processor["processor_class"] == {"llava_next": "LlavaNextProcessor", "llava_onevision": "LlavaOnevisionProcessor"}[model_type]
    assert processor["image_processor"]["image_grid_pinpoints"] == config["image_grid_pinpoints"]
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["processor_class"] == processor["processor_class"]  # transformers' own class name


GENERATE = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from vdep.export.processors import load_processor
folder, first, second = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder)
processor = load_processor(__import__("pathlib").Path(folder), model.config.model_type)
images = [Image.open(first).convert("RGB"), Image.open(second).convert("RGB")]
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is red?"}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
batch = [images] if model.config.model_type == "llava_onevision" else images
inputs = processor(images=batch, text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
print(json.dumps({"class": type(model).__name__, "new": output[0, inputs["input_ids"].shape[1]:].tolist(),
                  "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum())}))
"""


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_2"])
def test_transformers_generate_answers_from_an_anyres_export(small_data, tmp_path, aspect):
    """A fresh process with transformers alone (and vdep's processor loader, which only works around
    transformers' torchvision check for OneVision) generates from the export; its new tokens are vdep's greedy
    answer to the same two images and question, and its image tokens the ones training counts."""
    from PIL import Image

    from vdep.data.anyres import MediaProcessor, layout_tensor
    from vdep.data.conversation import Turn
    from vdep.data.images import normalise_pixels
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.evaluate import load_trained_model
    from vdep.export.hf import export_hf
    from vdep.model.generate import greedy_generate

    run_dir = prepared_run(small_data, tmp_path / "run", aspect)
    export_hf(run_dir, tmp_path / "hf", dtype="fp32")
    pictures = sorted((small_data.raw / "images").glob("*.png"))[:2]
    result = subprocess.run([sys.executable, "-c", GENERATE, str(tmp_path / "hf"), *map(str, pictures)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["class"] == ("LlavaNextForConditionalGeneration" if aspect == "anyres"
                               else "LlavaOnevisionForConditionalGeneration")
    trained = load_trained_model(run_dir, allow_base=True)
    images = [Image.open(p).convert("RGB") for p in pictures]
    views = MediaProcessor(trained.spec.geometry, trained.image_processing)(images)
    template = make_template(trained.template, trained.tokenizer)
    encoder = TemplateTokenizer(trained.tokenizer, trained.spec.image_token_id, trained.spec.num_image_tokens)
    ids = encoder.encode(template.prompt_segments([Turn("user", "<image>\n<image>\nWhich is red?")], has_image=True),
                         [i.tokens for i in views.images]).input_ids
    ours = greedy_generate(trained.model, [ids], normalise_pixels(views.pixels, trained.image_processing.normalisation_table()),
                           2, 6, template.stop_token_ids, trained.tokenizer.pad_token_id,
                           image_layout=layout_tensor(views.images))[0]
    assert answer["image_tokens"] == sum(i.tokens for i in views.images)
    assert answer["new"][: len(ours)] == ours and len(ours) > 0


def test_a_flat_anyres_model_is_refused_with_the_reason(small_data, tmp_path):
    from vdep.errors import CheckpointError
    from vdep.export.hf import export_hf

    run_dir = prepared_run(small_data, tmp_path / "run", "anyres", merge="flat")
    with pytest.raises(CheckpointError, match="mm_patch_merge_type=flat.*spatial_unpad"):
        export_hf(run_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def imported_run(small_data: SmallData, folder: Path, run_dir: Path, aspect: str) -> list[str]:
    return [*small_data.overrides(run_dir), *ANYRES_OVERRIDES, f"model.image_aspect_ratio={aspect}",
            f"model.init_from={folder}", "model.vision_tower.tiny=null", "model.language_model.tiny=null",
            "model.tokenizer=null"]


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_2"])
def test_llava_next_and_onevision_folders_import_and_export_again_exactly(small_data, tmp_path, aspect):
    """model.init_from splits a LlavaNext/LlavaOnevision folder into base weights, image_newline included:
    export → import → export gives back every tensor, the config and the processor."""
    from tests.conftest import exported_tensors
    from vdep.config import load_config
    from vdep.export.hf import export_hf
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    # Another seed than the imported run's: its image_newline is the folder's only if the import carries it over.
    run_dir = prepared_run(small_data, tmp_path / "run", aspect, seed=5)
    first = export_hf(run_dir, tmp_path / "first", dtype="fp32").out
    imported = tmp_path / "imported"
    prepare_run_dir(load_config("demo-tiny", imported_run(small_data, first, imported, aspect)), RunDir(imported))
    second = export_hf(imported, tmp_path / "second", dtype="fp32").out
    a, b = exported_tensors(first), exported_tensors(second)
    assert "image_newline" in a and a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    config_a, config_b = (json.loads((folder / "config.json").read_text()) for folder in (first, second))
    for key in ("model_type", "text_config", "vision_config", "image_grid_pinpoints", "image_token_index"):
        assert config_a[key] == config_b[key], key
    assert (json.loads((first / "processor_config.json").read_text())
            == json.loads((second / "processor_config.json").read_text()))


def test_a_tiling_folder_imported_into_a_run_that_does_not_tile_is_refused(small_data, tmp_path):
    """Its trained image_newline would be dropped: the error says which settings to give the run."""
    from vdep.config import load_config
    from vdep.errors import ConfigError
    from vdep.export.hf import export_hf
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    first = export_hf(prepared_run(small_data, tmp_path / "run", "anyres"), tmp_path / "first", dtype="fp32").out
    overrides = [*imported_run(small_data, first, tmp_path / "imported", "anyres"), "model.image_aspect_ratio=pad",
                 "model.image_grid_pinpoints=null", "model.mm_patch_merge_type=flat"]
    with pytest.raises(ConfigError, match="holds a trained image_newline.*set model.image_aspect_ratio=anyres"):
        prepare_run_dir(load_config("demo-tiny", overrides), RunDir(tmp_path / "imported"))


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_2"])
def test_vdep_eval_answers_multi_image_records_alike_through_vdep_and_through_the_export(small_data, tmp_path, aspect):
    """LLaVA records with an image list (and a single image, and none) in one batch: vdep's own model on the run
    directory and transformers' generate on its export give the same answers (videos: tests/test_video_export.py)."""
    from tests.helpers import write_multi_image_inputs
    from vdep.eval.questions import load_questions
    from vdep.eval.run import evaluate
    from vdep.export.hf import export_hf

    run_dir = prepared_run(small_data, tmp_path / "run", aspect)
    exported = export_hf(run_dir, tmp_path / "hf", dtype="fp32").out
    data, images = write_multi_image_inputs(tmp_path / "questions")
    questions = load_questions(data, images)
    questions.questions = [q for q in questions.questions if q.video is None]
    assert sorted(len(q.images) for q in questions.questions) == [0, 1, 1, 2]
    on_run = evaluate(run_dir, questions, batch_size=4, max_new_tokens=6)
    on_export = evaluate(exported, questions, batch_size=4, max_new_tokens=6)
    assert on_export.model.startswith("transformers Llava" + ("Next" if aspect == "anyres" else "Onevision"))
    answers = [a["answer"] for a in on_run.answers]
    assert [a["answer"] for a in on_export.answers] == answers and any(answers)


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_2"])
def test_a_zero3_run_with_tiled_multi_image_and_video_samples_exports_with_verify_passed(
        small_data, anyres_shards, tmp_path, aspect):
    """issue 25's "done when": 2 ranks, ZeRO-3, VDEP on, tiled, multi-image and video samples; `vdep export-hf
    --verify` (bf16, the default) of the final weights and of a mid-run DeepSpeed checkpoint passes, and the export
    holds the trained image_newline."""
    from safetensors.torch import load_file

    from tests.conftest import anyres_overrides, exported_tensors
    from vdep.train.launch import launch_local

    run_dir = tmp_path / "run"
    argv = ["train", "demo-tiny", *anyres_overrides(small_data, anyres_shards, run_dir, aspect), "stage=finetune",
            "stages.finetune.init_from=none", "stages.finetune.zero=zero3", "stages.finetune.max_steps=4",
            "stages.finetune.save_every=2", "stages.finetune.global_batch_size=4", "stages.finetune.micro_batch_size=2",
            "vdep.mode_ratio=0.5"]
    assert launch_local(2, argv) == 0
    for name, path in (("final", run_dir), ("checkpoint", run_dir / "finetune" / "checkpoints" / "step_00000002")):
        out = tmp_path / f"hf-{name}"
        result = subprocess.run([sys.executable, "-m", "vdep", "export-hf", "--checkpoint", str(path), "--out", str(out),
                                 "--verify"], check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "parity: PASSED" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
        # the tiled and the two-image probes, and for OneVision the video probe
        assert result.stdout.count("max |logit difference|") == (3 if aspect == "anyres_max_2" else 2)
    final = load_file(str(run_dir / "finetune" / "final" / "trainable.safetensors"))["image_newline"]
    assert torch.equal(exported_tensors(tmp_path / "hf-final")["image_newline"], final.to(torch.bfloat16))


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_an_anyres_lora_stage_exports_merged_with_parity_and_refuses_the_adapter_form(small_data, anyres_shards, tmp_path):
    """The LoRA stage trains image_newline with the projector: merged, the export holds it and passes --verify;
    a PEFT adapter folder could not carry that parameter, so --adapter is refused with the reason."""
    from tests.conftest import anyres_overrides
    from vdep.errors import CheckpointError
    from vdep.export.hf import export_hf
    from vdep.export.verify import verify_export
    from vdep.train.launch import launch_local

    run_dir = tmp_path / "run"
    argv = ["train", "demo-tiny", *anyres_overrides(small_data, anyres_shards, run_dir), "stage=finetune",
            "stages.finetune.init_from=none", "stages.finetune.zero=zero3", "stages.finetune.max_steps=2",
            "stages.finetune.global_batch_size=4", "stages.finetune.micro_batch_size=2",
            "stages.finetune.lora={r: 4, alpha: 8}"]
    assert launch_local(2, argv) == 0
    with pytest.raises(CheckpointError, match="image_newline.*without --adapter"):
        export_hf(run_dir, tmp_path / "adapter", dtype="fp32", adapter=True)
    report = verify_export(export_hf(run_dir, tmp_path / "merged", dtype="fp32"))
    assert report.passed, report.summary()


def test_attention_map_names_an_anyres_export_instead_of_loading_it_as_a_llava(small_data, tmp_path, capsys):
    from vdep.cli import main
    from vdep.export.hf import export_hf

    run_dir = prepared_run(small_data, tmp_path / "run", "anyres")
    exported = export_hf(run_dir, tmp_path / "hf", dtype="fp32").out
    image = next((small_data.raw / "images").glob("*.png"))
    code = main(["attention-map", "--model", str(run_dir), "--compare", str(exported), "--image", str(image),
                 "--question", "What color?", "--out", str(tmp_path / "maps" / "fig.png")])
    error = capsys.readouterr().err
    assert code == 2 and "is a llava_next export" in error and "pass the run directory" in error, error
