"""Hugging Face export and import: real checkpoints from 2-rank ZeRO runs, parity, round trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from tests.conftest import exported_tensors
from vdep.config import load_config
from vdep.data.conversation import Turn
from vdep.data.templates import make_template, render
from vdep.errors import ConfigError
from vdep.export.chat_templates import export_chat_template
from vdep.export.hf import export_hf
from vdep.export.verify import verify_export
from vdep.rundir import ModelSource, RunDir
from vdep.train.base_weights import projector_from_llava_bin
from vdep.train.launch import launch_local


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory):
    """align under ZeRO-2 and finetune under ZeRO-3, each on 2 gloo ranks, with mid-stage checkpoints."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    code = launch_local(2, [
        "train", "demo-tiny", *small_data.overrides(run_dir), "stages.align.zero=zero2", "stages.finetune.zero=zero3",
        "stages.align.max_steps=2", "stages.finetune.max_steps=4", "stages.finetune.save_every=2", "run.keep_last=3",
        "stages.align.vdep.head=linear",  # a VDEP head is trained, and must not be exported
    ])
    assert code == 0
    return run_dir


@pytest.mark.distributed
def test_export_of_a_zero3_run_loads_in_transformers_with_parity(trained_run, tmp_path):
    result = export_hf(trained_run, tmp_path / "hf", dtype="fp32")
    report = verify_export(result)
    assert report.passed, report.summary()
    assert report.max_abs_logit_diff <= 1e-4 and report.vdep_tokens == report.hf_tokens
    names = set(exported_tensors(tmp_path / "hf"))
    assert "language_model.lm_head.weight" in names and "multi_modal_projector.linear_2.weight" in names
    assert any(n.startswith("vision_tower.vision_model.encoder.") for n in names)
    assert any(n.startswith("language_model.model.layers.") for n in names)
    assert not any("vdep_head" in n for n in names)
    config_text = (tmp_path / "hf" / "config.json").read_text()
    assert str(trained_run) not in config_text  # no machine-local paths travel with the export
    config = json.loads(config_text)
    assert config["model_type"] == "llava" and config["image_seq_length"] == 16
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"] and tokenizer.pad_token == "<pad>"
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "vdep 0.1.0" in card and "| finetune | vicuna_v1 |" in card and '"mode_ratio": 0.5' in card


@pytest.mark.distributed
def test_the_inference_snippet_in_the_export_docs_runs_on_an_export(trained_run, small_data, tmp_path):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    snippet = docs.split("The prompt must be built the way the model was trained", 1)[1].split("```python\n", 1)[1]
    snippet = snippet.split("```", 1)[0]
    export_hf(trained_run, tmp_path / "hf", dtype="fp32")
    image = next((small_data.raw / "images").glob("*.png"), None) or next((small_data.raw / "images").glob("*.jpg"))
    code = snippet.replace("exports/llava15-7b-vdep", str(tmp_path / "hf")).replace("example.jpg", str(image))
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("template, tokenizer_fixture", [("llama3", "base_llama3_tokenizer"),
                                                          ("chat_template", "qwen2_tokenizer")])
def test_runs_in_other_chat_formats_export_with_parity(request, small_data, tmp_path, template, tokenizer_fixture):
    """A finetune run with a Llama 3 (base: EOS is not the end of turn) or the tokenizer's own ChatML
    template exports with a chat template that gives the training ids and a generation config that
    stops where training answers stop."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    run_dir = tmp_path / "run"
    code = launch_local(1, [
        "train", "demo-tiny", *small_data.overrides(run_dir), f"model.tokenizer={tokenizer.name_or_path}",
        "stage=finetune", "stages.finetune.init_from=none", f"stages.finetune.template={template}",
        "stages.finetune.max_steps=2",
    ])
    assert code == 0
    result = export_hf(run_dir, tmp_path / "hf", dtype="fp32")
    assert result.template == template and result.source.stages == ["finetune"]  # align never ran
    report = verify_export(result)
    assert report.passed, report.summary()
    stops = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    if template == "llama3":
        assert stops == [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    else:
        assert stops == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.distributed
def test_deepspeed_checkpoints_of_any_stage_export_like_the_final_weights(trained_run, tmp_path):
    final = exported_tensors(export_hf(trained_run, tmp_path / "final", dtype="fp32").out)
    # The last finetune checkpoint (2 ranks, ZeRO-3) holds the same weights as finetune/final.
    from_zero3 = export_hf(trained_run / "finetune" / "checkpoints", tmp_path / "zero3", dtype="fp32")
    assert from_zero3.source.step == 4
    assert all(torch.equal(final[n], t) for n, t in exported_tensors(from_zero3.out).items())
    # A mid-stage checkpoint is a different model; a ZeRO-2 stage result exports on its own too.
    middle = exported_tensors(export_hf(trained_run / "finetune" / "checkpoints" / "step_00000002", tmp_path / "mid", dtype="fp32").out)
    assert not torch.equal(middle["language_model.lm_head.weight"], final["language_model.lm_head.weight"])
    align = export_hf(trained_run / "align" / "final", tmp_path / "align", dtype="bf16")
    assert align.template == "plain" and align.source.stages == ["align"]
    # align ran under ZeRO-2 on 2 ranks: its DeepSpeed checkpoint exports like its final weights.
    align_zero2 = exported_tensors(export_hf(trained_run / "align" / "checkpoints", tmp_path / "zero2", dtype="bf16").out)
    assert all(torch.equal(t, align_zero2[n]) for n, t in exported_tensors(align.out).items())
    report = verify_export(align)
    assert report.passed, report.summary()
    assert all(t.dtype == torch.bfloat16 for t in exported_tensors(align.out).values())


@pytest.mark.distributed
def test_eval_and_export_take_one_model_from_a_checkpoint_and_from_a_run_whose_last_stage_did_not_finish(
        trained_run, small_data, tmp_path, caplog):
    """`vdep eval PATH` and `vdep export-hf --checkpoint PATH` name the same weights and build the same
    parameters: for a step folder of the 2-rank ZeRO-3 finetune, and for a run directory whose finetune has
    checkpoints but no final weights (before, export took that checkpoint and eval align's result)."""
    from vdep.eval.questions import QuestionSet, load_questions
    from vdep.eval.run import evaluate
    from vdep.evaluate import load_trained_model

    def one_model(path: Path, out: Path):
        exported = export_hf(path, out, dtype="fp32")
        evaluated = load_trained_model(path)
        assert evaluated.source == exported.source
        ours, theirs = dict(evaluated.model.named_parameters()), dict(exported.model.named_parameters())
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
        return exported

    middle = one_model(trained_run / "finetune" / "checkpoints" / "step_00000002", tmp_path / "middle")
    assert middle.source.description == "align → finetune at step 2"
    questions = load_questions(small_data.raw / "eval.json", small_data.raw / "images")
    report = evaluate(trained_run / "finetune" / "checkpoints", QuestionSet(questions.questions[:2]), batch_size=2,
                      max_new_tokens=2)
    assert "(align → finetune at step 4, template vicuna_v1)" in report.model and len(report.answers) == 2

    run_dir = tmp_path / "unfinished"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "finetune" / "final")
    with caplog.at_level("WARNING", logger="vdep.rundir"):
        unfinished = one_model(run_dir, tmp_path / "unfinished-export")
    assert unfinished.source.description == "align (final)" and unfinished.template == "plain"
    newest = run_dir / "finetune" / "checkpoints"
    assert (f"{run_dir}: using stage align's final weights; stage finetune has a newer checkpoint, "
            f"{newest / 'step_00000004'} (step 4), which a run directory never selects: pass {newest} to use it") in caplog.text


@pytest.mark.distributed
def test_export_import_export_round_trip_is_exact(trained_run, small_data, tmp_path):
    from vdep.train.prepare import prepare_run_dir

    exported = export_hf(trained_run, tmp_path / "first", dtype="fp32")
    first = exported.out
    run_dir = tmp_path / "imported"
    overrides = small_data.overrides(run_dir) + [
        f"model.init_from={first}", "model.vision_tower.tiny=null", "model.language_model.tiny=null", "model.tokenizer=null",
    ]
    config = load_config("demo-tiny", overrides)
    prepare_run_dir(config, RunDir(run_dir))  # splits the Llava folder into the run's base weights
    second = export_hf(run_dir, tmp_path / "second", dtype="fp32")
    assert second.source.description == "base weights (no stage trained)"
    # The imported vicuna_v1 model exports in vicuna_v1 (the recipe's last stage), not in align's plain.
    assert exported.template == second.template == "vicuna_v1"
    assert (first / "chat_template.jinja").read_text() == (second.out / "chat_template.jinja").read_text()
    a, b = exported_tensors(first), exported_tensors(second.out)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    config_a = json.loads((first / "config.json").read_text())
    config_b = json.loads((second.out / "config.json").read_text())
    assert config_a["text_config"] == config_b["text_config"] and config_a["vision_config"] == config_b["vision_config"]


def test_a_folder_with_its_image_processor_inside_processor_config_imports(small_data, tmp_path):
    """transformers 5 can save a processor as one processor_config.json holding the image processor's settings
    (LLaMA-Factory 0.9.5's saved models are so, with no preprocessor_config.json): model.init_from reads them
    there, and export → import → export still gives back every tensor and the same image processing."""
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    base = tmp_path / "base"
    prepare_run_dir(load_config("demo-tiny", small_data.overrides(base)), RunDir(base))
    first = export_hf(base, tmp_path / "first", dtype="fp32").out
    folder = tmp_path / "one-file-processor"
    shutil.copytree(first, folder)
    combined = json.loads((folder / "processor_config.json").read_text())
    combined["image_processor"] = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps(combined))
    (folder / "preprocessor_config.json").unlink()
    imported = tmp_path / "imported"
    overrides = small_data.overrides(imported) + [
        f"model.init_from={folder}", "model.vision_tower.tiny=null", "model.language_model.tiny=null", "model.tokenizer=null",
    ]
    prepare_run_dir(load_config("demo-tiny", overrides), RunDir(imported))
    second = export_hf(imported, tmp_path / "second", dtype="fp32").out
    a, b = exported_tensors(first), exported_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert json.loads((first / "preprocessor_config.json").read_text()) == \
        json.loads((second / "preprocessor_config.json").read_text())


def test_an_export_before_any_training_has_the_recipes_last_template(tmp_path):
    """A run that imported a Llava folder (model.init_from) and trained nothing yet exports in the chat format
    of the recipe's last stage, whichever stages the last `vdep train` selected; a trained stage's export, in
    its own."""
    imported = ["model.init_from=/models/llava-vicuna", "model.vision_tower.tiny=null", "model.language_model.tiny=null",
                "model.tokenizer=null"]
    for stage in ("all", "align", "finetune"):
        config = load_config("demo-tiny", [*imported, f"stage={stage}"], files=False)  # align: plain, finetune: vicuna_v1
        assert ModelSource(RunDir(tmp_path), config, None).template == "vicuna_v1", stage
    assert ModelSource(RunDir(tmp_path), config, "align").template == "plain"
    align_only = load_config("demo-tiny", [*imported, "stages.finetune=null"], files=False)
    assert ModelSource(RunDir(tmp_path), align_only, None).template == "plain"


@pytest.mark.distributed
def test_llava15_mm_projector_bin_starts_the_projector(trained_run, small_data, tmp_path):
    from vdep.train.prepare import prepare_run_dir

    projector = {}
    with safe_open(str(trained_run / "finetune" / "final" / "trainable.safetensors"), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118
            if name.startswith("multi_modal_projector."):
                projector[name] = weights.get_tensor(name)
    llava_names = {"linear_1": "0", "linear_2": "2"}
    original = {
        f"model.mm_projector.{llava_names[n.split('.')[1]]}.{n.split('.')[2]}": t for n, t in projector.items()
    }
    torch.save(original, tmp_path / "mm_projector.bin")
    run_dir = tmp_path / "run"
    overrides = small_data.overrides(run_dir) + [
        f"model.init_from={tmp_path / 'mm_projector.bin'}",
        f"model.vision_tower.path={trained_run / 'base' / 'vision_tower'}", "model.vision_tower.tiny=null",
        f"model.language_model.path={trained_run / 'base' / 'language_model'}", "model.language_model.tiny=null",
    ]
    prepare_run_dir(load_config("demo-tiny", overrides), RunDir(run_dir))
    with safe_open(str(run_dir / "base" / "projector_init.safetensors"), framework="pt") as weights:
        for name, tensor in projector.items():
            assert torch.equal(weights.get_tensor(name.removeprefix("multi_modal_projector.")), tensor)
    with pytest.raises(ConfigError, match="needs"):
        projector_from_llava_bin(tmp_path / "mm_projector.bin", "linear")


def test_chat_templates_render_the_training_text(tokenizer, base_llama3_tokenizer, qwen2_tokenizer):
    """The export's chat template renders what the training template wrote (the tokenizer's own template
    too: wrapped so that image parts become text and its BOS is not written twice)."""
    conversations = [
        [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "red")],
        [Turn("user", "<image>\nWhat color?"), Turn("assistant", "red"), Turn("user", "And the shape?"), Turn("assistant", "a circle")],
        [Turn("user", "What is two plus two?"), Turn("assistant", "four")],
        [Turn("user", "<image>\n<image>\nWhich is red?"), Turn("assistant", "the first")],  # several images
    ]
    cases = [("vicuna_v1", tokenizer), ("plain", tokenizer), ("llama3", base_llama3_tokenizer), ("qwen2", qwen2_tokenizer),
             ("chat_template", base_llama3_tokenizer), ("chat_template", qwen2_tokenizer)]
    for name, case_tokenizer in cases:
        template = make_template(name, case_tokenizer)
        chat_template = export_chat_template(template)
        for turns in conversations:
            has_image = "<image>" in turns[0].text
            if name == "plain" and (not has_image or len(turns) != 2 or turns[0].text.count("<image>") > 1):
                continue  # plain shows one image (training refuses more: image_marker_mismatch)
            messages = []
            for turn in turns:
                text = turn.text.replace("<image>\n", "")
                content = [{"type": "image"}] * turn.text.count("<image>\n") + [{"type": "text", "text": text}]
                messages.append({"role": turn.role, "content": content})
            full = case_tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
            assert full == render(template.segments(turns, has_image))[0], (name, turns)
            prompt = case_tokenizer.apply_chat_template(messages[:-1], chat_template=chat_template, tokenize=False,
                                                   add_generation_prompt=True)
            assert prompt == render(template.prompt_segments(turns[:-1], has_image))[0], (name, turns)
            # Plain-string content, as LLaVA's JSON has it, renders the same.
            as_strings = [{"role": t.role, "content": t.text} for t in turns]
            assert case_tokenizer.apply_chat_template(as_strings, chat_template=chat_template, tokenize=False) == full


def test_export_refuses_bad_targets(small_data, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    result = subprocess.run([sys.executable, "-m", "vdep", "export-hf", "--checkpoint", str(tmp_path), "--out", str(busy)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not empty" in result.stderr
    result = subprocess.run([sys.executable, "-m", "vdep", "export-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no vdep run directory" in result.stderr and "Traceback" not in result.stderr
    shutil.rmtree(busy)


def test_streamed_safetensors_read_back_with_the_official_loader(tmp_path):
    from safetensors.torch import load_file

    from vdep.export.writer import ShardedWriter, write_safetensors

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(4), "empty": torch.zeros(0, 3), "strided": torch.randn(4, 6)[:, ::2]}
    write_safetensors(tmp_path / "one.safetensors", tensors)
    back = load_file(str(tmp_path / "one.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())
    writer = ShardedWriter(tmp_path / "sharded", max_shard_bytes=100)
    (tmp_path / "sharded").mkdir()
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert len(files) > 1 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(torch.equal(exported_tensors(tmp_path / "sharded")[k], t) for k, t in tensors.items())
