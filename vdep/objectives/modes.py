"""VDEP-mode assignment for one global batch.

Within a global batch (all ranks, all micro-batches) `round(mode_ratio · n_image_samples)` image
samples are put in VDEP mode, chosen by a generator seeded from (seed, step) only, so every rank
computes the same assignment and a resumed run repeats it. "round" is round-half-up (2.5 → 3), not
Python's banker's rounding. Text-only samples are always in LLaVA mode.
"""

from __future__ import annotations

import hashlib

import torch

from ..conventions import round_half_up


def mode_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"vdep-modes-{seed}-{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def assign_vdep_modes(has_image: torch.Tensor, mode_ratio: float, seed: int, step: int) -> torch.Tensor:
    """Boolean VDEP-mode flag per global-batch slot (`has_image`: bool, one entry per slot)."""
    image_slots = has_image.nonzero().flatten()
    count = round_half_up(mode_ratio * len(image_slots))
    generator = torch.Generator().manual_seed(mode_seed(seed, step))
    chosen = image_slots[torch.randperm(len(image_slots), generator=generator)[:count]]
    modes = torch.zeros_like(has_image, dtype=torch.bool)
    modes[chosen] = True
    return modes
