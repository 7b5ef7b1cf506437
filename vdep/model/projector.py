"""The projector from vision features to LLM embeddings."""

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
