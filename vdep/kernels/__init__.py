"""Implementations of the VDEP term, chosen by `vdep.kernel`.

`reference` is `vdep.objectives.losses.reference_vdep_sum`, plain PyTorch and the ground truth.
`auto` takes a fused kernel where one is available for the device, the reference elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..objectives.losses import reference_vdep_sum


def select_vdep_sum(requested: str, device: torch.device) -> tuple[Callable[..., torch.Tensor], str]:
    """(function computing the VDEP sum, name of the implementation)."""
    if requested == "fused":
        raise ConfigError(
            "vdep.kernel=fused: this build of vdep has no fused VDEP kernel yet; use vdep.kernel=auto or reference"
        )
    return reference_vdep_sum, "reference"
