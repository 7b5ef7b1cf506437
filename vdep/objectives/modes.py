"""VDEP-mode assignment for one global batch.

Within a global batch (all ranks, all micro-batches) exactly `round(mode_ratio · n_image_samples)` image
samples are put in VDEP mode: those whose draw is lowest, where a sample's draw is a hash of (seed, step,
the sample's identity) (`data.batch.sample_id`: its shard's number in the stage's list, and its key). So the assignment is the same on every
rank, repeats on resume, and does not depend on where a sample sits: the same global batch on 1 rank or 8,
in other micro-batches, or after a resume on another number of ranks gets the same modes. "round" is
round-half-up (2.5 → 3), not Python's banker's rounding. Text-only samples are always in LLaVA mode.
"""

from __future__ import annotations

import hashlib

import torch

from ..conventions import round_half_up


def mode_seed(seed: int, step: int) -> bytes:
    return hashlib.sha256(f"vdep-modes-{seed}-{step}".encode()).digest()[:16]


def sample_draw(salt: bytes, sample_id: int) -> bytes:
    """One sample's draw at a step (compared as bytes: uniform, and the same in every process)."""
    return hashlib.blake2b(sample_id.to_bytes(8, "little"), digest_size=8, key=salt).digest()


def assign_vdep_modes(has_image: torch.Tensor, sample_ids: torch.Tensor, mode_ratio: float, seed: int,
                      step: int) -> torch.Tensor:
    """Boolean VDEP-mode flag per global-batch slot (`has_image`: bool, `sample_ids`: int64, one entry per slot).

    A sample that occurs twice in one global batch (resampled shards) draws the same for both copies; they
    are ordered by slot, which changes nothing of the loss: the copies are the same sample.
    """
    image_slots = has_image.nonzero().flatten().tolist()
    count = round_half_up(mode_ratio * len(image_slots))
    salt = mode_seed(seed, step)
    ids = sample_ids.tolist()
    ranked = sorted(image_slots, key=lambda slot: (sample_draw(salt, ids[slot]), slot))
    modes = torch.zeros_like(has_image, dtype=torch.bool)
    modes[ranked[:count]] = True
    return modes
