"""The run directory: which weights make a model (`resolve_model`, `stage_weights`), for training,
evaluation and export alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import build_tiny_model
from vdep.config import load_config
from vdep.errors import CheckpointError
from vdep.evaluate import load_trained_model
from vdep.export.hf import export_hf
from vdep.rundir import RunDir, checkpoint_tag, last_complete_stage, resolve_model, stage_weights
from vdep.train.prepare import save_resolved_config
from vdep.weight_layers import SafetensorsLayer, ZeroCheckpointLayer


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
    assert resolve_model(run.path).layers == (SafetensorsLayer(run.stage("finetune").final_weights),)
    trained = load_trained_model(run.path)
    assert trained.stage == "finetune" and trained.source == resolve_model(run.path)
    # The LM head is the base model's: align's result is not part of this finetune's model.
    assert torch.equal(trained.model.lm_head.weight, weights["base"].lm_head.weight)
    assert torch.equal(trained.model.multi_modal_projector.linear_1.weight,
                       weights["finetune"]["multi_modal_projector.linear_1.weight"])


def test_a_stage_started_from_the_previous_one_carries_its_weights(two_stage_run):
    run, config, weights = two_stage_run("previous")
    expected = [run.stage("align").final_weights, run.stage("finetune").final_weights]
    assert stage_weights(run, config, "finetune") == expected
    assert [layer.path for layer in resolve_model(run.path).layers] == expected
    trained = load_trained_model(run.path)
    assert [layer.path for layer in trained.source.layers] == expected
    assert torch.equal(trained.model.lm_head.weight, weights["align"]["lm_head.weight"])
    assert stage_weights(run, config, "finetune", final=False) == expected[:1]  # what training starts from
    (run.stage("align").final_weights).unlink()
    with pytest.raises(CheckpointError, match="run stage=align first"):
        stage_weights(run, config, "finetune")


def write_checkpoint(run: RunDir, stage: str, step: int, *, latest: bool = True) -> Path:
    """A checkpoint folder as the resolver sees it (the files' contents are only read when it is loaded)."""
    checkpoints = run.stage(stage).checkpoints
    folder = checkpoints / checkpoint_tag(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    if latest:
        (checkpoints / "latest").write_text(folder.name)
    return folder


def test_a_run_directory_is_its_last_complete_stage_and_a_newer_checkpoint_is_named_not_taken(two_stage_run, caplog):
    run, _, weights = two_stage_run("previous")
    align, finetune = run.stage("align"), run.stage("finetune")
    finetune.final_weights.unlink()
    newer = write_checkpoint(run, "finetune", 2)
    with caplog.at_level("WARNING", logger="vdep.rundir"):
        source = resolve_model(run.path)
    assert source.stage == "align" and source.layers == (SafetensorsLayer(align.final_weights),) and source.step is None
    assert f"newer checkpoint, {newer} (step 2)" in caplog.text and f"pass {finetune.checkpoints} to use it" in caplog.text
    # A checkpoint older than align's result (left from an earlier attempt, align trained again since) is not "newer".
    os.utime(newer, ns=(align.final_weights.stat().st_mtime_ns - 10**9,) * 2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vdep.rundir"):
        assert resolve_model(run.path).stage == "align"
    assert "newer checkpoint" not in caplog.text
    # Only a path that names the checkpoint takes it: on top of what finetune started from.
    for path in (finetune.checkpoints, finetune.checkpoints / "latest", newer, newer / "mp_rank_00_model_states.pt"):
        named = resolve_model(path)
        assert named.stage == "finetune" and named.step == 2, path
        assert named.layers == (SafetensorsLayer(align.final_weights), ZeroCheckpointLayer(finetune.checkpoints, newer.name))
        assert named.description == "align → finetune at step 2"
    # The stage folder means the stage's final weights: an error that says where its checkpoints are.
    for path in (finetune.path, finetune.final):
        with pytest.raises(CheckpointError, match=f"did not finish. Pass its checkpoints folder {finetune.checkpoints} "
                                                  r"for its latest checkpoint \(step 2\)"):
            resolve_model(path)
    # No stage complete: the base weights, which evaluation refuses unless asked for them.
    align.final_weights.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="vdep.rundir"):
        assert resolve_model(run.path).stage is None and resolve_model(run.path).layers == ()
    assert "using the base weights (no stage finished)" in caplog.text and str(newer) in caplog.text
    with pytest.raises(CheckpointError, match="no completed stage"):
        load_trained_model(run.path)
    assert torch.equal(load_trained_model(run.path, allow_base=True).model.lm_head.weight, weights["base"].lm_head.weight)


def test_paths_that_name_no_finished_model_are_refused_with_what_to_pass(two_stage_run):
    run, _, _ = two_stage_run("none")
    checkpoints = run.stage("finetune").checkpoints
    unconfirmed = write_checkpoint(run, "finetune", 3, latest=False)
    with pytest.raises(CheckpointError, match=f"{checkpoints} has no complete checkpoint.*step_00000003 were never confirmed"):
        resolve_model(checkpoints)
    with pytest.raises(CheckpointError, match="written after the last checkpoint every rank finished .none."):
        resolve_model(unconfirmed)
    write_checkpoint(run, "finetune", 2)  # latest: step 2; step 3 was being saved when the run died
    with pytest.raises(CheckpointError, match=f"a save killed half-way is never used; pass {checkpoints}"):
        resolve_model(unconfirmed)
    assert resolve_model(checkpoints).step == 2
    (checkpoints / "step_00000004").mkdir()
    with pytest.raises(CheckpointError, match="is not a DeepSpeed checkpoint of vdep"):
        resolve_model(checkpoints / "step_00000004")
    with pytest.raises(CheckpointError, match="is not inside a stage folder .align, finetune. .*pass the run directory"):
        resolve_model(run.tokenizer)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(run.path / "polish")


def test_a_stage_that_never_trained_says_how_to_train_it(two_stage_run):
    run, _, _ = two_stage_run("none")
    run.stage("finetune").final_weights.unlink()
    with pytest.raises(CheckpointError, match=f"has not trained yet. Train it .vdep train {run.config_file} stage=finetune"):
        resolve_model(run.stage("finetune").path)


@pytest.mark.parametrize("finished", ["both", "align", "none"])
def test_eval_and_export_of_a_run_directory_build_the_same_model(two_stage_run, tmp_path, finished):
    """Complete; align complete and finetune with only a checkpoint; nothing complete: `vdep eval RUN` and
    `vdep export-hf RUN` name the same weights and hold the same parameters."""
    run, _, weights = two_stage_run("previous")
    if finished != "both":
        run.stage("finetune").final_weights.unlink()
        write_checkpoint(run, "finetune", 2)  # what export took before: its files are only placeholders here
    if finished == "none":
        run.stage("align").final_weights.unlink()
    evaluated = load_trained_model(run.path, allow_base=True)
    exported = export_hf(run.path, tmp_path / "hf", dtype="fp32")
    assert evaluated.source == exported.source
    assert exported.source.stage == {"both": "finetune", "align": "align", "none": None}[finished]
    ours, theirs = dict(evaluated.model.named_parameters()), dict(exported.model.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    lm_head = weights["base"].lm_head.weight if finished == "none" else weights["align"]["lm_head.weight"]
    assert torch.equal(ours["lm_head.weight"], lm_head)
