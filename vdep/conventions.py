"""Conventions that the data path and the objectives both follow (a leaf module: it imports nothing of vdep).

- `IGNORE_INDEX`: the label of a token that no text loss reads (PyTorch's cross-entropy default).
- `IMAGE_MARKER`: where a LLaVA conversation's image goes; the data path expands it into the image's
  placeholder tokens.
- `round_half_up`: how a fraction of a count becomes a count (VDEP modes, modality-grouping quotas):
  2.5 → 3, unlike Python's `round`, which rounds half to even.
"""

from __future__ import annotations

import math

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)
