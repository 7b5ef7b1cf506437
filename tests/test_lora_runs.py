"""LoRA and QLoRA runs on 2 gloo ranks: resume after a killed save, the stage artefact, evaluation, and
both export forms (merged; PEFT adapter over the starting model) loaded by transformers and peft."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors import safe_open

from tests.conftest import exported_tensors, read_metrics
from vdep.evaluate import load_trained_model
from vdep.export.hf import export_hf
from vdep.export.verify import verify_export
from vdep.train.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

STEPS = 6
LORA = "stages.finetune.lora={r: 4, alpha: 8, dropout: 0.1}"  # dropout: the resume must restore its RNG too
RECIPE = [
    "stages.align.zero=zero2", "stages.align.max_steps=2", "stages.align.trainable=[projector]",
    "stages.finetune.zero=zero3", f"stages.finetune.max_steps={STEPS}", "stages.finetune.save_every=2",
    "run.log_every=1", "run.keep_last=5", LORA,
]


def argv(small_data, run_dir, *extra: str) -> list[str]:
    return ["train", "demo-tiny", *small_data.overrides(run_dir), *RECIPE, *extra]


def final_tensors(run_dir, stage: str = "finetune") -> dict[str, torch.Tensor]:
    with safe_open(str(run_dir / stage / "final" / "trainable.safetensors"), framework="pt") as weights:
        return {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def lora_run(small_data, tmp_path_factory):
    """align (projector, ZeRO-2), then finetune with LoRA under ZeRO-3, checkpoints every 2 steps."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    assert launch_local(2, argv(small_data, run_dir)) == 0
    return run_dir


def test_the_stage_trains_adapters_and_projector_and_saves_only_them(lora_run):
    log_text = (lora_run / "logs" / "train.log").read_text()
    assert "language_model LoRA adapters" in log_text and "ZeRO-3" in log_text
    final = final_tensors(lora_run)
    assert final and all(".lora_" in n or n.startswith("multi_modal_projector.") for n in final)
    assert {n for n in final if n.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert len([n for n in final if ".lora_B.default." in n]) == 2 * 7  # 2 layers × every Linear
    assert all(float(t.abs().sum()) > 0 for n, t in final.items() if ".lora_B." in n)  # trained from zero
    losses = [m["loss/text"] for m in read_metrics(lora_run, "finetune")]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_a_lora_run_killed_in_a_save_resumes_with_the_same_losses(small_data, lora_run, tmp_path):
    run_dir = tmp_path / "killed"
    code = launch_local(2, argv(small_data, run_dir), {"VDEP_INJECT_FAULTS": "kill_in_save@4"})
    assert code == -signal.SIGKILL
    assert (run_dir / "finetune" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert launch_local(2, argv(small_data, run_dir)) == 0
    assert "step_00000002 (step 2" in (run_dir / "logs" / "train.log").read_text()
    resumed = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, "finetune")}
    reference = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(lora_run, "finetune")}
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step, values in reference.items():
        assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), f"step {step}"
    ours, theirs = final_tensors(run_dir), final_tensors(lora_run)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in ours)


def test_the_merged_export_has_parity_with_vdeps_lora_model_and_evaluation_loads_it(lora_run, tmp_path):
    result = export_hf(lora_run, tmp_path / "merged", dtype="fp32")
    assert result.source.description == "align → finetune (final) with LoRA r=4"
    report = verify_export(result)  # vdep's model has its adapters unmerged; the export has them merged
    assert report.passed, report.summary()
    names = set(exported_tensors(result.out))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert not any(".lora_" in n or "base_layer" in n for n in names)
    # bf16: compared with the merged weights as rounded (merging after rounding would differ by ~1e-3).
    bf16 = verify_export(export_hf(lora_run, tmp_path / "bf16", dtype="bf16"))
    assert bf16.passed and "rounded to bf16" in bf16.reference, bf16.summary()
    # Evaluation builds the same model from the same files: every parameter equal.
    evaluated = dict(load_trained_model(lora_run).model.named_parameters())
    exported = dict(result.model.named_parameters())
    assert evaluated.keys() == exported.keys() and any(".lora_A." in n for n in evaluated)
    assert all(torch.equal(evaluated[n], exported[n]) for n in exported)
    # The last DeepSpeed checkpoint (2 ranks, ZeRO-3) holds the same adapters as final/.
    from_zero3 = exported_tensors(export_hf(lora_run / "finetune" / "checkpoints", tmp_path / "zero3", dtype="fp32").out)
    merged = exported_tensors(result.out)
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in from_zero3.items())


def test_the_adapter_export_is_a_peft_adapter_over_the_starting_model(lora_run, tmp_path):
    result = export_hf(lora_run, tmp_path / "adapter-export", dtype="fp32", adapter=True)
    report = verify_export(result)  # LlavaForConditionalGeneration.from_pretrained(OUT) + PeftModel.from_pretrained
    assert report.passed and report.client == "transformers + peft", report.summary()
    # OUT/ is the model the LoRA stage started from: align's result, exactly.
    align = exported_tensors(export_hf(lora_run / "align" / "final", tmp_path / "align", dtype="fp32").out)
    base = exported_tensors(result.out)
    assert base.keys() == align.keys() and all(torch.equal(base[n], align[n]) for n in base)
    adapter_config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (4, 8, 0.1)
    assert adapter_config["modules_to_save"] == ["model.multi_modal_projector"]
    assert adapter_config["base_model_name_or_path"] is None  # no machine-local path
    with safe_open(str(result.adapter / "adapter_model.safetensors"), framework="pt") as weights:
        keys = set(weights.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in keys
    assert len(keys) == 2 * 2 * 7 + 4


def test_qlora_trains_a_4bit_base_under_zero2_and_exports_the_trained_model(small_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "qlora"
    stage = ["stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero2",
             "stages.finetune.max_steps=3", "run.log_every=1",
             "stages.finetune.lora={r: 4, alpha: 8, quantize: nf4}"]
    assert launch_local(2, ["train", "demo-tiny", *small_data.overrides(run_dir), *stage]) == 0
    losses = [m["loss/text"] for m in read_metrics(run_dir, "finetune")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(float(t.abs().sum()) > 0 for n, t in final_tensors(run_dir).items() if ".lora_B." in n)
    result = export_hf(run_dir, tmp_path / "merged", dtype="fp32")
    assert "nf4 base" in result.source.description
    report = verify_export(result)  # the dequantized base plus the adapters: the model that was trained
    assert report.passed, report.summary()
