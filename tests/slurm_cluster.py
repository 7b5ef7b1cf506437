"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one temporary directory (config, state, spool, logs); the daemons run as root,
on the usual ports, and `stop()` ends exactly the processes `start()` began.
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


def install_slurm() -> str | None:
    """Install the Debian packages when missing; returns why SLURM cannot be had here, or None."""
    reason = install_packages((*DAEMONS, "sbatch"), PACKAGES)
    return None if reason is None else f"SLURM: {reason}"


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.conf.write_text(f"""\
ClusterName=vdep-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after the requeue (default 120).
AuthInfo=cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
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
SlurmctldParameters=enable_configless
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb * 8 // 10} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> SlurmCluster:
        self.write_config()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            self._spawn([_daemon("munged"), "--force", "--foreground"], "munged")
        self._spawn([_daemon("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._spawn([_daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle (sinfo: {state!r}); logs in {self.root / 'log'}")

    def _spawn(self, command: list[str], name: str) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.processes.append(process)
        time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start: {(self.root / 'log' / f'{name}.out').read_text()[-2000:]}")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, "--oneliner").stdout
        return dict(part.split("=", 1) for part in text.split() if "=" in part)

    def stop(self) -> None:
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
