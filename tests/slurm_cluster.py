"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one temporary directory (config, state, spool, logs); the daemons run as root,
on the usual ports, and `stop()` ends exactly the processes `start()` began. The parts a cluster of
several nodes shares (tests/multinode_cluster.py) are `Daemons`, `common_settings` and `SlurmClient`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.system_packages import install_packages

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
IDLE = ("idle", "mix", "alloc")


def install_slurm() -> str | None:
    """Install the Debian packages when missing; returns why SLURM cannot be had here, or None."""
    reason = install_packages((*DAEMONS, "sbatch"), PACKAGES)
    return None if reason is None else f"SLURM: {reason}"


def daemon_path(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def common_settings(root: Path, cluster_name: str, auth_info: str, node_files: str = "") -> str:
    """The slurm.conf lines every test cluster uses; `node_files` (e.g. ".%n") tells nodes' files apart."""
    spool = f"{root}/spool/%n" if node_files else f"{root}/spool"
    return f"""\
ClusterName={cluster_name}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after the requeue (default 120).
AuthInfo={auth_info}
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{node_files}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{node_files}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
# The main scheduler looks at pending jobs every 2 s (default 60): a requeued job restarts promptly.
SchedulerParameters=sched_interval=2
"""


@dataclass
class Daemons:
    """Processes a cluster started, each with its log in LOG_DIR/NAME.out; stops exactly those."""

    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(self, command: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.out").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes[name] = process
        time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start: {(self.log_dir / f'{name}.out').read_text()[-2000:]}")
        return process

    def stop(self, name: str, signum: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):  # the reverse of the start order
            self.stop(name)


@dataclass
class SlurmClient:
    """SLURM's client commands against one cluster's config (`prefix` runs them in its network)."""

    conf: Path
    prefix: tuple[str, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.prefix, *command], check=False, env=env or self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "--oneliner").stdout
        return dict(part.split("=", 1) for part in text.split() if "=" in part)

    def wait_for_nodes(self, states: tuple[str, ...], timeout_s: float, logs: Path, nodes: str = "") -> None:
        """Wait until every node (or those in `nodes`) is in one of `states` (sinfo's short names)."""
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        while time.monotonic() < deadline:
            args = ("-n", nodes) if nodes else ()
            seen = self.run("sinfo", "-h", "-N", "-o", "%t", *args, check=False).stdout.split()
            if seen and all(state.rstrip("*~#!%$@^-") in states for state in seen):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes {nodes or '(all)'} not in {states} after {timeout_s} s (sinfo: {seen}); "
                           f"logs in {logs}")


class SlurmCluster(SlurmClient):
    """This machine as the one node: the daemons in the host's network, on SLURM's usual ports."""

    def __init__(self, root: Path):
        super().__init__(root / "slurm.conf")
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.daemons = Daemons(root / "log")

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(common_settings(self.root, "vdep-test", "cred_expire=10") + f"""\
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldParameters=enable_configless
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb * 8 // 10} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> SlurmCluster:
        self.write_config()
        if subprocess.run(["pgrep", "-x", "munged"], check=False, capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            self.daemons.spawn([daemon_path("munged"), "--force", "--foreground"], "munged", self.env)
        self.daemons.spawn([daemon_path("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld", self.env)
        self.daemons.spawn([daemon_path("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd", self.env)
        self.wait_for_nodes(IDLE, 60, self.root / "log")
        return self

    def stop(self) -> None:
        self.daemons.stop_all()  # slurmd, slurmctld, then munged


def edited_sbatch(target: Path, overrides: list[str]) -> Path:
    """slurm/train.sbatch with its OVERRIDES block replaced, as a user edits it before submitting."""
    text = (Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch").read_text()
    start = text.index("OVERRIDES=(\n")
    end = text.index("\n)\n", start) + 3
    target.write_text(text[:start] + "OVERRIDES=(\n" + "".join(f"  {o}\n" for o in overrides) + ")\n" + text[end:])
    return target


def wait_until(condition, timeout_s: float, what: str, diagnostics=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{diagnostics()}")
