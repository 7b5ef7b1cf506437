"""Training from remote shards (2 gloo ranks, ZeRO-3, fp32 on CPU; slow, run serially): the losses of a
local run, whether the shards come from nginx, an S3 API server or a server that drops connections and
answers 503, with no sample counted as skipped; and a run killed mid-epoch resumes reading the bytes it
had not consumed, and of the consumed ones only the small gaps a restore's spans take in."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import read_metrics
from tests.helpers import unconsumed_bytes
from tests.remote_servers import Faults, FaultyHTTP
from vdep.data.dataset import ConsumerState
from vdep.data.loader import DataPosition
from vdep.data.remote import RemoteSettings
from vdep.data.shards import discover_shards, plan_epoch
from vdep.train.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

STEPS = 8  # one epoch: 64 samples, 2 ranks × micro-batch 4 (the run reads every byte of the shards)
STAGE = ["stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero3", "stages.finetune.epochs=1",
         "stages.finetune.global_batch_size=8", "stages.finetune.micro_batch_size=4", "stages.finetune.save_every=2",
         "data.num_workers=1", "data.shuffle_buffer=8", "run.log_every=1", "run.keep_last=0",
         "data.remote.backoff_s=0.01", "data.remote.max_backoff_s=0.05", "data.remote.request_mb=0.05"]


def train(small_data, run_dir, shards: str, faults: str = "") -> int:
    argv = ["train", "demo-tiny", *small_data.overrides(run_dir), *STAGE, f"stages.finetune.shards=[{shards}]"]
    return launch_local(2, argv, {"VDEP_INJECT_FAULTS": faults} if faults else None)


def losses(run_dir) -> list[tuple[int, float, float]]:
    return [(m["step"], m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, "finetune")]


def assert_same(run_dir, reference) -> None:
    got, expected = losses(run_dir), losses(reference)
    assert [s for s, _, _ in got] == [s for s, _, _ in expected] == list(range(1, STEPS + 1))
    for (step, *a), (_, *b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), step
    summary = json.loads((run_dir / "finetune" / "final" / "summary.json").read_text())
    assert summary["skipped_samples"] == {}  # no transport fault became a skipped sample


def test_remote_shards_train_like_local_ones_through_faults_and_a_resume(small_data, served, nginx, s3, tmp_path):
    reference = tmp_path / "local"
    assert train(small_data, reference, str(small_data.finetune_shards)) == 0
    assert train(small_data, tmp_path / "http", f"{nginx.url}/finetune/") == 0
    assert_same(tmp_path / "http", reference)
    assert train(small_data, tmp_path / "s3", "s3://shards/finetune") == 0
    assert_same(tmp_path / "s3", reference)
    faults = Faults(unavailable={3, 11, 12, 19}, drop_after={6: 2000, 9: 0, 15: 40000, 22: 700, 25: 3})
    server = FaultyHTTP(served, faults).start()
    try:
        assert train(small_data, tmp_path / "faulty", f"{server.url}/finetune") == 0
        assert server.requests > 25  # every scheduled fault was met
        full_epoch_bytes = server.settle().body_bytes
    finally:
        server.stop()
    assert_same(tmp_path / "faulty", reference)

    # Killed in the step-4 save (step 2 stays the latest checkpoint), resumed from a fresh server (the
    # same address: the shards' location is part of the run) that counts what it sends.
    run_dir = tmp_path / "killed"
    server = FaultyHTTP(served).start()
    url, port = f"{server.url}/finetune", server.server.server_address[1]
    try:
        assert train(small_data, run_dir, url, faults="kill_in_save@4") == -signal.SIGKILL
    finally:
        server.stop()
    checkpoint = run_dir / "finetune" / "checkpoints" / "step_00000002"
    assert (run_dir / "finetune" / "checkpoints" / "latest").read_text() == checkpoint.name
    server = FaultyHTTP(served, port=port).start()
    try:
        assert train(small_data, run_dir, url) == 0
        resumed_bytes = server.settle().body_bytes
    finally:
        server.stop()
    assert_same(run_dir, reference)
    plans = plan_epoch(discover_shards([str(small_data.finetune_shards)]), 0, 0, 2, "shards")
    low = high = 0
    for rank in range(2):
        saved = json.loads((checkpoint / f"vdep_rank{rank:05d}.json").read_text())["data_position"]
        position = DataPosition.from_json(saved)
        assert all(isinstance(state, ConsumerState) for state in position.consumers.values())
        unconsumed, trailers, gaps = unconsumed_bytes(position, {0: plans[rank]}, served / "finetune",
                                                      RemoteSettings(request_mb=0.05).request_bytes)
        low, high = low + unconsumed, high + unconsumed + trailers + gaps
    # Each rank reads the manifest (sizes.json, stats.json) once more (counted in `unconsumed`); of the consumed
    # bytes, only the gaps between the waiting samples that a restore's spans take in (below one request,
    # docs/design.md) are read again.
    assert low <= resumed_bytes <= high < full_epoch_bytes
