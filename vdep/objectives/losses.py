"""The two loss terms as sums, and how they become the batch loss.

Both terms are computed per micro-batch as sums; the batch loss divides them by token counts taken over
the whole global batch (all ranks, all micro-batches):

    L = L_text_sum / N_text + alpha · L_img_sum / N_img

so accumulating gradients over micro-batches and averaging over ranks gives the gradient of one big
batch. `reference_vdep_sum` is the ground truth that any fused kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..conventions import IGNORE_INDEX


def text_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised text tokens.

    Only the hidden states that predict a supervised token go through the LM head, so the logits
    tensor is (N_text, V), not (B, T, V). With no supervised token the selection is empty and the
    result is a zero still connected to `hidden` and `lm_head`.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, targets[selected], reduction="sum")


def normalise_rows(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "layernorm":
        return F.layer_norm(x, (x.shape[-1],))
    if how == "l2":
        return F.normalize(x, dim=-1)
    return x


def reference_vdep_sum(
    hidden: torch.Tensor,
    embeds: torch.Tensor,
    image_targets: torch.Tensor,
    head: nn.Module,
    target_norm: str = "none",
    detach_target: bool = True,
) -> torch.Tensor:
    """sum over t in I' of (1/D)·||head(h_{t-1}) - sg(e_t)||², computed in fp32.

    hidden: (B, T, D) last-layer hidden states; embeds: (B, T, D) the LLM's input embeddings, which
    hold the projector outputs e_t at image positions; image_targets: (B, T) bool, I', never true at
    position 0 (which has no predecessor; `supervised_image_positions` guarantees it). An empty I'
    gives a zero connected to `hidden` (ZeRO-3 needs the backward hooks to fire on every rank).
    """
    predictors = image_targets[:, 1:]
    prediction = head(hidden[:, :-1][predictors]).float()
    target = embeds[image_targets].float()
    if detach_target:
        target = target.detach()
    prediction = normalise_rows(prediction, target_norm)
    target = normalise_rows(target, target_norm)
    return (prediction - target).pow(2).mean(dim=-1).sum()


class LossSums(NamedTuple):
    """One micro-batch's contribution on one rank (a NamedTuple so ZeRO-3's hooks see its tensors)."""

    text: torch.Tensor  # summed cross-entropy (graph)
    vdep: torch.Tensor  # summed reconstruction error (graph)
    hidden_norm: torch.Tensor  # sum of ||h_{t-1}|| over image positions of all image rows (no graph)
    target_norm: torch.Tensor  # sum of ||e_t|| over the same positions (no graph)
    probes: torch.Tensor | None = None  # `probes.probe_sums` over the same positions (no graph)


@dataclass(frozen=True)
class GlobalCounts:
    """Token counts of the whole global batch: the normalisers of the two terms."""

    text: int
    image: int


def batch_loss(sums: LossSums, counts: GlobalCounts, alpha: float) -> torch.Tensor:
    """This micro-batch's share of L. Summed over micro-batches and ranks, it is exactly L."""
    return sums.text / max(counts.text, 1) + alpha * sums.vdep / max(counts.image, 1)
