"""What each token of a micro-batch is trained on, once the samples' modes are known.

Given a collated micro-batch and each row's mode, this builds the model's inputs:
- `text_labels`: the template's labels, blanked for VDEP-mode rows unless `text_loss_in_vdep_mode`;
- `image_targets`: the set I' of docs/vdep.md for VDEP-mode samples: image placeholder positions `t`
  whose predecessor `t-1` belongs to the same sample (minus each span's first position with
  `skip_first_image_token`); the hidden state at `t-1` is trained to predict the embedding at `t`;
- `image_positions`: the same positions for every image sample, whatever its mode, only for the logged
  norms of h and e (their ratio is what `alpha` has to balance);
- for `layout: text_first`, each VDEP-mode sample is reordered so that all its text precedes its image.
Modes are per sample; in a packed row (several samples, see data/batch.py) everything above is
applied per sample through the batch's `sample_index`. Everything here runs on CPU tensors before
the batch moves to the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import VdepConfig
from ..conventions import IGNORE_INDEX
from ..data.anyres import NEWLINE_COLUMN, VIEWS_COLUMN, ImageTokens
from ..data.batch import Batch


class ModelInputs(NamedTuple):
    """The model's forward input. A NamedTuple, not a dataclass, so that DeepSpeed's ZeRO-3 hooks
    can find the tensors in it (they look into tuples, lists and dicts only)."""

    input_ids: torch.Tensor  # (B, T)
    # (B, T) 1 for real tokens, or None for a packed batch, whose `position_ids` confine attention
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor  # (max(1, views), 3, H, W): every image's views (one each unless tiled or a video)
    num_images: int  # images and videos
    text_labels: torch.Tensor  # (B, T), IGNORE_INDEX where no text loss
    image_targets: torch.Tensor  # (B, T) bool: I' of VDEP-mode rows
    image_positions: torch.Tensor  # (B, T) bool: I' of all image rows (statistics only)
    # (max(1, views),) bool per row of pixel_values: feed this view's embeddings to the LLM without gradient
    # (the views of VDEP-mode samples' images when `detach_input` is on).
    detached_images: torch.Tensor
    position_ids: torch.Tensor | None = None  # (B, T) restarting at 0 for each sample of a packed row
    pixel_table: torch.Tensor | None = None  # (3, 256) when pixel_values are uint8 (normalised in the model)
    # (num_images, ImageTokens.FIELDS) int64: how each image's views become its tokens; None: one view of the
    # tower's tokens per image (LLaVA-1.5)
    image_layout: torch.Tensor | None = None

    @property
    def num_text_targets(self) -> int:
        """Supervised text tokens: labels after the first position (position 0 has no predecessor)."""
        return int((self.text_labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_image_targets(self) -> int:
        return int(self.image_targets.sum())

    def to(self, device: torch.device, float_dtype: torch.dtype) -> ModelInputs:
        return ModelInputs(*(
            value.to(device, dtype=float_dtype if value.is_floating_point() else None, non_blocking=True)
            if isinstance(value, torch.Tensor) else value
            for value in self
        ))


def text_first_order(input_ids: torch.Tensor, sample_index: torch.Tensor, image_token_id: int,
                     reordered: torch.Tensor) -> torch.Tensor:
    """Per row, the stable order that puts every text token of a `reordered` sample before its image
    placeholders; samples keep their places (and padding stays last)."""
    length = input_ids.shape[1]
    position = torch.arange(length).expand_as(input_ids)
    move = (input_ids == image_token_id) & reordered
    block = torch.where(sample_index >= 0, sample_index, sample_index.max() + 1)
    key = block * (2 * length) + length * move.long() + position
    return torch.argsort(key, dim=1)


def supervised_image_positions(input_ids: torch.Tensor, sample_index: torch.Tensor, image_token_id: int,
                               skip_first: bool) -> torch.Tensor:
    """I': image positions whose previous position exists and belongs to the same sample."""
    is_image = input_ids == image_token_id
    has_previous = torch.zeros_like(is_image)
    has_previous[:, 1:] = (sample_index[:, 1:] == sample_index[:, :-1]) & (sample_index[:, 1:] >= 0)
    positions = is_image & has_previous
    if skip_first:
        first_of_span = is_image.clone()
        first_of_span[:, 1:] &= ~(is_image[:, :-1] & has_previous[:, 1:])
        positions &= ~first_of_span
    return positions


def image_newline_positions(input_ids: torch.Tensor, image_token_id: int, layout: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: the placeholders that hold an `image_newline` (data/anyres.py: `ImageTokens.newline_mask`).
    Images' tokens are contiguous and in the order of `layout`'s rows, which a text_first reordering keeps."""
    newline = torch.zeros_like(input_ids, dtype=torch.bool)
    if layout is None or not bool(layout[:, NEWLINE_COLUMN].any()):
        return newline
    masks = [ImageTokens.from_row(row).newline_mask() for row in layout.tolist()]
    newline[input_ids == image_token_id] = torch.cat(masks)
    return newline


def prepare_inputs(batch: Batch, vdep_mode: torch.Tensor, config: VdepConfig, image_token_id: int, num_image_tokens: int) -> ModelInputs:
    """Apply the samples' modes (bool per sample, in the batch's sample order) to a micro-batch."""
    placeholders = int((batch.input_ids == image_token_id).sum())
    layout = batch.image_layout
    expected = (sum(ImageTokens.from_row(row).tokens for row in layout.tolist()) if layout is not None
                else batch.num_images * num_image_tokens)
    if placeholders != expected:
        raise ValueError(
            f"micro-batch {batch.keys}: {placeholders} image placeholders for {batch.num_images} image(s) of "
            f"{expected} tokens in all"
        )  # the data path guarantees this; a mismatch is a vdep bug
    input_ids, labels = batch.input_ids, batch.labels
    sample_index = batch.sample_index
    in_sample = sample_index >= 0
    vdep_tokens = in_sample & vdep_mode[sample_index.clamp(min=0)]  # (B, T): token of a VDEP-mode sample
    if config.layout == "text_first" and bool(vdep_mode.any()):
        order = text_first_order(input_ids, sample_index, image_token_id, vdep_tokens)
        input_ids, labels = torch.gather(input_ids, 1, order), torch.gather(labels, 1, order)
    text_labels = labels.clone()
    # A sample's first token has no predecessor in the sample (after a text_first reordering too).
    first = in_sample.clone()
    first[:, 1:] &= sample_index[:, 1:] != sample_index[:, :-1]
    text_labels[first] = IGNORE_INDEX
    if not config.text_loss_in_vdep_mode:
        text_labels[vdep_tokens] = IGNORE_INDEX
    image_positions = supervised_image_positions(input_ids, sample_index, image_token_id, config.skip_first_image_token)
    # An image_newline is a learned constant, not the image: no target (docs/vdep.md, "AnyRes").
    image_positions &= ~image_newline_positions(input_ids, image_token_id, layout)
    detached_images = torch.zeros(batch.pixel_values.shape[0], dtype=torch.bool)
    if config.detach_input and batch.num_images:
        detached_images[: batch.num_views] = vdep_mode[view_samples(batch)]
    return ModelInputs(
        input_ids=input_ids,
        attention_mask=None if batch.packed else batch.attention_mask,
        pixel_values=batch.pixel_values,
        num_images=batch.num_images,
        text_labels=text_labels,
        image_targets=image_positions & vdep_tokens,
        image_positions=image_positions,
        detached_images=detached_images,
        position_ids=batch.position_ids,
        pixel_table=batch.pixel_table,
        image_layout=layout,
    )


def view_samples(batch: Batch) -> torch.Tensor:
    """(n_views,) the sample each row of `pixel_values` belongs to."""
    if batch.image_layout is None:
        return torch.nonzero(batch.has_image).flatten()
    return torch.repeat_interleave(batch.image_samples, batch.image_layout[:, VIEWS_COLUMN])
