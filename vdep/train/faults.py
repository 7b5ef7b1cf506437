"""Fault injection for testing recovery paths in real runs (never set in normal use).

VDEP_INJECT_FAULTS is a comma-separated list of FAULT@STEP items, STEP counting optimizer steps from 1:
    nan_loss@3         every rank's loss of step 3 becomes NaN (its gradients too)
    kill_in_save@4     rank 1 (or 0 in a 1-rank run) is SIGKILLed while the step-4 checkpoint is being
                       written: after its own files, before every rank finished
    kill_before_final@6  every rank is SIGKILLed when the stage ends at step 6, after its last checkpoint
                       and before its final weights
The tests use these to show that a non-finite step is skipped, that a save killed half-way never
becomes the latest checkpoint, and that a stage killed after its last checkpoint finishes from it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from ..errors import ConfigError

ENV = "VDEP_INJECT_FAULTS"
KINDS = ("nan_loss", "kill_in_save", "kill_before_final")


@dataclass(frozen=True)
class Faults:
    at: dict[str, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Faults:
        text = os.environ.get(ENV, "").strip()
        at: dict[str, set[int]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, step = item.partition("@")
            if kind not in KINDS or not step.isdigit():
                raise ConfigError(f"{ENV}: '{item}' is not FAULT@STEP with FAULT one of {', '.join(KINDS)}")
            at.setdefault(kind, set()).add(int(step))
        return cls({kind: frozenset(steps) for kind, steps in at.items()})

    def nan_loss(self, step: int) -> bool:
        return step in self.at.get("nan_loss", ())

    def kill_in_save(self, step: int, rank: int, world_size: int) -> None:
        if step in self.at.get("kill_in_save", ()) and rank == min(1, world_size - 1):
            os.kill(os.getpid(), signal.SIGKILL)

    def kill_before_final(self, step: int) -> None:
        if step in self.at.get("kill_before_final", ()):
            os.kill(os.getpid(), signal.SIGKILL)
