"""Validation inside training: held-out text and VDEP losses every N steps (stages.<name>.eval)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_metrics
from vdep.config import load_config
from vdep.errors import ConfigError
from vdep.evaluate import load_trained_model
from vdep.model.attention import AttentionChoice
from vdep.model.build import build_model, load_image_processing
from vdep.model.loading import load_layers
from vdep.objectives.objective import VdepObjective
from vdep.rundir import RunDir
from vdep.train.launch import launch_local
from vdep.train.validation import STAMP_FILE, build_validator, prepare_validation_shards, validation_folder

STEPS = 4


def held_out_file(small_data, folder: Path, count: int = 9) -> Path:
    """The first `count` held-out questions of the small data, and one record whose image is missing."""
    records = json.loads((small_data.raw / "eval.json").read_text())[:count]
    records.append({"id": "no-such-image", "image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]})
    path = folder / "held_out.json"
    path.write_text(json.dumps(records))
    return path


def eval_overrides(small_data, run_dir: Path, held_out: Path, every: int = 2) -> list[str]:
    return [
        *small_data.overrides(run_dir), "stage=finetune", "stages.finetune.init_from=none",
        f"stages.finetune.max_steps={STEPS}", "stages.finetune.global_batch_size=8", "stages.finetune.micro_batch_size=4",
        "stages.finetune.save_every=2", "run.log_every=1",
        f"stages.finetune.eval.data={held_out}", f"stages.finetune.eval.image_root={small_data.raw / 'images'}",
        f"stages.finetune.eval.every={every}",
    ]


def test_eval_settings_are_checked(small_data, tmp_path):
    held_out = held_out_file(small_data, tmp_path)
    base = eval_overrides(small_data, tmp_path / "run", held_out)
    with pytest.raises(ConfigError, match=r"'stages.finetune.eval.every' \(from the command-line override .*\): validate every"):
        load_config("demo-tiny", [*base, "stages.finetune.eval.every=-1"])
    with pytest.raises(ConfigError, match=r"'stages.finetune.eval.image_root'.*is a LLaVA file; set stages.finetune.eval.image_root"):
        load_config("demo-tiny", [*base, "stages.finetune.eval.image_root=null"])
    with pytest.raises(ConfigError, match=r"'stages.finetune.eval.data'.*/no/such.json does not exist"):
        load_config("demo-tiny", [*base, "stages.finetune.eval.data=/no/such.json"])
    with pytest.raises(ConfigError, match=r"'stages.finetune.eval.max_samples'.*must be positive"):
        load_config("demo-tiny", [*base, "stages.finetune.eval.max_samples=0"])


def test_a_llava_file_becomes_shards_once_and_again_when_it_changes(small_data, tmp_path, caplog):
    held_out = held_out_file(small_data, tmp_path)
    config = load_config("demo-tiny", eval_overrides(small_data, tmp_path / "run", held_out))
    run = RunDir(tmp_path / "run")
    with caplog.at_level("INFO", logger="vdep.train"):
        prepare_validation_shards(config, run)
    folder = validation_folder(run, "finetune")
    assert json.loads((folder / "sizes.json").read_text()) and sum(json.loads((folder / "sizes.json").read_text()).values()) == 9
    # The rejected record is counted and named, not fatal.
    assert "rejected 1 record(s)" in caplog.text and "no-such-image" in caplog.text
    stamp = (folder / STAMP_FILE).stat().st_mtime_ns
    prepare_validation_shards(config, run)
    assert (folder / STAMP_FILE).stat().st_mtime_ns == stamp  # unchanged file: reused
    held_out_file(small_data, tmp_path, count=11)
    prepare_validation_shards(config, run)
    assert sum(json.loads((folder / "sizes.json").read_text()).values()) == 11


def direct_validation(run_dir: Path, config) -> dict[str, float]:
    """The held-out losses of a run's final model in one process, without DeepSpeed."""
    trained = load_trained_model(run_dir)
    run = RunDir(run_dir)
    stage = config.stages["finetune"]
    base = run.base_paths(config.model)
    ctx = SimpleNamespace(
        config=config, run=run, base=base, tokenizer=trained.tokenizer, device=torch.device("cpu"),
        image_processing=load_image_processing(base, config.data.pad_to_square),
        launch=SimpleNamespace(rank=0, world_size=1),
    )
    spec = trained.spec
    objective = VdepObjective(stage.vdep, image_token_id=spec.image_token_id, num_image_tokens=spec.num_image_tokens,
                              seed=config.run.seed, device=ctx.device)
    # The training model's image term (target_norm from the recipe), not inference's default.
    model = build_model(config.model, spec, trained.tokenizer, base, AttentionChoice("sdpa", "test"), torch.float32, objective)
    load_layers(model, list(trained.source.layers))
    validator = build_validator(ctx, "finetune", stage, objective, model)
    return validator.run(model, ctx.device, torch.float32).scalars()  # type: ignore[union-attr]


@pytest.mark.distributed
def test_validation_curves_of_a_zero3_run_continue_after_a_resume(small_data, tmp_path):
    """2 ranks under ZeRO-3, killed in its last save and resumed: validation at steps 2 and 4, once each,
    in metrics.jsonl and TensorBoard; the final values are what one process computes from the final
    weights (9 samples: rank 0 has 5, rank 1 4, so rank 1 repeats a micro-batch with weight zero)."""
    held_out = held_out_file(small_data, tmp_path)
    run_dir = tmp_path / "run"
    argv = ["train", "demo-tiny", *eval_overrides(small_data, run_dir, held_out), "stages.finetune.zero=zero3"]
    assert launch_local(2, argv, {"VDEP_INJECT_FAULTS": f"kill_in_save@{STEPS}"}) == -signal.SIGKILL
    assert launch_local(2, argv) == 0
    records = [m for m in read_metrics(run_dir, "finetune") if "val/loss_text" in m]
    assert [m["step"] for m in records] == [2, STEPS]
    assert all(m["val/samples"] == 9 for m in records)
    events = EventAccumulator(str(run_dir / "tensorboard" / "finetune"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/loss_text")] == [2, STEPS]
    assert [event.step for event in events.Scalars("val/loss_vdep")] == [2, STEPS]
    config = RunDir(run_dir).read_config()
    direct = direct_validation(run_dir, config)
    assert direct["val/samples"] == 9
    for key in ("val/loss_text", "val/loss_vdep"):
        assert records[-1][key] == pytest.approx(direct[key], rel=1e-5), key
    # QA: 9 questions (the missing image left out); rank 1's share ends a batch early and decodes along.
    # A model 4 steps from random init has near-ties in its logits, so one answer may flip between 2 ranks
    # under ZeRO-3 and one process: the accuracies agree within one question.
    assert records[-1]["val/questions"] == direct["val/questions"] == 9
    assert abs(records[-1]["val/accuracy"] - direct["val/accuracy"]) <= 1 / 9 + 1e-9
    assert records[0]["val/loss_text"] != pytest.approx(records[-1]["val/loss_text"], rel=1e-4)  # it trained
    log = (run_dir / "logs" / "train.log").read_text()
    assert f"finetune step {STEPS}/{STEPS} | validation: loss_text" in log
