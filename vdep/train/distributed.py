"""How this process was launched, process-group setup, and the few collectives the trainer uses.

`vdep train` runs unchanged as one plain process, under `torchrun`, under the `deepspeed` launcher, or
as one task per rank under `srun`. Each launcher describes the job in environment variables; this
module reads them into one `LaunchEnv` and initialises the process group (gloo on CPU, NCCL on GPU).
A plain process is a world of one on a free local port, so the DeepSpeed path is the same everywhere.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .ds import import_deepspeed, prebuild_ops

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "plain", "torchrun", "deepspeed", "slurm" or "env"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[01-04,07]` → `node01`), via scontrol when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    if not match:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, first = match.group(1), match.group(2)
    return prefix + (first or "")


def _tasks_on_first_node(tasks_per_node: str) -> int:
    # SLURM writes e.g. "4(x2),3": take the first count.
    match = re.match(r"(\d+)", tasks_per_node)
    return int(match.group(1)) if match else 1


def detect_launch(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE")
        local_world = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or str(world)
        if "TORCHELASTIC_RUN_ID" in environ:
            launcher = "torchrun"
        elif "CROSS_RANK" in environ:
            launcher = "deepspeed"
        else:
            launcher = "env"
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise ConfigError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not")
        return LaunchEnv(
            rank=_int(environ, "RANK"),
            world_size=world,
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            local_world_size=int(local_world),
            master_addr=environ["MASTER_ADDR"],
            master_port=_int(environ, "MASTER_PORT"),
            launcher=launcher,
        )
    # `srun` with one task per rank: only job steps have SLURM_STEP_ID; the batch script itself runs
    # with SLURM variables too but is a single process.
    if "SLURM_STEP_ID" in environ and _int(environ, "SLURM_STEP_NUM_TASKS") > 1:
        job_id = _int(environ, "SLURM_JOB_ID")
        return LaunchEnv(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=_int(environ, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(environ, "SLURM_LOCALID"),
            local_world_size=_tasks_on_first_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1")),
            master_addr=environ.get("MASTER_ADDR") or first_slurm_host(environ["SLURM_STEP_NODELIST"]),
            master_port=int(environ.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "plain")


def init_distributed(launch: LaunchEnv, timeout_minutes: float) -> torch.device:
    """Initialise the default process group; returns this rank's device."""
    os.environ.update({
        "RANK": str(launch.rank),
        "WORLD_SIZE": str(launch.world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size),
        "LOCAL_SIZE": str(launch.local_world_size),  # read by DeepSpeed's CPU accelerator
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(launch.master_port),
    })
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        prebuild_ops()
    if not dist.is_initialized():
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if device.type == "cpu":
            release_shm_buffer_name(launch)
    return device


def shm_buffer_path(launch: LaunchEnv) -> Path:
    return Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{launch.master_addr}_{launch.master_port}_{launch.rank}"
    )


def release_shm_buffer_name(launch: LaunchEnv) -> None:
    """Unlink this rank's /dev/shm all-reduce buffer name; the mappings stay valid.

    DeepSpeed's CPU all-reduce creates one ~70 MB shared-memory file per rank and never removes it, so
    every run (and every killed one) would leave them behind until /dev/shm, which is RAM, is full.
    Its initialisation maps every rank's buffer before returning, so after a barrier no rank needs the
    names any more.
    """
    barrier()
    shm_buffer_path(launch).unlink(missing_ok=True)


def rank_hosts() -> list[str]:
    """Every rank's host name, in rank order (collective)."""
    host = socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [host]
    hosts: list[str] = ["" for _ in range(dist.get_world_size())]
    dist.all_gather_object(hosts, host)
    return hosts


def describe_hosts(hosts: list[str]) -> str:
    """`node1 (ranks 0-7), node2 (ranks 8-15)`: where the ranks run, for the log."""
    ranks_by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks_by_host.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in ranks_by_host.items():
        contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
        if len(ranks) == 1:
            parts.append(f"{host} (rank {ranks[0]})")
        else:
            listed = f"{ranks[0]}-{ranks[-1]}" if contiguous else ",".join(map(str, ranks))
            parts.append(f"{host} (ranks {listed})")
    return ", ".join(parts)


def current_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def current_world_size() -> int:
    """The default process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def close_process_group() -> None:
    """Destroy the default process group before the interpreter exits: left to exit, gloo's threads
    can be torn down while still joinable, which aborts the process (SIGABRT, "terminate called
    without an active exception") after a clean error message, and the exit status is lost."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank_zero(value: T) -> T:
    """Collective: rank 0's `value` on every rank (a decision rank 0 took, e.g. from a shared file system that
    other ranks might read at another moment)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Stack every rank's same-shaped tensor into (world_size, *shape), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return row.unsqueeze(0)
    flat = torch.empty(dist.get_world_size() * row.numel(), dtype=row.dtype, device=row.device)
    dist.all_gather_into_tensor(flat, row.contiguous().view(-1))  # gloo wants a flat output buffer
    return flat.view(dist.get_world_size(), *row.shape)


def sum_counters(counts: dict[str, int]) -> dict[str, int]:
    """Add up every rank's counts by key (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counts)
    gathered: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for rank_counts in gathered:
        for key, value in rank_counts.items():
            total[key] = total.get(key, 0) + value
    return total


def merge_mappings(mapping: dict) -> dict:
    """Every rank's entries in one mapping (collective; for keys on several ranks, the last rank's value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mapping)
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(mapping))
    return {key: value for rank_mapping in gathered for key, value in rank_mapping.items()}


def all_reduce_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


# How a collective fails when another rank went away: gloo's transport errors and its timeout (gloo
# honours the process group's timeout, deepspeed.timeout_minutes), NCCL's aborted communicator or
# watchdog timeout. A failure without one of these is a bug and keeps its traceback.
LOST_PEER_SIGNS = (
    "Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
    "Timed out waiting", "NCCL communicator was aborted", "Watchdog caught collective operation timeout",
)


def is_lost_peer(exc: BaseException) -> bool:
    """Whether `exc` says another rank of this process group stopped answering."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in LOST_PEER_SIGNS)


def collective_failure_cause(exc: BaseException) -> str:
    """The failure in one line: gloo prefixes its source position and appends advice of its own."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0].rstrip(".")[:300]
