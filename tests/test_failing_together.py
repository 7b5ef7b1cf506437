"""Ranks that fail together: an error met by one rank alone stops every rank at once, with that rank's error.

Before, a shard lost under one rank left the others in the step's all-gather: under NCCL, or while the failing
process had not exited yet, for deepspeed.timeout_minutes; then (and on gloo as soon as the failing process
was gone) they blamed "another rank stopped answering", with the cause only in the failing rank's stderr.
Checked: with the failure flag taken out of the step's exchange, this test fails (rank 0 says "another rank
stopped answering").
"""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from tests.conftest import read_metrics
from tests.test_recovery import poll_until
from vdep.data.shards import discover_shards, plan_epoch
from vdep.train.launch import start_local_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_a_shard_lost_under_one_rank_stops_every_rank_within_seconds_with_its_error(small_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_data.finetune_shards, shards)
    # Two ranks, whole shards each (2 of the 4). The shard removed after the first step is the first one of a
    # rank's first epoch (already open then, so that epoch goes on), read again in the second epoch by one rank.
    found = discover_shards([str(shards)])
    first, second = (plan_epoch(found, seed=0, epoch=epoch, num_consumers=2, split="shards") for epoch in (0, 1))
    lost = first[0].shards[0].path
    failing = next(rank for rank, plan in enumerate(second) if lost in {shard.path for shard in plan.shards})
    run_dir = tmp_path / "run"
    ranks = start_local_ranks(2, [
        "train", "demo-tiny", *small_data.overrides(run_dir), "stage=finetune", "stages.finetune.init_from=none",
        f"stages.finetune.shards=[{shards}]", "stages.finetune.epochs=2", "data.split=shards", "data.num_workers=0",
        "data.shuffle_buffer=2", "run.log_every=1",
        "deepspeed.timeout_minutes=5",  # a rank left waiting would wait 5 minutes
    ], output_dir=tmp_path / "output")

    def first_step_logged() -> bool:
        assert all(p.poll() is None for p in ranks), "a rank ended before the shard was removed"
        return (run_dir / "finetune" / "metrics.jsonl").is_file() and bool(read_metrics(run_dir, "finetune"))

    poll_until(first_step_logged, "no step was logged")
    shutil.move(lost, tmp_path / "moved-away.tar")
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 400  # past the 5-minute wait a left-behind rank would sit in
    while len(ended) < 2 and time.monotonic() < deadline:
        for rank, process in enumerate(ranks):
            if rank not in ended and process.poll() is not None:
                ended[rank] = time.monotonic()
        time.sleep(0.05)
    for process in ranks:
        if process.poll() is None:
            process.kill()
    assert len(ended) == 2, "a rank was left waiting"
    apart = abs(ended[0] - ended[1])
    print(f"the ranks stopped {apart:.2f} s apart")
    assert apart < 15, apart  # together, not one after deepspeed.timeout_minutes
    assert [process.returncode for process in ranks] == [2, 2]  # a user-facing error on both, not a lost peer
    said = [(tmp_path / "output" / f"rank{rank}.log").read_text() for rank in range(2)]
    expected = f"rank {failing} on {socket.gethostname()} stopped: {lost}: cannot open the shard"
    for rank, text in enumerate(said):
        assert expected in text, (rank, text[-2000:])
        assert "another rank stopped answering" not in text
