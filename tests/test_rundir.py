"""The run directory: which files make a stage's model, for training, evaluation and export alike."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import build_tiny_model
from vdep.config import load_config
from vdep.errors import CheckpointError
from vdep.evaluate import load_trained_model
from vdep.export.sources import resolve_source
from vdep.rundir import RunDir, last_complete_stage, stage_weights
from vdep.train.prepare import save_resolved_config


def write_final(run: RunDir, stage: str, tensors: dict[str, torch.Tensor]) -> None:
    final = run.stage(stage).final
    final.mkdir(parents=True)
    save_file(tensors, str(final / "trainable.safetensors"))
    (final / "summary.json").write_text(json.dumps({"stage": stage, "steps": 1, "final": {}}))


@pytest.fixture
def two_stage_run(small_data, tokenizer, tmp_path):
    """A run directory whose align result trained the LM head and whose finetune result, started from
    nothing (`init_from: none`), trained only the projector."""
    def make(init_from: str) -> tuple[RunDir, dict, dict]:
        run_dir = tmp_path / init_from
        config = load_config("demo-tiny", small_data.overrides(run_dir) + [f"stages.finetune.init_from={init_from}"])
        run = RunDir(run_dir)
        save_resolved_config(config, run)
        run.tokenizer.mkdir(parents=True)
        tokenizer.save_pretrained(str(run.tokenizer))
        base = build_tiny_model(config, tokenizer, run_dir).model  # writes base/
        generator = torch.Generator().manual_seed(0)
        align = {"lm_head.weight": torch.randn(base.lm_head.weight.shape, generator=generator)}
        projector = base.multi_modal_projector.linear_1.weight
        finetune = {"multi_modal_projector.linear_1.weight": torch.randn(projector.shape, generator=generator)}
        write_final(run, "align", align)
        write_final(run, "finetune", finetune)
        return run, config, {"base": base, "align": align, "finetune": finetune}
    return make


def test_a_stage_started_from_nothing_is_evaluated_and_exported_without_the_earlier_stage(two_stage_run):
    run, config, weights = two_stage_run("none")
    assert last_complete_stage(run, config) == "finetune"
    assert stage_weights(run, config, "finetune") == [run.stage("finetune").final_weights]
    assert [layer.path for layer in resolve_source(run.path).layers] == [run.stage("finetune").final_weights]
    trained = load_trained_model(run.path)
    assert trained.stage == "finetune" and trained.weights == [run.stage("finetune").final_weights]
    # The LM head is the base model's: align's result is not part of this finetune's model.
    assert torch.equal(trained.model.lm_head.weight, weights["base"].lm_head.weight)
    assert torch.equal(trained.model.multi_modal_projector.linear_1.weight,
                       weights["finetune"]["multi_modal_projector.linear_1.weight"])


def test_a_stage_started_from_the_previous_one_carries_its_weights(two_stage_run):
    run, config, weights = two_stage_run("previous")
    expected = [run.stage("align").final_weights, run.stage("finetune").final_weights]
    assert stage_weights(run, config, "finetune") == expected
    assert [layer.path for layer in resolve_source(run.path).layers] == expected
    trained = load_trained_model(run.path)
    assert trained.weights == expected
    assert torch.equal(trained.model.lm_head.weight, weights["align"]["lm_head.weight"])
    assert stage_weights(run, config, "finetune", final=False) == expected[:1]  # what training starts from
    (run.stage("align").final_weights).unlink()
    with pytest.raises(CheckpointError, match="run stage=align first"):
        stage_weights(run, config, "finetune")
