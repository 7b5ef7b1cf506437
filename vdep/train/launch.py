"""Starting N local ranks without a launcher (the demo and the tests use this).

Equivalent to `torchrun --nproc-per-node N -m vdep ...` on one machine: each child gets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. DeepSpeed's CPU op is built once here first, so the ranks
do not race to compile it. If one rank fails, the others are stopped instead of waiting in a
collective until the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping

from .distributed import free_port
from .ds import prebuild_ops


def launch_local(nproc: int, argv: list[str], extra_env: Mapping[str, str] | None = None) -> int:
    """Run `python -m vdep ARGV` as `nproc` ranks; returns 0, or the first failing rank's exit code."""
    prebuild_ops()
    port = free_port()
    processes = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            # Ranks share the CPU: one intra-op thread pool per rank would oversubscribe it.
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
        })
        processes.append(subprocess.Popen([sys.executable, "-m", "vdep", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(processes)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(processes)
        raise


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
