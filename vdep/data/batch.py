"""Preprocessed samples and the padded micro-batch the model reads."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .templates import IGNORE_INDEX


@dataclass
class ProcessedSample:
    key: str
    input_ids: torch.Tensor  # (T,) int64, `<image>` already expanded into placeholder ids
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where not supervised
    pixel_values: torch.Tensor | None  # (3, H, W) float32, or None for a text-only sample


@dataclass
class Batch:
    """One micro-batch, right-padded. Rows are samples; images are in row order."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    # (max(1, n_images), 3, H, W): a micro-batch without images carries one zero image, which the
    # model runs through the vision tower and projector anyway (ZeRO-3 needs every rank to).
    pixel_values: torch.Tensor
    has_image: torch.Tensor  # (B,) bool
    keys: list[str]
    # Samples the producing loader worker skipped since its previous batch, by reason, and a few
    # messages naming them. Filled by the loader; empty elsewhere.
    skipped: dict[str, int] = field(default_factory=dict)
    skip_messages: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.has_image.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if f.name == "pixel_values" and dtype is not None:
                    value = value.to(dtype)
            moved[f.name] = value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if isinstance(value, torch.Tensor):
                pinned[name] = value.pin_memory()
        return Batch(**pinned)


def collate(samples: list[ProcessedSample], pad_token_id: int, image_size: tuple[int, int]) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        attention_mask[row, :n] = 1
    images = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixel_values = torch.stack(images) if images else torch.zeros((1, 3, *image_size))
    has_image = torch.tensor([s.pixel_values is not None for s in samples], dtype=torch.bool)
    return Batch(input_ids, labels, attention_mask, pixel_values, has_image, [s.key for s in samples])
