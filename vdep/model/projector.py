"""The projector from vision features to LLM embeddings, and the optional VDEP head."""

from __future__ import annotations

import torch
from torch import nn


class MultiModalProjector(nn.Module):
    """`mlp2x_gelu` (LLaVA-1.5: Linear-GELU-Linear) or `linear`. Names match transformers' Llava."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, kind: str = "mlp2x_gelu"):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)
        elif kind != "linear":
            raise ValueError(f"unknown projector kind {kind!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            hidden = self.linear_2(self.act(hidden))
        return hidden


def make_vdep_head(kind: str, hidden_size: int) -> nn.Module:
    """`identity`, or a D→D linear map initialised to the identity (trained, never exported)."""
    if kind == "identity":
        return nn.Identity()
    head = nn.Linear(hidden_size, hidden_size)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden_size))
        head.bias.zero_()
    return head
