"""Planning one optimizer step over the whole global batch.

Before any forward pass of a step, the ranks exchange one small tensor each: whether they have a full
share of the global batch, whether taking it failed, their token statistics, and per sample slot whether
it holds an image and which sample it is. From that, every rank computes the same VDEP-mode assignment (a
function of seed, step and the samples: objectives/modes.py), builds its micro-batches' model inputs, and
one all-reduce gives the global token counts N_text and N_img that normalise the loss. If any rank ran out
of data, every rank learns it at the same step and the epoch ends everywhere at once; if taking the data
failed on a rank (a shard it cannot read), every rank stops with that rank's error (train/together.py):
no rank is left waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batch import Batch
from ..objectives.losses import GlobalCounts
from ..objectives.objective import VdepObjective
from ..objectives.supervision import ModelInputs
from .distributed import all_gather_rows, all_reduce_sum, current_rank
from .together import raise_together

# Layout of the per-rank row exchanged at the start of a step.
_READY, _FAILED, _TOKENS, _SQUARED_LENGTHS, _VIEWS = 0, 1, 2, 3, 4
_HEADER = 5  # then one has-image flag per sample slot, then one sample id per slot


@dataclass
class StepPlan:
    inputs: list[ModelInputs]  # this rank's micro-batches, on CPU
    counts: GlobalCounts  # N_text and N_img of the global batch
    samples: int  # global batch: samples,
    image_samples: int  # ... of which with an image,
    vdep_samples: int  # ... of which in VDEP mode,
    tokens: int  # ... real tokens,
    squared_lengths: int  # ... the sum of squared sequence lengths (attention FLOPs),
    views: int  # ... and the views through the vision tower (an AnyRes image's base and tiles, a video's frames)


def plan_step(
    micro_batches: list[Batch],
    *,
    step: int,
    micro_batches_per_step: int,
    slots_per_rank: int,
    objective: VdepObjective,
    device: torch.device,
    error: BaseException | None = None,
) -> StepPlan | None:
    """Collective. None when some rank has no full share (`micro_batches_per_step` micro-batches) left in this
    epoch: the same answer on every rank. `error`: taking this rank's micro-batches failed; then every rank
    raises (together.raise_together)."""
    row = torch.zeros(_HEADER + 2 * slots_per_rank, dtype=torch.long)
    ready = error is None and len(micro_batches) == micro_batches_per_step
    row[_FAILED] = int(error is not None)
    if ready:
        lengths = torch.cat([b.sample_lengths() for b in micro_batches])  # per sample, packed or not
        row[_READY] = 1
        row[_TOKENS] = int(lengths.sum())
        row[_SQUARED_LENGTHS] = int((lengths * lengths).sum())
        row[_VIEWS] = sum(b.num_views for b in micro_batches)
        row[_HEADER : _HEADER + slots_per_rank] = torch.cat([b.has_image for b in micro_batches]).long()
        row[_HEADER + slots_per_rank :] = torch.cat([b.sample_ids for b in micro_batches])  # type: ignore[misc]
    table = all_gather_rows(row.to(device)).cpu()
    if bool(table[:, _FAILED].any()):
        raise_together(error)
    if not bool(table[:, _READY].all()):
        return None
    has_image = table[:, _HEADER : _HEADER + slots_per_rank].bool()
    sample_ids = table[:, _HEADER + slots_per_rank :]
    modes = objective.modes(has_image.flatten(), sample_ids.flatten(), step).view_as(has_image)
    my_modes = modes[current_rank()]
    inputs = []
    offset = 0
    for batch in micro_batches:
        samples = batch.num_samples
        inputs.append(objective.prepare(batch, my_modes[offset : offset + samples]))
        offset += samples
    local = torch.tensor([sum(i.num_text_targets for i in inputs), sum(i.num_image_targets for i in inputs)])
    text, image = all_reduce_sum(local.to(device)).cpu().tolist()
    return StepPlan(
        inputs=inputs,
        counts=GlobalCounts(text=int(text), image=int(image)),
        samples=has_image.numel(),
        image_samples=int(has_image.sum()),
        vdep_samples=int(modes.sum()),
        tokens=int(table[:, _TOKENS].sum()),
        squared_lengths=int(table[:, _SQUARED_LENGTHS].sum()),
        views=int(table[:, _VIEWS].sum()),
    )
