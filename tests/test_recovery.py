"""Crash, preemption and numerical-fault recovery on 2 gloo ranks under ZeRO-3 (fp32 on CPU).

Every scenario is compared with one uninterrupted run of the same stage: a resumed run must log the
same losses at every step (within 1e-6).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import exported_tensors, read_metrics
from vdep.errors import EXIT_PREEMPTED
from vdep.export.hf import export_hf
from vdep.train.launch import launch_local, start_local_ranks, wait_for_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

STEPS = 6
STAGE = [
    "stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero3",
    f"stages.finetune.max_steps={STEPS}", "stages.finetune.save_every=2", "run.log_every=1", "run.keep_last=5",
]


def argv(small_data, run_dir, *extra: str) -> list[str]:
    return ["train", "demo-tiny", *small_data.overrides(run_dir), *STAGE, *extra]


def losses_by_step(run_dir) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, "finetune")}


def poll_until(done, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} in {timeout_s} s")


def wait_for_step(run_dir, step: int, processes) -> None:
    metrics = run_dir / "finetune" / "metrics.jsonl"

    def reached() -> bool:
        if metrics.is_file() and any(m["step"] >= step for m in read_metrics(run_dir, "finetune")):
            return True
        assert all(p.poll() is None for p in processes), "a rank ended before the step to interrupt"
        return False

    poll_until(reached, f"step {step} was not reached")


def wait_for_checkpoint_after(run_dir, step: int, processes) -> None:
    """Until a checkpoint folder of a step after `step` exists (or every rank has ended)."""
    folder = run_dir / "finetune" / "checkpoints"
    poll_until(lambda: any(int(p.name.split("_")[1]) > step for p in folder.glob("step_*"))
               or all(p.poll() is not None for p in processes), f"no checkpoint after step {step}")


def latest(run_dir) -> str:
    return (run_dir / "finetune" / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recovery") / "uninterrupted"
    assert launch_local(2, argv(small_data, run_dir)) == 0
    assert sorted(losses_by_step(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def assert_same_losses(run_dir, uninterrupted) -> None:
    resumed, reference = losses_by_step(run_dir), losses_by_step(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    for step, values in reference.items():
        assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), f"step {step}"


def test_sigkill_at_a_random_step_then_resume_repeats_every_loss(small_data, uninterrupted, tmp_path):
    started = time.time()
    seed = int(os.environ.get("VDEP_TEST_SEED") or time.time_ns() % 2**32)
    kill_after = random.Random(seed).randint(2, STEPS - 1)
    print(f"killing every rank once step {kill_after} is logged (VDEP_TEST_SEED={seed} repeats this choice)")
    run_dir = tmp_path / "killed"
    ranks = start_local_ranks(2, argv(small_data, run_dir))
    wait_for_step(run_dir, kill_after, ranks)
    for process in ranks:
        process.send_signal(signal.SIGKILL)
    assert all(process.wait() == -signal.SIGKILL for process in ranks)
    assert not (run_dir / "finetune" / "final").exists()
    pointer = run_dir / "finetune" / "checkpoints" / "latest"
    checkpointed = pointer.read_text().strip() if pointer.is_file() else None  # the kill may precede the first save
    assert launch_local(2, argv(small_data, run_dir)) == 0
    log_text = (run_dir / "logs" / "train.log").read_text()
    if checkpointed is None:
        assert "resumed from" not in log_text  # started again from step 0
    else:
        assert f"resumed from {run_dir / 'finetune' / 'checkpoints' / checkpointed}" in log_text
    assert_same_losses(run_dir, uninterrupted)
    # DeepSpeed's /dev/shm all-reduce buffers are unlinked right after start: killed ranks leave none.
    leftovers = [p for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if p.stat().st_mtime >= started]
    assert not leftovers, leftovers


def test_a_save_killed_half_way_never_becomes_latest(small_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed-in-save"
    # rank 1 dies after writing its step-4 files, before rank 0 moved the pointer
    code = launch_local(2, argv(small_data, run_dir), {"VDEP_INJECT_FAULTS": "kill_in_save@4"})
    assert code == -signal.SIGKILL
    assert (run_dir / "finetune" / "checkpoints" / "step_00000004").is_dir()  # partly written
    assert latest(run_dir) == "step_00000002"
    assert launch_local(2, argv(small_data, run_dir)) == 0
    assert "resumed from" in (run_dir / "logs" / "train.log").read_text()
    assert "step_00000002 (step 2" in (run_dir / "logs" / "train.log").read_text()
    assert_same_losses(run_dir, uninterrupted)


def test_sigusr1_to_one_rank_stops_all_ranks_with_a_checkpoint(small_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    ranks = start_local_ranks(2, argv(small_data, run_dir))
    wait_for_step(run_dir, 2, ranks)
    ranks[1].send_signal(signal.SIGUSR1)  # only one rank hears it; the step-boundary all-reduce tells the other
    # Further signals while it stops (in the step, the save or on the way out) are reported, not obeyed.
    ranks[1].send_signal(signal.SIGTERM)
    # Rank 0 learns of the stop at the next step boundary; a signal of its own before that would be a
    # stop of its own. Once the stop's checkpoint is being written, both ranks have agreed on it.
    wait_for_checkpoint_after(run_dir, 2, ranks)
    time.sleep(0.2)
    for process in ranks:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    assert wait_for_ranks(ranks) == EXIT_PREEMPTED
    assert all(process.returncode == EXIT_PREEMPTED for process in ranks)
    log_text = (run_dir / "logs" / "train.log").read_text()
    stopped_at = int(latest(run_dir).split("_")[1])
    assert 2 <= stopped_at < STEPS and not (run_dir / "finetune" / "final").exists()
    assert f"stopped by a signal to another rank after step {stopped_at}" in log_text  # rank 0 heard none
    assert launch_local(2, argv(small_data, run_dir)) == 0
    assert f"step {stopped_at} of {STEPS}" in (run_dir / "logs" / "train.log").read_text()
    assert_same_losses(run_dir, uninterrupted)


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(small_data, uninterrupted, tmp_path):
    # One NaN step: skipped on every rank (no update), counted, and the run goes on to the end.
    once = tmp_path / "nan-once"
    assert launch_local(2, argv(small_data, once), {"VDEP_INJECT_FAULTS": "nan_loss@3"}) == 0
    metrics = {m["step"]: m for m in read_metrics(once, "finetune")}
    assert [metrics[s]["train/nonfinite_steps"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 1, 1]
    assert metrics[2]["loss/text"] == pytest.approx(losses_by_step(uninterrupted)[2][0], rel=1e-6)
    assert all(torch.isfinite(torch.tensor(metrics[s]["loss/text"])) for s in (4, 5, 6))
    # The schedule is not advanced by a skipped step: step 4 updates with the LR that step 3 would have used.
    assert metrics[4]["lr/language_model"] == pytest.approx(read_metrics(uninterrupted, "finetune")[2]["lr/language_model"])
    # Two in a row with run.max_nonfinite_steps=2: a checkpoint with the weights from before the fault, exit 2.
    halted = tmp_path / "nan-twice"
    code = launch_local(2, argv(small_data, halted, "run.max_nonfinite_steps=2"), {"VDEP_INJECT_FAULTS": "nan_loss@3,nan_loss@4"})
    assert code == 2
    assert latest(halted) == "step_00000004"
    before = export_hf(uninterrupted / "finetune" / "checkpoints" / "step_00000002", tmp_path / "before", dtype="fp32").out
    after = export_hf(halted / "finetune" / "checkpoints" / "step_00000004", tmp_path / "after", dtype="fp32").out
    a, b = exported_tensors(before), exported_tensors(after)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_zero2_skips_a_non_finite_step_too(small_data, tmp_path):
    run_dir = tmp_path / "zero2"
    overrides = ["stage=align", "stages.align.zero=zero2", "stages.align.max_steps=3", "run.log_every=1"]
    code = launch_local(1, ["train", "demo-tiny", *small_data.overrides(run_dir), *overrides], {"VDEP_INJECT_FAULTS": "nan_loss@2"})
    assert code == 0
    assert [m["train/nonfinite_steps"] for m in read_metrics(run_dir, "align")] == [0, 1, 1]


def test_a_checkpoint_missing_a_file_is_refused_by_name_instead_of_restarting_adam(small_data, tmp_path):
    """DeepSpeed, asked to load a checkpoint whose optimizer partition is gone, would start Adam from zero at
    step N without a word; a missing model-states file gave a bare AssertionError."""
    import shutil

    killed = tmp_path / "killed"
    code = launch_local(2, argv(small_data, killed, "stages.finetune.max_steps=2"),
                        {"VDEP_INJECT_FAULTS": "kill_before_final@2"})
    assert code == -signal.SIGKILL
    for lost in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        run_dir = tmp_path / lost.split(".")[0]
        shutil.copytree(killed, run_dir)
        checkpoint = run_dir / "finetune" / "checkpoints" / "step_00000002"
        (checkpoint / lost).unlink()
        ranks = start_local_ranks(2, argv(small_data, run_dir, "stages.finetune.max_steps=2"),
                                  output_dir=tmp_path / "output" / lost)
        assert wait_for_ranks(ranks) == 2
        said = (tmp_path / "output" / lost / "rank0.log").read_text()
        assert f"{checkpoint} is incomplete: {lost} is missing" in said, said[-3000:]
        assert not (run_dir / "finetune" / "final").exists()
