"""Preemption: SIGUSR1 or SIGTERM stops training at the next step boundary, with a checkpoint.

The signal handler only records the signal (a handler may run anywhere, even inside a collective);
every rank reports its flag in one all-reduce per step, so all ranks stop after the same step even
when the signal reached only one of them, save a checkpoint together and exit with
`EXIT_PREEMPTED`. Running the same command again resumes from that checkpoint.

A forced-exit timer starts with the first signal: if the step or the save hangs (a collective whose
peer died), the process exits anyway before the scheduler's SIGKILL, and the previous complete
checkpoint stays the latest. Further signals during the save are reported and ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch

from ..errors import EXIT_PREEMPTED
from .distributed import all_reduce_max

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

def _say(message: str) -> None:
    # os.write is safe inside a signal handler; logging takes locks that the interrupted code may hold.
    os.write(2, f"vdep (rank {os.environ.get('RANK', '0')}): {message}\n".encode())


class StopRequest:
    """Collects stop signals while installed (a context manager); `agreed()` is the collective check."""

    def __init__(self, forced_exit_after_s: float):
        self.forced_exit_after_s = forced_exit_after_s
        self.signal_name: str | None = None  # the first stop signal this rank received
        self.stopping = False  # every rank agreed to stop (also on ranks that received no signal)
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (typing.Self needs Python 3.11; never subclassed)
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.stopping or self.signal_name is not None:
            # Stopping: the checkpoint is written and the process is on its way out. Ignore further
            # stop signals at the C level (Python resets its own handlers to the default while it
            # shuts down, and a default SIGTERM would turn exit status 75 into a kill). The
            # forced-exit timer stays, in case tearing down the process group hangs.
            for signum in self._previous:
                signal.signal(signum, signal.SIG_IGN)
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None or self.stopping:
            _say(f"{name} received while stopping; the step and checkpoint in progress go on")
            return
        self.signal_name = name
        _say(f"{name} received; stopping after the current step with a checkpoint "
             f"(forced exit in {self.forced_exit_after_s:.0f} s if that hangs)")
        self._arm_forced_exit()

    def _arm_forced_exit(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.forced_exit_after_s, self._force_exit)
            self._timer.daemon = True
            self._timer.start()

    def _force_exit(self) -> None:
        _say(f"the stop did not finish within {self.forced_exit_after_s:.0f} s (run.stop_timeout_s), probably a "
             "collective waiting for a lost rank; exiting now. The latest complete checkpoint is unchanged")
        os._exit(EXIT_PREEMPTED)

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a stop signal."""
        if all_reduce_max(1.0 if self.signal_name is not None else 0.0, device) > 0:
            self.stopping = True
            self._arm_forced_exit()  # ranks that heard no signal are guarded too
        return self.stopping
