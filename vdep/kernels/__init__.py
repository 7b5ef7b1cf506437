"""Implementations of the VDEP term, chosen by `vdep.kernel`.

`reference` is `vdep.objectives.losses.reference_vdep_sum`, plain PyTorch and the ground truth.
`fused` is the Triton kernel in `fused_vdep.py` (forward and backward read each selected row once;
the linear head runs chunk by chunk in front of it). `auto` takes the fused kernel on a CUDA device
when Triton is installed, the reference elsewhere, and says why. With the fused kernel and the identity
head the model uses the kernel's pass-through form (`pass_through_for`), which adds the VDEP gradient
into the text loss's gradient instead of allocating a full-size one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..objectives.losses import reference_vdep_sum


def fused_unavailable_reason(device: torch.device, head: str) -> str | None:
    """Why the fused kernel cannot run here (None: it can)."""
    if head not in ("identity", "linear"):
        return f"vdep.head={head} is not fused"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'vdep[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (on CPU, Triton's interpreter runs it with TRITON_INTERPRET=1, for testing)"
    return None


def select_vdep_sum(requested: str, device: torch.device, head: str = "identity") -> tuple[Callable[..., torch.Tensor], str]:
    """(function computing the VDEP sum, description of the implementation)."""
    if requested == "reference":
        return reference_vdep_sum, "reference"
    why_not = fused_unavailable_reason(device, head)
    if requested == "fused" and why_not is not None:
        raise ConfigError(f"vdep.kernel=fused: {why_not}; use vdep.kernel=auto or reference")
    if requested == "auto" and (why_not is not None or device.type != "cuda"):
        return reference_vdep_sum, f"reference ({why_not or 'CPU: the interpreter is for tests'})"
    from .fused_vdep import fused_vdep_sum

    return fused_vdep_sum, "fused (Triton)"


def pass_through_for(vdep_sum: Callable[..., torch.Tensor], head: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """`fused_vdep_pass_through` when the fused kernel runs with the identity head, else None."""
    if vdep_sum is reference_vdep_sum or head != "identity":
        return None
    from .fused_vdep import fused_vdep_pass_through

    return fused_vdep_pass_through
