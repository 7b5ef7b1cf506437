"""slurm/train.sbatch against a real SLURM: preempted with USR1, requeued, resumed, same losses.

The cluster is one node on this machine (tests/slurm_cluster.py). The job runs the sbatch script
with only what its header invites users to edit: the settings block (recipe, ranks per node, the
overrides pointing at this test's data) and the resources on the sbatch command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.slurm_cluster import SlurmCluster, edited_sbatch, install_slurm, wait_until
from vdep.train.distributed import free_port
from vdep.train.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.slurm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
STAGE = [
    "stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero3",
    f"stages.finetune.max_steps={STEPS}", "stages.finetune.save_every=4", "run.log_every=1",
]


@pytest.fixture
def cluster(tmp_path_factory):
    reason = install_slurm()
    if reason is not None:
        if os.environ.get("VDEP_REQUIRE_SLURM") == "1":  # CI: a skipped SLURM test would hide a failure
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def test_a_job_preempted_with_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(
    cluster, small_data, tmp_path
):
    reference = tmp_path / "reference"
    assert launch_local(2, ["train", "demo-tiny", *small_data.overrides(reference), *STAGE]) == 0  # builds the ops too

    run_dir = tmp_path / "slurm-run"
    output = tmp_path / "slurm-job.out"
    env = {
        **cluster.env,
        "RECIPE": "demo-tiny",
        "PROCS_PER_NODE": "2",
        "VENV": str(Path(sys.executable).parent.parent),
        "RDZV_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    submit = [
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", "--time=15",
        f"--output={output}", f"--chdir={ROOT}", "--export=ALL",
        str(edited_sbatch(tmp_path / "train.sbatch", small_data.overrides(run_dir))), *STAGE,  # extra overrides last
    ]
    job_id = subprocess.run(submit, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]

    def diagnostics() -> str:
        return f"job: {cluster.job(job_id)}\n--- job output ---\n{output.read_text() if output.exists() else '(none)'}"

    def reached(step: int) -> bool:
        metrics = run_dir / "finetune" / "metrics.jsonl"
        return metrics.is_file() and any(m["step"] >= step for m in read_metrics(run_dir, "finetune"))

    def running_or_reached(step: int) -> bool:
        if cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            raise AssertionError(f"the job ended before step {step}\n{diagnostics()}")
        return reached(step)

    wait_until(lambda: running_or_reached(3), 300, "step 3 of the first run", diagnostics)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)  # what SLURM does 120 s before the time limit
    wait_until(lambda: cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
               400, "the requeued job to finish", diagnostics)

    job = cluster.job(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", diagnostics()
    assert job["Restarts"] == "1", diagnostics()
    text = output.read_text()
    assert "SIGUSR1 received; asking the trainers to checkpoint and stop" in text
    assert f"requeueing job {job_id}" in text and f"job {job_id} (restart 1)" in text

    log_text = (run_dir / "logs" / "train.log").read_text()
    stopped = [line for line in log_text.splitlines() if "stopped by SIGUSR1 after step" in line]
    assert stopped, log_text[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < STEPS
    assert f"(step {step} of {STEPS})" in log_text  # the requeued job resumed from that checkpoint
    assert (run_dir / "finetune" / "final" / "trainable.safetensors").is_file()

    resumed = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(run_dir, "finetune")}
    uninterrupted = {m["step"]: (m["loss/text"], m["loss/vdep"]) for m in read_metrics(reference, "finetune")}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s, values in uninterrupted.items():
        assert resumed[s] == pytest.approx(values, rel=1e-6, abs=1e-6), f"step {s}"


def test_build_shards_array_job_and_finalize_give_the_same_shards_as_one_build(cluster, small_data, tmp_path):
    from vdep.data_tools.build_shards import BuildOptions, build_shards

    source = small_data.raw / "finetune.json"
    build_shards(BuildOptions([source], small_data.raw / "images", tmp_path / "local", samples_per_shard=10,
                              shuffle=True, seed=5, progress=False))
    out = tmp_path / "array-out"
    env = {**cluster.env, "INPUTS": str(source), "IMAGE_ROOT": str(small_data.raw / "images"), "OUT": str(out),
           "SAMPLES_PER_SHARD": "10", "SEED": "5", "VENV": str(Path(sys.executable).parent.parent)}
    common = ["sbatch", "--parsable", "--cpus-per-task=1", "--time=10", f"--chdir={ROOT}", "--export=ALL"]
    script = str(ROOT / "slurm" / "build_shards.sbatch")
    parts = subprocess.run([*common, "--array=0-2", f"--output={tmp_path}/part-%a.out", script],
                           env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    final = subprocess.run([*common, "--array=0", f"--dependency=afterok:{parts}", f"--output={tmp_path}/final.out",
                            script], env={**env, "FINALIZE": "1"}, capture_output=True, text=True, check=True)
    final_id = final.stdout.strip().split(";")[0]

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))

    wait_until(lambda: not cluster.run("squeue", "-h", "-j", f"{parts},{final_id}").stdout.strip(), 300,
               "the array and the finalize job", logs)
    text = logs()
    assert "building part 2 of 3" in text and "sizes.json matches the tars" in text, text
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.tar")}
    for name in ("sizes.json", "stats.json", "errors.jsonl"):
        assert (out / name).read_text() == (tmp_path / "local" / name).read_text(), name
