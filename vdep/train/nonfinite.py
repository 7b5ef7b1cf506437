"""Counting the steps whose update was skipped for a non-finite loss or gradient norm.

DeepSpeed skips the update of a step whose global gradient norm is not finite, on every rank alike (any
non-finite loss makes it so). vdep counts such steps in the train state and stops the run after
`run.max_nonfinite_steps` of them in a row (trainer.nonfinite_halt).

fp16 is the exception: its dynamic loss scaler starts high on purpose and lowers the scale at every
overflow, so a fresh fp16 run skips several steps in a row by design (from 2^16 down to where the
gradients fit: one overflow per halving after the first, with DeepSpeed's default hysteresis of 2; 8 in a row
down to 512) before its first update. Those
are the scaler's search, not a sign of divergence: a skipped fp16 step counts only when the scale could not
be lowered any more (it already was at its minimum). DeepSpeed itself would raise a bare exception there;
its scaler is told not to, so that vdep's own count stops the run with a checkpoint and a message.
"""

from __future__ import annotations

from ..log import get_logger
from .checkpoint import TrainState

log = get_logger("train")


def dynamic_loss_scaler(engine):
    """fp16's dynamic loss scaler inside the engine's optimizer (None: no scaling, or a static scale)."""
    scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
    return scaler if getattr(scaler, "dynamic", False) else None


class NonfiniteSteps:
    """Counts skipped steps into `state.nonfinite_steps` and `state.nonfinite_in_a_row` (see the module docstring)."""

    def __init__(self, engine, state: TrainState):
        self.engine = engine
        self.state = state
        self.scaler = dynamic_loss_scaler(engine)
        if self.scaler is not None:
            self.scaler.raise_error_at_min_scale = False

    def loss_scale(self) -> float | None:
        """The loss scale the next step runs with (None without dynamic scaling): read before the step."""
        return float(self.scaler.cur_scale) if self.scaler is not None else None

    def count(self, stage: str, scale_before: float | None) -> None:
        """After a step: whether its update was applied, counted as described above."""
        skipped = not self.engine.was_step_applied()
        if skipped and scale_before is not None and scale_before > self.scaler.min_scale:
            log.info("stage %s: step %d overflowed in fp16 at loss scale %g; the scaler lowers it (not counted as "
                     "non-finite)", stage, self.state.step, scale_before)
            skipped = False
        self.record(stage, skipped)

    def record(self, stage: str, skipped: bool) -> None:
        state = self.state
        state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
        if skipped:
            state.nonfinite_steps += 1
            log.warning(
                "stage %s: step %d had a non-finite loss or gradient norm; its update was skipped (%d in a row, "
                "%d in this stage)", stage, state.step, state.nonfinite_in_a_row, state.nonfinite_steps,
            )
