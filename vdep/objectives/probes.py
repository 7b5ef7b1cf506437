"""The VDEP probes: numbers that show the image term's failure mode (docs/vdep.md, "Observed behaviour").

The image term is easiest to satisfy by making the image embeddings alike. Two numbers show it, measured
at the positions I' of *all* image samples whatever their mode (so a VDEP-off run logs them too, as a
baseline), on the targets e_t and the predictions head(h_{t-1}) after the term's `target_norm`:
- `probe/reconstruction_cosine`: the mean cos(prediction, target); rising towards 1 while the targets'
  spread falls is the prediction getting easy because there is nothing left to predict;
- the spread of the targets: `probe/target_pairwise_cosine`, the mean cosine between two different e_t
  (1 when all targets point the same way: collapse), and `probe/target_variance`, the per-dimension
  variance of e_t averaged over dimensions (0 at collapse; in the units of ‖e‖²/D, so it also grows
  when the embeddings just grow), and `probe/target_relative_variance`, the same as a share of the mean
  ‖e‖² (D·variance / E‖e‖² = 1 − ‖E e‖² / E‖e‖², in [0, 1], scale-free: 0 at collapse).

A micro-batch contributes sums that add up across micro-batches, steps and ranks: Σcos, Σ‖e‖², Σe/‖e‖
and Σe (two vectors of the hidden size). The mean pairwise cosine of N unit vectors u_i is exactly
(‖Σu‖² − N) / (N(N − 1)), so the logged value is over all targets of the logging interval on all ranks
(one global batch when `run.log_every` is 1), with one all-reduce of a 2·D + 2 vector at logging time
and none per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import normalise_rows


@torch.no_grad()
def probe_sums(hidden: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, head: nn.Module,
               target_norm: str) -> torch.Tensor:
    """[Σcos, Σ‖e‖², Σe/‖e‖ (D), Σe (D)] over `positions` (B, T bool, never true at position 0), fp32.

    Called on every rank at every micro-batch, with an empty selection too (the head runs on zero rows):
    under ZeRO-3 a rank must not skip a module the others run.
    """
    prediction = normalise_rows(head(hidden[:, :-1][positions[:, 1:]]).float(), target_norm)
    target = normalise_rows(embeds[positions].float(), target_norm)
    cosine = F.cosine_similarity(prediction, target, dim=-1).sum()
    squares = target.pow(2).sum()
    return torch.cat([torch.stack([cosine, squares]), F.normalize(target, dim=-1).sum(0), target.sum(0)])


def probe_scalars(sums: torch.Tensor, count: int) -> dict[str, float]:
    """The logged probes from the summed vector of `probe_sums` over `count` positions."""
    if count < 2 or sums.numel() < 4:  # no pair of targets in the interval (text-only steps): nothing to say
        return {}
    cosine, squares = float(sums[0]), float(sums[1])
    size = (sums.numel() - 2) // 2
    directions, total = sums[2 : 2 + size], sums[2 + size :]
    pairwise = (float(directions.pow(2).sum()) - count) / (count * (count - 1))
    mean = total / count
    variance = (squares / count - float(mean.pow(2).sum())) / size
    variance = max(variance, 0.0)  # rounding can leave a tiny negative at collapse
    return {
        "probe/reconstruction_cosine": cosine / count,
        "probe/target_pairwise_cosine": pairwise,
        "probe/target_variance": variance,
        # the share of E‖e‖² that is spread rather than the common mean: scale-free, 0 at collapse
        "probe/target_relative_variance": variance * size / max(squares / count, 1e-30),
    }
