"""The learning-rate schedule: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Warmup reaches the full LR at step `warmup - 1` (step 0 already trains, at 1/warmup of the LR);
    then half a cosine period brings it towards zero at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
