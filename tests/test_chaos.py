"""Chaos: a two-stage run on 2 ranks under ZeRO-3, killed with SIGKILL again and again, ends as if never stopped.

The kills come at moments drawn from a seed (printed; VDEP_TEST_SEED repeats them): at random steps of
either stage and a random fraction of a second later, once inside a checkpoint's save (one rank dies after
writing its files, before the pointer moves), and once at the switch between the stages (as soon as the
first stage's final weights exist). After each kill the same command runs again. The run must then have
logged the same loss at every step as an uninterrupted run, end with the same weights (within 1e-6, fp32),
and have trained on every sample exactly once in each epoch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics
from vdep.data.shards import discover_shards
from vdep.train.launch import launch_local, start_local_ranks
from vdep.train.sample_log import ENV as SAMPLE_LOG

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1800)]

# 64 samples a stage in 4 shards, a global batch of 8 (2 ranks × micro-batch 4): 8 steps an epoch.
ALIGN_STEPS, FINETUNE_STEPS = 8, 16  # align 1 epoch, finetune 2
SETTINGS = [
    "stages.align.zero=zero3", "stages.finetune.zero=zero3", "stages.align.epochs=1", "stages.finetune.epochs=2",
    "stages.align.global_batch_size=8", "stages.finetune.global_batch_size=8", "stages.align.micro_batch_size=4",
    "stages.finetune.micro_batch_size=4", "stages.align.save_every=2", "stages.finetune.save_every=3",
    "data.split=shards", "data.shuffle_buffer=6", "run.log_every=1", "run.keep_last=3",
]


def argv(small_data, run_dir: Path) -> list[str]:
    return ["train", "demo-tiny", *small_data.overrides(run_dir), *SETTINGS]


def logged_step(run_dir: Path, stage: str) -> int:
    metrics = run_dir / stage / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return max((m["step"] for m in read_metrics(run_dir, stage) if "loss/text" in m), default=0)


def latest_step(run_dir: Path, stage: str) -> int:
    pointer = run_dir / stage / "checkpoints" / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.is_file() else 0


def kill_when(run_dir: Path, ranks, reached, delay_s: float, what: str, timeout_s: float = 600) -> None:
    """SIGKILL every rank `delay_s` after `reached()` first holds."""
    deadline = time.monotonic() + timeout_s
    while not reached():
        codes = [p.poll() for p in ranks]
        assert None in codes, f"the run ended before {what} (exit codes {codes})"
        assert time.monotonic() < deadline, f"{what} did not come in {timeout_s} s"
        time.sleep(0.01)
    time.sleep(delay_s)
    for process in ranks:
        process.send_signal(signal.SIGKILL)
    for process in ranks:
        process.wait()


def trained_per_epoch(samples: Path) -> dict[tuple[str, int], Counter]:
    """The keys each (stage, epoch) trained on, from the sample log, counting each (stage, step) once per rank:
    its last record (the steps after a run's last checkpoint ran again after the kill)."""
    last: dict[tuple[int, str, int], dict] = {}
    for file in sorted(samples.glob("rank*.jsonl")):
        rank = int(file.stem.removeprefix("rank"))
        for line in file.read_text().splitlines():
            record = json.loads(line)
            last[(rank, record["stage"], record["step"])] = record
    epochs: dict[tuple[str, int], Counter] = {}
    for record in last.values():
        epochs.setdefault((record["stage"], record["epoch"]), Counter()).update(record["keys"])
    return epochs


def losses(run_dir: Path, stage: str) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, stage) if "loss/text" in m}


def test_a_run_killed_at_random_moments_ends_as_the_uninterrupted_one(small_data, tmp_path):
    seed = int(os.environ.get("VDEP_TEST_SEED") or time.time_ns() % 2**32)
    draw = random.Random(seed)
    reference = tmp_path / "uninterrupted"
    assert launch_local(2, argv(small_data, reference), {SAMPLE_LOG: str(tmp_path / "reference-samples")}) == 0

    run_dir, samples = tmp_path / "chaos", tmp_path / "chaos-samples"
    env = {SAMPLE_LOG: str(samples)}
    plan: list[str] = []

    def launch(faults: str = ""):
        return start_local_ranks(2, argv(small_data, run_dir), {**env, "VDEP_INJECT_FAULTS": faults})

    def at_step(stage: str, low: int, high: int) -> None:
        # after the step the next run resumes from; its metrics file then holds only steps it logged itself
        step = draw.randint(max(low, latest_step(run_dir, stage) + 1), high)
        delay = round(draw.uniform(0, 0.4), 3)
        plan.append(f"{stage} step {step} + {delay} s")
        print(f"kill: {plan[-1]}", flush=True)
        started = time.time()
        metrics = run_dir / stage / "metrics.jsonl"
        kill_when(run_dir, launch(), lambda: metrics.is_file() and metrics.stat().st_mtime > started
                  and logged_step(run_dir, stage) >= step, delay, f"{stage} step {step}")

    def in_save(stage: str, save_every: int, last: int) -> None:
        # a save after the point the next run resumes from (the stage's step count in the fault is its own)
        after = latest_step(run_dir, stage)
        steps = [s for s in range(save_every, last, save_every) if s > after]
        step = draw.choice(steps)
        plan.append(f"{stage}: rank 1 inside the save of step {step}")
        print(f"kill: {plan[-1]}", flush=True)
        ranks = launch(f"kill_in_save@{step}")
        assert wait_for_exit(ranks) != 0
        folder = run_dir / stage / "checkpoints" / f"step_{step:08d}"
        assert folder.is_dir() and latest_step(run_dir, stage) < step  # half-written, never the latest

    def at_switch() -> None:
        plan.append("the switch: align's final weights written, finetune not yet started")
        print(f"kill: {plan[-1]}", flush=True)
        final = run_dir / "align" / "final" / "trainable.safetensors"
        kill_when(run_dir, launch(), final.is_file, 0.0, "align's final weights")
        assert logged_step(run_dir, "finetune") == 0

    print(f"chaos seed {seed} (VDEP_TEST_SEED={seed} repeats the moments)", flush=True)
    at_step("align", 1, 3)
    in_save("align", 2, ALIGN_STEPS)
    at_switch()
    at_step("finetune", 2, 7)
    in_save("finetune", 3, FINETUNE_STEPS)
    at_step("finetune", 9, FINETUNE_STEPS - 3)
    assert launch_local(2, argv(small_data, run_dir), env) == 0
    print("kills:", "; ".join(plan))

    for stage in ("align", "finetune"):
        resumed, expected = losses(run_dir, stage), losses(reference, stage)
        assert sorted(resumed) == sorted(expected) == list(range(1, (ALIGN_STEPS if stage == "align" else FINETUNE_STEPS) + 1))
        for step, values in expected.items():
            assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), (stage, step, plan)
        final = load_file(str(run_dir / stage / "final" / "trainable.safetensors"))
        expected_final = load_file(str(reference / stage / "final" / "trainable.safetensors"))
        assert sorted(final) == sorted(expected_final)
        for name, tensor in expected_final.items():
            torch.testing.assert_close(final[name], tensor, rtol=1e-6, atol=1e-6, msg=f"{stage} {name} ({plan})")

    epochs = trained_per_epoch(samples)
    assert epochs == trained_per_epoch(tmp_path / "reference-samples")
    for stage, shards, count in (("align", small_data.align_shards, 1), ("finetune", small_data.finetune_shards, 2)):
        listed = sum(shard.num_samples for shard in discover_shards([str(shards)]))
        for epoch in range(count):
            keys = epochs[(stage, epoch)]
            assert len(keys) == listed and set(keys.values()) == {1}, (stage, epoch)  # every sample, once


def wait_for_exit(ranks) -> int:
    """Every rank's end, without stopping the others (a rank killed in a save ends the run)."""
    from vdep.train.launch import wait_for_ranks

    return wait_for_ranks(ranks)
