"""Which attention implementation the towers use, and why (logged at start)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str  # what transformers' `attn_implementation` receives
    reason: str


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested: str, device: torch.device) -> AttentionChoice:
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                "(pip install 'vdep[flash-attn]' on a CUDA machine), or use auto/sdpa"
            )
        if device.type != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; use auto or sdpa")
        return AttentionChoice("flash_attention_2", "requested in the config")
    if requested != "auto":
        return AttentionChoice(requested, "requested in the config")
    if device.type == "cuda" and flash_attn_available():
        return AttentionChoice("flash_attention_2", "flash-attn is installed and the device is CUDA")
    why = "flash-attn is not installed" if device.type == "cuda" else "no CUDA device"
    return AttentionChoice("sdpa", f"PyTorch scaled_dot_product_attention ({why})")


def packed_attention(choice: AttentionChoice) -> str:
    """How attention stays within each sample of a packed row, for the start-up log."""
    if choice.implementation == "flash_attention_2":
        return "variable-length flash-attn sequences from the position ids"
    return f"a block-diagonal causal mask built from the position ids ({choice.implementation})"
