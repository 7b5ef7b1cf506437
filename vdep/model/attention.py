"""Which attention implementation the towers use, and why (logged at start)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str  # what transformers' `attn_implementation` receives for the language model
    reason: str

    @property
    def vision_implementation(self) -> str:
        """The vision tower's attention. Its sequences are fixed-length and unmasked, which SDPA's fused
        kernels already serve; FlexAttention would only add a compile there, so it keeps SDPA."""
        return "sdpa" if self.implementation == "flex_attention" else self.implementation


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested: str, device: torch.device, packing: bool = False) -> AttentionChoice:
    """`requested` is model.attn_implementation; `packing` is data.packing (packed rows need attention
    confined to each sample, which changes the best choice on a GPU without flash-attn)."""
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                "(pip install 'vdep[flash-attn]' on a CUDA machine), or use auto/sdpa"
            )
        if device.type != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; use auto or sdpa")
        return AttentionChoice("flash_attention_2", "requested in the config")
    if requested == "flex_attention" and device.type != "cuda":
        # PyTorch's FlexAttention has no backward pass on CPU ("FlexAttention does not support backward on CPU").
        raise ConfigError("model.attn_implementation=flex_attention needs a CUDA device for training; use auto or sdpa")
    if requested != "auto":
        return AttentionChoice(requested, "requested in the config")
    if device.type != "cuda":
        return AttentionChoice("sdpa", "PyTorch scaled_dot_product_attention (no CUDA device)")
    if flash_attn_available():
        return AttentionChoice("flash_attention_2", "flash-attn is installed and the device is CUDA")
    if packing:
        # SDPA would need a dense per-row mask, which rules out its flash kernel and computes every
        # block between samples; FlexAttention's block mask skips those blocks.
        return AttentionChoice("flex_attention", "packed rows on CUDA without flash-attn")
    return AttentionChoice("sdpa", "PyTorch scaled_dot_product_attention (flash-attn is not installed)")


def packed_attention(choice: AttentionChoice) -> str:
    """How attention stays within each sample of a packed row, for the start-up log."""
    if choice.implementation == "flash_attention_2":
        return "variable-length flash-attn sequences from the position ids"
    if choice.implementation == "flex_attention":
        return "a FlexAttention block mask from the position ids (blocks between samples skipped)"
    return f"a block-diagonal causal mask built from the position ids ({choice.implementation})"
