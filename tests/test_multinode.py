"""slurm/train.sbatch on a real two-node SLURM cluster: equal losses, preemption, losing a node.

The cluster (tests/multinode_cluster.py) is a controller and two compute nodes in network namespaces,
one slurmd per node; each node runs one CPU rank (gloo) under torchrun, and the ranks meet through
torchrun's c10d rendezvous on the first node, as on a real cluster. The job runs the sbatch script
with only its settings block edited and the resources on the sbatch command line. Every job is
compared with one uninterrupted one-node run of the same two ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.multinode_cluster import NODES, MultiNodeCluster, install_multinode, is_mount_point, namespace_pids
from tests.slurm_cluster import edited_sbatch, wait_until
from vdep.rundir import checkpoint_tag
from vdep.train.distributed import LOST_PEER_SIGNS, collective_failure_cause, describe_hosts
from vdep.train.launch import launch_local, start_local_ranks


def on_the_cluster(test):
    """The cluster tests: several processes (run serially), SLURM, minutes."""
    return pytest.mark.distributed(pytest.mark.slurm(pytest.mark.timeout(900)(test)))


ROOT = Path(__file__).resolve().parents[1]
STEPS = {"align": 3, "finetune": 8}
SAVE_EVERY = 2
STAGES = [
    *(f"stages.{stage}.max_steps={steps}" for stage, steps in STEPS.items()),
    *(f"stages.{stage}.save_every={SAVE_EVERY}" for stage in STEPS),
    "run.log_every=1",
]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def require_multinode() -> None:
    reason = install_multinode()
    if reason is not None:
        if os.environ.get("VDEP_REQUIRE_SLURM") == "1":  # CI: a skipped SLURM test would hide a failure
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_multinode()
    cluster = MultiNodeCluster(tmp_path_factory.mktemp("multinode")).start()
    yield cluster
    cluster.stop()
    assert cluster.leftovers() == []


@pytest.fixture(scope="module", autouse=True)
def venv_tools_first():
    """The venv's bin first on PATH here, as in the jobs (train.sbatch activates the venv): DeepSpeed's CPU
    op, built by one `ninja` (the system's), is rebuilt by the other (pip's), ~2 min on two busy cores."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        yield


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> dict[str, dict[int, tuple[float, float]]]:
    """Per-step losses of an uninterrupted one-node run of 2 ranks, by stage."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert launch_local(2, ["train", "demo-tiny", *small_data.overrides(run_dir), *STAGES]) == 0
    return losses(run_dir)


def losses(run_dir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    # A step logged twice (before a crash and after the resume) counts with its last value.
    return {stage: {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, stage)}
            for stage in STEPS}


def assert_same_losses(run_dir: Path, reference: dict) -> None:
    run = losses(run_dir)
    for stage, steps in STEPS.items():
        assert sorted(run[stage]) == list(range(1, steps + 1)), stage
        for step, values in reference[stage].items():
            assert run[stage][step] == pytest.approx(values, rel=1e-6, abs=1e-6), f"{stage} step {step}"


@dataclass
class Job:
    cluster: MultiNodeCluster
    id: str
    run_dir: Path
    output: Path

    def state(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def diagnostics(self) -> str:
        logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}\n" for p in sorted((self.cluster.root / "log").glob("*")))
        out = self.output.read_text() if self.output.exists() else "(none)"
        return f"job: {self.state()}\n--- job output ---\n{out[-8000:]}\n{logs}"

    def wait(self, condition, timeout_s: float, what: str) -> None:
        wait_until(condition, timeout_s, what, self.diagnostics)

    def reached(self, stage: str, step: int) -> bool:
        if self.state().get("JobState") in ENDED:
            raise AssertionError(f"the job ended before {stage} step {step}\n{self.diagnostics()}")
        metrics = self.run_dir / stage / "metrics.jsonl"
        return metrics.is_file() and any(m["step"] >= step for m in read_metrics(self.run_dir, stage))

    def wait_until_ended(self, timeout_s: float) -> dict[str, str]:
        self.wait(lambda: self.state().get("JobState") in ENDED, timeout_s, "the job to end")
        return self.state()


def submit(cluster: MultiNodeCluster, small_data, folder: Path, *extra: str, nodes: int = 2) -> Job:
    """slurm/train.sbatch on both nodes (or `nodes`), one CPU rank each; `extra` overrides go last."""
    run_dir = folder / "run"
    output = folder / "job.out"
    env = {
        **cluster.env,
        "RECIPE": "demo-tiny",
        "PROCS_PER_NODE": "1",
        "VENV": str(Path(sys.executable).parent.parent),
        "RDZV_PORT": "29500",  # each job's rendezvous is on node1, whose ports are its own
        "OMP_NUM_THREADS": "1",
    }
    submit = [
        "sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=15", f"--output={output}", f"--chdir={ROOT}", "--export=ALL",
        str(edited_sbatch(folder / "train.sbatch", small_data.overrides(run_dir))), *STAGES, *extra,
    ]
    job_id = cluster.run(*submit, env=env).stdout.strip().split(";")[0]
    return Job(cluster, job_id, run_dir, output)


def slurmd_launched(cluster: MultiNodeCluster, node: str, job_id: str) -> int:
    """How many job steps of `job_id` (srun's, the training's) the node's slurmd started."""
    log = (cluster.root / "log" / f"slurmd.{node}.log").read_text()
    return sum(1 for line in log.splitlines() if "launch task" in line and f"StepId={job_id}." in line)


def ranks_in(checkpoint: Path) -> list[int]:
    """The ranks that wrote their part of a checkpoint: vdep's state and DeepSpeed's optimizer partition."""
    vdep = {int(p.stem.removeprefix("vdep_rank")) for p in checkpoint.glob("vdep_rank*.json")}
    zero = {int(p.name.split("_")[3]) for p in checkpoint.glob("zero_pp_rank_*_optim_states.pt")}
    assert vdep == zero, f"{checkpoint}: vdep state from ranks {vdep}, optimizer partitions from {zero}"
    return sorted(vdep)


def test_the_log_names_each_node_with_its_ranks():
    assert describe_hosts(["node1"]) == "node1 (rank 0)"
    assert describe_hosts(["a", "a", "b", "b"]) == "a (ranks 0-1), b (ranks 2-3)"
    assert describe_hosts(["a", "b", "a"]) == "a (ranks 0,2), b (rank 1)"


def test_a_lost_peer_is_told_in_one_line_without_gloo_s_source_position_and_advice():
    # The messages gloo raised in this module's node loss and in a SIGSTOPped rank's timeout.
    reset = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                         "[10.77.0.2]:29884: Connection reset by peer. This is typically caused by a remote worker "
                         "hanging or bugs in the application. Check the logs of the remote worker before reporting "
                         "an error. GLHF!")
    timeout = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                           "out waiting 30000ms for recv operation to complete")
    assert collective_failure_cause(reset) == "Read error [10.77.0.2]:29884: Connection reset by peer"
    assert collective_failure_cause(timeout) == "Timed out waiting 30000ms for recv operation to complete"
    assert all(any(sign in str(exc) for sign in LOST_PEER_SIGNS) for exc in (reset, timeout))


@on_the_cluster
def test_the_cluster_runs_tasks_on_both_nodes_and_leaves_nothing_behind(tmp_path):
    require_multinode()
    netns_existed = Path("/run/netns").exists()
    cluster = MultiNodeCluster(tmp_path / "cluster").start()
    try:
        script = tmp_path / "hosts.sh"
        script.write_text("#!/bin/bash\nsrun hostname\n")
        job_id = cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--chdir={tmp_path}",
                             f"--output={tmp_path}/hosts.out", str(script)).stdout.strip()
        deadline = time.monotonic() + 60
        while cluster.job(job_id).get("JobState") not in ENDED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.job(job_id)["JobState"] == "COMPLETED"
        assert sorted((tmp_path / "hosts.out").read_text().split()) == list(NODES)
        assert socket.gethostname() not in NODES  # the host's own name is untouched
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    assert all(namespace_pids(node) == [] for node in NODES)
    assert Path("/run/netns").exists() == netns_existed and (netns_existed or not is_mount_point(Path("/run/netns")))


@on_the_cluster
def test_two_nodes_train_both_stages_like_one_node_with_the_same_ranks(cluster, small_data, reference, tmp_path):
    job = submit(cluster, small_data, tmp_path)
    state = job.wait_until_ended(300)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", job.diagnostics()
    log_text = (job.run_dir / "logs" / "train.log").read_text()
    assert "2 node(s): node1 (rank 0), node2 (rank 1)" in log_text, log_text[:3000]  # one rank on each node
    for node in NODES:
        assert slurmd_launched(cluster, node, job.id) >= 1, job.diagnostics()
    for stage, steps in STEPS.items():
        assert (job.run_dir / stage / "final" / "trainable.safetensors").is_file()
        assert ranks_in(job.run_dir / stage / "checkpoints" / checkpoint_tag(steps)) == [0, 1]
    assert_same_losses(job.run_dir, reference)


@on_the_cluster
def test_usr1_stops_both_nodes_after_the_same_step_and_the_requeued_job_ends_like_an_uninterrupted_run(
    cluster, small_data, reference, tmp_path
):
    job = submit(cluster, small_data, tmp_path, "run.keep_last=20")  # keeps the stop's checkpoint to look at
    job.wait(lambda: job.reached("finetune", 2), 300, "finetune step 2")
    cluster.run("scancel", "--signal=USR1", "--batch", job.id)  # what SLURM does 120 s before the time limit
    state = job.wait_until_ended(400)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", job.diagnostics()
    assert state["Restarts"] == "1", job.diagnostics()
    text = job.output.read_text()
    for rank in (0, 1):  # srun passed the signal to torchrun on both nodes
        assert f"vdep (rank {rank}): SIGUSR1 received; stopping after the current step" in text, text[-5000:]
    assert f"requeueing job {job.id}" in text and f"job {job.id} (restart 1)" in text

    log_text = (job.run_dir / "logs" / "train.log").read_text()
    stopped = [line for line in log_text.splitlines() if "stopped by SIGUSR1 after step" in line]
    assert len(stopped) == 1, log_text[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 2 <= step < STEPS["finetune"]
    # One checkpoint at that step, with both ranks' parts (each stopped after the same step); resumed from it.
    assert ranks_in(job.run_dir / "finetune" / "checkpoints" / checkpoint_tag(step)) == [0, 1]
    assert f"(step {step} of {STEPS['finetune']})" in log_text
    assert_same_losses(job.run_dir, reference)


@on_the_cluster
def test_losing_a_node_ends_the_survivor_with_a_message_and_the_requeued_job_resumes(
    cluster, small_data, reference, tmp_path
):
    # A short collective timeout, so that a survivor waiting for a peer that never answers gives up soon.
    job = submit(cluster, small_data, tmp_path, "deepspeed.timeout_minutes=0.5")
    job.wait(lambda: job.reached("finetune", SAVE_EVERY + 1), 300, f"finetune step {SAVE_EVERY + 1}")
    killed = cluster.crash_node("node2")
    crashed_at = time.monotonic()
    assert len(killed) >= 4, killed  # slurmd, slurmstepd, torchrun and its rank
    job.wait(lambda: "another rank stopped answering" in job.output.read_text(), 60, "the survivor's message")
    message_after_s = time.monotonic() - crashed_at
    job.wait(lambda: int(job.state().get("Restarts", "0")) >= 1 or job.state()["JobState"] in ENDED, 120,
             "SLURM to requeue the job")
    requeued_after_s = time.monotonic() - crashed_at
    assert int(job.state()["Restarts"]) == 1, job.diagnostics()
    controller_log = (cluster.root / "log" / "slurmctld.log").read_text()
    assert f"requeue job JobId={job.id} due to failure of node node2" in controller_log, job.diagnostics()
    # The survivor cannot save alone: the latest checkpoint is the last one both ranks completed.
    latest = (job.run_dir / "finetune" / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest.removeprefix("step_"))
    assert SAVE_EVERY <= resumed_from < STEPS["finetune"]
    assert ranks_in(job.run_dir / "finetune" / "checkpoints" / latest) == [0, 1]
    first_run = job.output.read_text()
    message = next(line for line in first_run.splitlines() if "another rank stopped answering" in line)
    assert message.startswith("vdep: error: ") and str(job.run_dir / "finetune" / "checkpoints" / latest) in message
    assert "[rank0]:" not in first_run  # no traceback from the rank: the one paragraph only

    cluster.start_node("node2")  # the node comes back; the pending job starts on both nodes again
    state = job.wait_until_ended(400)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", job.diagnostics()
    assert slurmd_launched(cluster, "node2", job.id) == 2, job.diagnostics()  # before the crash, and after
    log_text = (job.run_dir / "logs" / "train.log").read_text()
    assert f"(step {resumed_from} of {STEPS['finetune']})" in log_text, log_text[-3000:]
    assert_same_losses(job.run_dir, reference)
    print(f"node2 crashed: survivor's message after {message_after_s:.1f} s, job requeued after "
          f"{requeued_after_s:.1f} s, resumed from finetune step {resumed_from}")


@on_the_cluster
def test_a_run_whose_node_never_comes_back_continues_on_the_node_left(cluster, small_data, reference, tmp_path):
    """node2 dies for good: the requeued job is cancelled, and the run is resubmitted on one node. Its
    checkpoint (2 ranks) continues on 1 rank through the universal checkpoint: the stage completes, with
    the accumulation doubled and the steps before the checkpoint as they were."""
    job = submit(cluster, small_data, tmp_path, "deepspeed.timeout_minutes=0.5")
    job.wait(lambda: job.reached("finetune", SAVE_EVERY + 1), 300, f"finetune step {SAVE_EVERY + 1}")
    cluster.crash_node("node2")
    job.wait(lambda: int(job.state().get("Restarts", "0")) >= 1, 120, "SLURM to requeue the job")
    cluster.run("scancel", job.id)  # the node does not come back: the user gives up on this job
    job.wait(lambda: job.state().get("JobState") in ENDED, 60, "the job to be cancelled")
    latest = (job.run_dir / "finetune" / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest.removeprefix("step_"))
    assert ranks_in(job.run_dir / "finetune" / "checkpoints" / latest) == [0, 1]

    single = submit(cluster, small_data, tmp_path, "deepspeed.timeout_minutes=0.5", nodes=1)
    try:
        state = single.wait_until_ended(400)
    finally:
        cluster.start_node("node2")  # for whatever runs on the cluster next
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", single.diagnostics()
    log_text = (job.run_dir / "logs" / "train.log").read_text()
    assert "(written on 2 rank(s)) continues on 1: 2 accumulation step(s) instead of 1" in log_text, log_text[-3000:]
    run, expected = losses(job.run_dir), reference
    assert sorted(run["finetune"]) == list(range(1, STEPS["finetune"] + 1))
    for step in range(1, resumed_from + 1):  # trained before the loss, on both nodes
        assert run["finetune"][step] == pytest.approx(expected["finetune"][step], rel=1e-6, abs=1e-6)
    assert (job.run_dir / "finetune" / "final" / "trainable.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_rank_that_stops_answering_ends_the_other_after_the_collective_timeout(small_data, tmp_path, capfd):
    """A frozen peer (no closed connection, as when a node hangs or loses its network): gloo honours the
    process group's timeout, deepspeed.timeout_minutes, and the survivor says what happened."""
    run_dir = tmp_path / "run"
    timeout_s = 15
    ranks = start_local_ranks(2, ["train", "demo-tiny", *small_data.overrides(run_dir), "stage=finetune",
                                  "stages.finetune.init_from=none", "stages.finetune.max_steps=50",
                                  "run.log_every=1", f"deepspeed.timeout_minutes={timeout_s / 60}"])
    try:
        metrics = run_dir / "finetune" / "metrics.jsonl"
        deadline = time.monotonic() + 200
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "rank 0 never reached step 2"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        status = ranks[0].wait(timeout=timeout_s + 60)
        waited_s = time.monotonic() - frozen_at
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    err = capfd.readouterr().err
    assert status == 2, err[-3000:]
    assert timeout_s - 1 <= waited_s <= timeout_s + 30, waited_s
    message = next(line for line in err.splitlines() if "another rank stopped answering" in line)
    assert "Timed out waiting" in message and "[rank0]:" not in err, err[-3000:]
    print(f"survivor ended {waited_s:.1f} s after its peer froze (timeout {timeout_s} s)")
