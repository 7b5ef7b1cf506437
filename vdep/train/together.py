"""Ranks that fail together.

When one rank of a job meets an error that the others do not (a shard it cannot read, a file it cannot
write), the others go on to the next collective and wait there for it, until `deepspeed.timeout_minutes`
ends the wait, and then blame a lost peer while the cause sits in one rank's stderr. So every place where
ranks may fail alone ends in an agreement: each rank says whether it failed, and if any did, every rank
stops at once with the same error, which names the rank, its host and its message.

    with together(device):             # collective: every rank enters, every rank leaves or raises
        rank_local_work()

`raise_together` is for a caller that learned of a failure from an exchange of its own (the step's plan
carries a failure flag in the row it all-gathers anyway, so a step costs no extra collective).

A rank whose own error is a bug (not a `VdepError`) re-raises it, traceback and all; the others raise
`RanksFailed`, a user-facing error, naming that rank. A single process raises its own error unchanged.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from ..errors import RanksFailed, VdepError
from ..log import get_logger
from .distributed import all_reduce_max, current_rank

log = get_logger("train")


@dataclass(frozen=True)
class RankFailure:
    rank: int
    host: str
    message: str
    user_error: bool  # a VdepError: its message says what to do

    @classmethod
    def of(cls, error: BaseException) -> RankFailure:
        text = str(error).strip()
        user_error = isinstance(error, VdepError)
        message = text if user_error and text else f"{type(error).__name__}: {text}"
        return cls(current_rank(), socket.gethostname(), message, user_error)


def fail_together(error: BaseException | None, device: torch.device) -> None:
    """Collective: every rank says whether it failed (`error`); if any did, every rank raises."""
    if all_reduce_max(1.0 if error is not None else 0.0, device):
        raise_together(error)


def raise_together(error: BaseException | None) -> NoReturn:
    """Collective, once every rank knows that some rank failed: every rank raises the same error."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is None:
            raise RanksFailed("a failure was reported without an error")
        raise error  # one process: its own error, as it is
    own = RankFailure.of(error) if error is not None else None
    gathered: list[RankFailure | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    failures = [failure for failure in gathered if failure is not None]
    if not failures:  # cannot happen: the caller learned that some rank failed
        raise RanksFailed("another rank reported a failure but sent no message; see the other ranks' logs")
    first = failures[0]
    others = [failure.rank for failure in failures[1:]]
    also = f" (ranks {', '.join(map(str, others))} failed too; their logs say why)" if others else ""
    cause = first.message if first.user_error else f"{first.message} (a bug in vdep: rank {first.rank}'s log has the traceback)"
    message = f"rank {first.rank} on {first.host} stopped: {cause}{also}"
    if error is not None and not isinstance(error, VdepError):
        log.error("rank %d failed; every rank stops", current_rank(), exc_info=error)
        raise error
    raise RanksFailed(message) from error


@contextlib.contextmanager
def together(device: torch.device) -> Iterator[None]:
    """Collective: run the block on every rank; when it raises on any rank, every rank raises (see above).
    The block must not itself enter a collective that a failed rank would miss."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (shared with the other ranks, then raised again)
        error = exc
    fail_together(error, device)
