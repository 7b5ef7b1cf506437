"""Starting N local ranks without a launcher (the demo and the tests use this).

Equivalent to `torchrun --nproc-per-node N -m vdep ...` on one machine: each child gets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. DeepSpeed's CPU op is built once here first, so the ranks
do not race to compile it. If one rank fails, the others are stopped instead of waiting in a
collective until the timeout. SIGUSR1 and SIGTERM are passed on to every rank (which then stop with a
checkpoint, see preemption.py), and ranks that exit with EXIT_PREEMPTED are given time to finish
together rather than being stopped as failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import EXIT_PREEMPTED
from .distributed import free_port
from .ds import prebuild_ops


def launch_local(nproc: int, argv: list[str], extra_env: Mapping[str, str] | None = None) -> int:
    """Run `python -m vdep ARGV` as `nproc` ranks; returns 0, or the first failing rank's exit code."""
    return wait_for_ranks(start_local_ranks(nproc, argv, extra_env))


def start_local_ranks(nproc: int, argv: list[str], extra_env: Mapping[str, str] | None = None,
                      output_dir: Path | None = None) -> list[subprocess.Popen]:
    """Start the ranks (process i is rank i) without waiting for them; with `output_dir`, each rank's stdout and
    stderr go to OUTPUT_DIR/rankN.log."""
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
        output = None
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            output = (output_dir / f"rank{rank}.log").open("w")
        processes.append(subprocess.Popen([sys.executable, "-m", "vdep", *argv], env=env, stdout=output,
                                          stderr=subprocess.STDOUT if output else None))
        if output is not None:
            output.close()  # the child holds its own descriptor
    return processes


def wait_for_ranks(processes: list[subprocess.Popen]) -> int:
    """Wait for every rank; stop the others when one fails. Returns 0 or the first failure's exit code."""
    def forward(signum, frame) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            if EXIT_PREEMPTED in codes:  # the others are saving the same checkpoint and will follow
                return _wait_preempted(processes)
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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_preempted(processes: list[subprocess.Popen], grace_s: float = 120) -> int:
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    if None in codes:
        _stop(processes)
        return 1
    failed = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    return failed[0] if failed else EXIT_PREEMPTED


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
