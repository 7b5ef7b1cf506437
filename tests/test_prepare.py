"""Preparing a run directory (rank 0, before any stage): base weights and tokenizer that follow the config."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from vdep.config import load_config
from vdep.errors import CheckpointError
from vdep.rundir import RunDir
from vdep.train.base_weights import STAMP_FILE
from vdep.train.prepare import prepare_run_dir


def prepared(small_data, run_dir, *overrides: str) -> RunDir:
    run = RunDir(run_dir)
    prepare_run_dir(load_config("demo-tiny", [*small_data.overrides(run_dir), *overrides]), run)
    return run


def llm_hidden_size(run: RunDir) -> int:
    return json.loads((run.base / "language_model" / "config.json").read_text())["hidden_size"]


def test_a_rerun_before_any_checkpoint_rebuilds_base_weights_made_from_other_settings(small_data, tmp_path,
                                                                                      llama3_tokenizer):
    run_dir = tmp_path / "run"
    first = prepared(small_data, run_dir)
    projector = load_file(str(first.base / "projector_init.safetensors"))
    assert llm_hidden_size(first) == 64 and (first.base / STAMP_FILE).is_file()

    # Another init_seed and other tiny sizes, before the first checkpoint: config.yaml says so, and so must base/.
    again = prepared(small_data, run_dir, "model.init_seed=5", "model.language_model.tiny.hidden_size=96")
    assert llm_hidden_size(again) == 96
    redrawn = load_file(str(again.base / "projector_init.safetensors"))
    assert redrawn["linear_2.weight"].shape[0] == 96
    assert not redrawn["linear_1.weight"].equal(projector["linear_1.weight"])  # init_seed 5, not 0

    # Another tokenizer: tokenizer/ is made from it (its vocabulary, plus <image> and pad).
    saved = tmp_path / "llama3"
    llama3_tokenizer.save_pretrained(str(saved))
    other = prepared(small_data, run_dir, "model.init_seed=5", "model.language_model.tiny.hidden_size=96",
                     f"model.tokenizer={saved}")
    from vdep.model.tokenizer import load_tokenizer

    assert "<|eot_id|>" in load_tokenizer(other.tokenizer).get_vocab()

    # The same settings again: nothing is rebuilt (the files are untouched).
    written = {path: path.stat().st_mtime_ns for path in other.base.rglob("*") if path.is_file()}
    prepared(small_data, run_dir, "model.init_seed=5", "model.language_model.tiny.hidden_size=96", f"model.tokenizer={saved}")
    assert {path: path.stat().st_mtime_ns for path in other.base.rglob("*") if path.is_file()} == written


def test_base_weights_without_a_stamp_are_rebuilt_unless_the_run_has_trained(small_data, tmp_path):
    run_dir = tmp_path / "run"
    run = prepared(small_data, run_dir)
    (run.base / STAMP_FILE).unlink()  # as a run directory of an earlier vdep
    (run.base / "projector_init.safetensors").write_bytes(b"stale")
    prepared(small_data, run_dir)
    assert load_file(str(run.base / "projector_init.safetensors"))  # written again

    checkpoint = run.stage("align").checkpoints / "step_00000002"  # the run has trained: its config decides
    checkpoint.mkdir(parents=True)
    (checkpoint.parent / "latest").write_text(checkpoint.name)
    with pytest.raises(CheckpointError, match="model.init_seed: 0 → 5"):
        prepared(small_data, run_dir, "model.init_seed=5")
