"""A shard shorter than sizes.json says: its missing samples are counted and named, in the loader, the
stage summary and TensorBoard, and too many of them stop the run."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_metrics
from tests.helpers import make_loader
from vdep.train.launch import launch_local


def short_copy(source: Path, folder: Path, shard: str, keep_members: int | None = None, cut_bytes: int | None = None) -> Path:
    """A copy of a shard folder whose `shard` keeps its first `keep_members` tar members (a clean end), or
    its first `cut_bytes` bytes (cut inside a member)."""
    shutil.copytree(source, folder)
    path = folder / shard
    if cut_bytes is not None:
        path.write_bytes(path.read_bytes()[:cut_bytes])
        return folder
    buffer = io.BytesIO()
    with tarfile.open(path) as original, tarfile.open(fileobj=buffer, mode="w") as shorter:
        for member in original.getmembers()[:keep_members]:
            shorter.addfile(member, original.extractfile(member))
    path.write_bytes(buffer.getvalue())
    return folder


def drained(loader) -> tuple[dict, dict, list[str]]:
    """Every batch of epoch 0 and what the loader set aside: (skip counts, shortfalls, messages)."""
    counts: dict[str, int] = {}
    shortfalls: dict = {}
    messages: list[str] = []
    for item in [*loader.micro_batches(0), *loader.reports]:
        for reason, count in item.skipped.items():
            counts[reason] = counts.get(reason, 0) + count
        shortfalls.update(item.shortfalls)
        messages += item.skip_messages
    return counts, shortfalls, messages


@pytest.mark.parametrize("cut", ["inside a member", "at a member boundary"])
@pytest.mark.parametrize("shard", ["000001.tar", "000003.tar"])  # also the last one a consumer reads
def test_the_samples_a_short_shard_lacks_are_counted_and_named(small_data, tokenizer, tmp_path, cut, shard):
    size = (small_data.finetune_shards / shard).stat().st_size
    folder = short_copy(small_data.finetune_shards, tmp_path / "shards", shard,
                        cut_bytes=size // 2 + 100 if cut == "inside a member" else None,
                        keep_members=14 if cut == "at a member boundary" else None)
    with tarfile.open(small_data.finetune_shards / shard) as original:
        keys = [m.name.split(".")[0] for m in original.getmembers()]
    for workers in (0, 2):
        loader = make_loader(small_data, tokenizer, 0, 1, "shards", micro=3, shard_dir=folder, workers=workers)
        counts, shortfalls, messages = drained(loader)
        listed, held = shortfalls[str(folder / shard)]
        assert listed == 16 and 0 < held < 16
        if cut == "at a member boundary":
            assert held == len(set(keys[:14]))  # (a sample cut between its members is held, and skipped later)
        assert counts["missing_from_shard"] == listed - held
        assert counts.get("bad_tar", 0) == (1 if cut == "inside a member" else 0)
        assert any(f"{folder / shard}: sizes.json lists 16 samples, the shard held {held}" in m for m in messages)
        assert not any("(" in m.split(":", 1)[0] for m in messages)  # sentences, not tuples


def test_a_complete_shard_folder_reports_nothing_missing(small_data, tokenizer):
    counts, shortfalls, _ = drained(make_loader(small_data, tokenizer, 0, 2, "samples", micro=4, workers=2))
    assert "missing_from_shard" not in counts and not shortfalls


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_stage_with_a_short_shard_names_it_and_stops_when_too_much_is_missing(small_data, tokenizer, tmp_path):
    folder = short_copy(small_data.finetune_shards, tmp_path / "shards", "000002.tar", keep_members=12)
    short = str(folder / "000002.tar")
    loader = make_loader(small_data, tokenizer, 0, 1, "shards", micro=4, shard_dir=folder, shuffle_buffer=500)
    batches = len(list(loader.micro_batches(0)))
    _, shortfalls, _ = drained(loader)
    listed, held = shortfalls[short]
    missing = listed - held
    assert missing > 0.01 * 64
    common = ["stage=finetune", "stages.finetune.init_from=none", f"stages.finetune.shards=[{folder}]",
              "stages.finetune.global_batch_size=4", "stages.finetune.micro_batch_size=4", "run.log_every=1"]
    stopped = tmp_path / "stopped"
    code = launch_local(1, ["train", "demo-tiny", *small_data.overrides(stopped), *common])
    assert code == 2  # run.max_missing_fraction=0.01 by default
    log_text = (stopped / "logs" / "train.log").read_text()
    assert f"{missing} of the 64 samples that sizes.json lists are missing" in log_text
    assert f"{short} ({held} of {listed})" in log_text
    assert not (stopped / "finetune" / "final").exists() and (stopped / "finetune" / "checkpoints" / "latest").is_file()

    tolerant = tmp_path / "tolerant"
    assert launch_local(1, ["train", "demo-tiny", *small_data.overrides(tolerant), *common,
                            "run.max_missing_fraction=0.2"]) == 0
    summary = json.loads((tolerant / "finetune" / "final" / "summary.json").read_text())
    assert summary["short_shards"] == {short: {"listed": listed, "held": held}}
    assert summary["skipped_samples"]["missing_from_shard"] == missing
    # One pass over what the shards hold, no second epoch to make up the missing steps.
    assert summary["epochs_started"] == 1 and summary["steps"] == batches < summary["planned_steps"] == 16
    assert read_metrics(tolerant, "finetune")[-1]["data/skipped/missing_from_shard"] == missing
    events = EventAccumulator(str(tolerant / "tensorboard" / "finetune"))
    events.Reload()
    assert "data/skipped/missing_from_shard" in events.Tags()["scalars"]
