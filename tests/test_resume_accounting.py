"""What a resume must carry besides weights: per-rank skip counts, the data position of the last
checkpoint, the TensorBoard history, the length of an epoch, and a different `stage=` (2 gloo ranks,
ZeRO-2, fp32 on CPU; slow, run serially).

One uninterrupted run is the reference. The interrupted one is killed twice by injected faults: in
the middle of a save (so an older checkpoint stays the latest), and after the stage's last checkpoint
but before its final weights. Each time it is resumed with `stage=finetune` instead of `stage=all`.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_metrics
from vdep.train.launch import launch_local
from vdep.train.sample_log import ENV as SAMPLE_LOG

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

# max_length 148 cuts away every answer of many conversations: those samples are skipped (counted),
# differently on the two ranks, and the epoch ends before the steps that sizes.json promises.
SETTINGS = [
    "stages.align.max_steps=1", "stages.align.zero=zero2",
    "stages.finetune.zero=zero2", "stages.finetune.epochs=1", "stages.finetune.global_batch_size=4",
    "stages.finetune.micro_batch_size=2", "stages.finetune.save_every=4",
    "data.max_length=148", "data.shuffle_buffer=8", "data.num_workers=0", "run.log_every=1", "run.keep_last=0",
]


def train(small_data, run_dir, *extra: str, faults: str = "") -> int:
    argv = ["train", "demo-tiny", *small_data.overrides(run_dir), *SETTINGS, *extra]
    return launch_local(2, argv, {"VDEP_INJECT_FAULTS": faults} if faults else None)


def summary(run_dir) -> dict:
    return json.loads((run_dir / "finetune" / "final" / "summary.json").read_text())


def test_a_twice_killed_zero2_run_resumed_with_another_stage_setting_ends_as_the_uninterrupted_one(
        small_data, tmp_path):
    reference = tmp_path / "reference"
    assert train(small_data, reference) == 0
    expected = summary(reference)
    # One pass over the data: skipped samples end it early, and no second epoch makes up the steps.
    steps = expected["steps"]
    assert expected["epochs_started"] == 1 and steps < expected["planned_steps"], expected
    assert sum(expected["skipped_samples"].values()) > 0
    assert steps > 8, "the run must outlast the step-8 save that the fault kills"

    run_dir = tmp_path / "interrupted"
    assert train(small_data, run_dir, faults="kill_in_save@8") != 0
    checkpoints = run_dir / "finetune" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    ranks = [json.loads((checkpoints / "step_00000004" / f"vdep_rank{r:05d}.json").read_text()) for r in range(2)]
    assert ranks[0]["skips"]["counts"] != ranks[1]["skips"]["counts"], "each rank keeps its own"

    assert train(small_data, run_dir, "stage=finetune", faults=f"kill_before_final@{steps}") != 0
    last = checkpoints / f"step_{steps:08d}"
    assert (checkpoints / "latest").read_text() == last.name
    assert not (run_dir / "finetune" / "final" / "trainable.safetensors").exists()
    state = json.loads((last / "vdep_rank00000.json").read_text())
    # The end-of-stage checkpoint records where the data stands: past the end of the one pass.
    assert (state["data_position"]["epoch"], state["data_position"]["micro_batches"]) == (1, 0)
    assert (state["train"]["epoch"], state["train"]["micro_batches_in_epoch"]) == (1, 0)
    written = {path.name: path.stat().st_mtime_ns for path in last.iterdir()}

    assert train(small_data, run_dir, "stage=finetune") == 0
    assert {path.name: path.stat().st_mtime_ns for path in last.iterdir()} == written  # finished from it, untouched
    assert f"resumed from {last} (step {steps} of" in (run_dir / "logs" / "train.log").read_text()

    resumed = summary(run_dir)
    assert resumed["skipped_samples"] == expected["skipped_samples"]
    assert (resumed["steps"], resumed["epochs_started"]) == (steps, 1)
    losses = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, "finetune")}
    reference_losses = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(reference, "finetune")}
    assert sorted(losses) == sorted(reference_losses) == list(range(1, steps + 1))
    for step, values in reference_losses.items():
        assert losses[step] == pytest.approx(values, rel=1e-6, abs=1e-6), step
    events = EventAccumulator(str(run_dir / "tensorboard" / "finetune"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, steps + 1))  # no step twice


def short_copy(source: Path, target: Path, keep: int) -> None:
    """A valid tar holding the first `keep` samples of `source` (sizes.json still lists them all)."""
    with tarfile.open(source) as full, tarfile.open(target, "w") as short:
        keys: list[str] = []
        for member in full.getmembers():
            key = member.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
            if len(keys) > keep:
                break
            short.addfile(member, full.extractfile(member))


def test_every_listed_sample_is_trained_skipped_missing_or_left_over(small_data, tmp_path):
    """Absolute accounting over one epoch: the samples trained on + skipped (by reason) + missing from a short
    shard + left over at the epoch's end (a rank's share beyond the shortest rank's, a group of micro-batches no
    step could take, a consumer's last samples short of a micro-batch) == the samples sizes.json lists. Before,
    the micro-batches of an unfilled step were dropped with their skip counts, and the leftovers were not
    counted at all."""
    shards = tmp_path / "shards"
    shutil.copytree(small_data.finetune_shards, shards)
    short_copy(small_data.finetune_shards / "000001.tar", shards / "000001.tar", keep=10)
    listed = sum(json.loads((shards / "sizes.json").read_text()).values())
    run_dir = tmp_path / "run"
    code = launch_local(2, [
        "train", "demo-tiny", *small_data.overrides(run_dir), "stage=finetune", "stages.finetune.init_from=none",
        f"stages.finetune.shards=[{shards}]", "stages.finetune.zero=zero2", "stages.finetune.epochs=1",
        # 3 micro-batches of 4 a step: a rank's last micro-batches fill no step, its last samples no micro-batch
        "stages.finetune.global_batch_size=24", "stages.finetune.micro_batch_size=4",
        "data.split=shards", "data.max_length=148", "data.shuffle_buffer=4", "data.num_workers=0",
        "run.max_missing_fraction=0.5", "run.log_every=1",
    ], {SAMPLE_LOG: str(tmp_path / "samples")})
    assert code == 0
    trained = [key for rank in range(2) for line in (tmp_path / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()
               for key in json.loads(line)["keys"]]
    assert len(trained) == len(set(trained))  # each once
    skipped = summary(run_dir)["skipped_samples"]
    print(f"listed {listed}: trained {len(trained)}, {skipped}")
    assert skipped["missing_from_shard"] == 6 and skipped["no_supervised_tokens"] > 0
    assert skipped["unused_at_epoch_end"] > 0
    assert len(trained) + sum(skipped.values()) == listed
