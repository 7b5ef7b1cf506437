"""slurm/train.sbatch on a real two-node SLURM cluster: equal losses, preemption, losing a node.

The cluster (tests/multinode_cluster.py) is a controller and two compute nodes in network namespaces,
one slurmd per node; each node runs one CPU rank (gloo) under torchrun, and the ranks meet through
torchrun's c10d rendezvous on the first node, as on a real cluster. The job runs the sbatch script
with only its settings block edited and the resources on the sbatch command line. Every job is
compared with one uninterrupted one-node run of the same two ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.multinode_cluster import NODES, MultiNodeCluster, is_mount_point, namespace_pids
from tests.slurm_cluster import install_slurm
from vdep.rundir import checkpoint_tag
from vdep.train.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.slurm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"align": 3, "finetune": 6}
SAVE_EVERY = 2
STAGES = [
    *(f"stages.{stage}.max_steps={steps}" for stage, steps in STEPS.items()),
    *(f"stages.{stage}.save_every={SAVE_EVERY}" for stage in STEPS),
    "run.log_every=1",
]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_slurm()
    if reason is not None:
        if os.environ.get("VDEP_REQUIRE_SLURM") == "1":  # CI: a skipped SLURM test would hide a failure
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = MultiNodeCluster(tmp_path_factory.mktemp("multinode")).start()
    yield cluster
    cluster.stop()
    assert cluster.leftovers() == []


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


def edited_sbatch(target: Path, overrides: list[str]) -> Path:
    """slurm/train.sbatch with its OVERRIDES block replaced, as a user edits it before submitting."""
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    start = text.index("OVERRIDES=(\n")
    end = text.index("\n)\n", start) + 3
    target.write_text(text[:start] + "OVERRIDES=(\n" + "".join(f"  {o}\n" for o in overrides) + ")\n" + text[end:])
    return target


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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self.diagnostics()}")

    def reached(self, stage: str, step: int) -> bool:
        if self.state().get("JobState") in ENDED:
            raise AssertionError(f"the job ended before {stage} step {step}\n{self.diagnostics()}")
        metrics = self.run_dir / stage / "metrics.jsonl"
        return metrics.is_file() and any(m["step"] >= step for m in read_metrics(self.run_dir, stage))

    def wait_until_ended(self, timeout_s: float) -> dict[str, str]:
        self.wait(lambda: self.state().get("JobState") in ENDED, timeout_s, "the job to end")
        return self.state()


def submit(cluster: MultiNodeCluster, small_data, folder: Path, *extra: str) -> Job:
    """slurm/train.sbatch on both nodes, one CPU rank each; `extra` overrides go last."""
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
        "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
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


def test_the_cluster_runs_tasks_on_both_nodes_and_leaves_nothing_behind(tmp_path):
    reason = install_slurm()
    if reason is not None:
        pytest.fail(reason) if os.environ.get("VDEP_REQUIRE_SLURM") == "1" else pytest.skip(reason)
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
        assert socket_hostname() not in NODES  # the host's own name is untouched
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    assert all(namespace_pids(node) == [] for node in NODES)
    assert Path("/run/netns").exists() == netns_existed and (netns_existed or not is_mount_point(Path("/run/netns")))


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


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
