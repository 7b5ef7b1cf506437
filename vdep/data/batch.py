"""Preprocessed samples and the padded micro-batch the model reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import torch

from ..conventions import IGNORE_INDEX
from .anyres import VIEWS_COLUMN, ImageTokens, layout_tensor


def sample_id(shard: int, key: str) -> int:
    """A sample's identity within a stage: 63 bits of a hash of its shard's number in the stage's list of shards
    and its key (the same in every process and run, unlike `hash`; not the shard's path, so that the same data
    in another folder, or behind a URL, draws the same). What the VDEP modes are drawn from, so that they do
    not depend on which rank, micro-batch or slot a sample lands in (objectives/modes.py)."""
    digest = hashlib.blake2b(f"{shard}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class ProcessedSample:
    key: str
    input_ids: torch.Tensor  # (T,) int64, `<image>` already expanded into placeholder ids
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where not supervised
    # (V, 3, H, W): every view of the sample's images and videos in marker order (one per image unless
    # tiled, one per video frame); uint8 from the loader (normalised on the device), float32 when already
    # normalised; None for a text-only sample
    pixel_values: torch.Tensor | None
    sample_id: int = 0  # `sample_id(shard number, key)`; the stream sets it (dataset.ShardStream)
    images: list[ImageTokens] = field(default_factory=list)  # how each image's views become its tokens


@dataclass
class Batch:
    """One micro-batch of S samples in R right-padded rows.

    Unpacked, every row is one sample (R = S). Packed, a row holds several samples one after the
    other; `sample_index` says which sample each token belongs to and `position_ids` restart at 0 for
    each sample, which is what confines attention to the sample (transformers builds a block-diagonal
    mask from them, or flash-attn's varlen kernel uses them). Samples are numbered in the order their
    tokens appear (row by row), and images are in that order too, as the model scatters them.
    """

    input_ids: torch.Tensor  # (R, T)
    labels: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T), 1 for real tokens
    # (max(1, n_views), 3, H, W): every image's views (one per image unless tiled or a video); a micro-batch
    # without images carries one zero image, which the model runs through the vision tower and projector
    # anyway (ZeRO-3 needs every rank to). uint8 pixels come with `pixel_table`, with which the model
    # normalises them on the device.
    pixel_values: torch.Tensor
    has_image: torch.Tensor  # (S,) bool
    keys: list[str]  # (S,)
    sample_index: torch.Tensor  # (R, T) int64: the token's sample, -1 for padding
    position_ids: torch.Tensor | None = None  # (R, T) when packed; None: 0..T-1 in every row
    pixel_table: torch.Tensor | None = None  # (3, 256) float32 when pixel_values are uint8
    # Samples the producing loader worker skipped since its previous batch, by reason, and a few
    # messages naming them. Filled by the loader; empty elsewhere.
    skipped: dict[str, int] = field(default_factory=dict)
    skip_messages: list[str] = field(default_factory=list)
    # Shards found shorter than sizes.json says since the previous batch: location → (listed, held).
    shortfalls: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Where the producing consumer resumes after this batch (a dataset.ConsumerState, filled by the loader).
    consumer: int = 0
    resume_position: object = None
    sample_ids: torch.Tensor | None = None  # (S,) int64, each sample's `sample_id`
    # (n_images, ImageTokens.FIELDS) int64: each image's views and tokens, in token order (data/anyres.py), and
    # (n_images,) the sample each belongs to. None: one view per image sample (a batch built by hand).
    image_layout: torch.Tensor | None = None
    image_samples: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def sample_lengths(self) -> torch.Tensor:
        """(S,) real tokens of each sample."""
        real = self.sample_index[self.sample_index >= 0]
        return torch.bincount(real, minlength=self.num_samples)

    @property
    def num_images(self) -> int:
        """Images and videos (a sample may hold several)."""
        return int(self.image_layout.shape[0]) if self.image_layout is not None else int(self.has_image.sum())

    @property
    def num_views(self) -> int:
        """Rows of `pixel_values` that are real views (the rest is the zero image of a batch without any)."""
        return int(self.image_layout[:, VIEWS_COLUMN].sum()) if self.image_layout is not None else self.num_images

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if f.name == "pixel_values" and dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[f.name] = value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if isinstance(value, torch.Tensor):
                pinned[name] = value.pin_memory()
        return Batch(**pinned)


def collate(samples: list[ProcessedSample], pad_token_id: int, image_size: tuple[int, int],
            pixel_table: torch.Tensor | None = None) -> Batch:
    """One sample per row."""
    return _fill_rows([[s] for s in samples], pad_token_id, image_size, False, pixel_table)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, no row longer than `capacity` tokens.

    Deterministic (ties keep the input order); rows come out in the order they were opened.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > capacity:
            raise ValueError(f"a sample of {lengths[index]} tokens cannot be packed into rows of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def collate_packed(samples: list[ProcessedSample], pad_token_id: int, image_size: tuple[int, int], capacity: int,
                   pixel_table: torch.Tensor | None = None) -> Batch:
    """The same samples in as few rows of at most `capacity` tokens as first-fit decreasing finds."""
    rows = pack_rows([len(s.input_ids) for s in samples], capacity)
    return _fill_rows([[samples[i] for i in row] for row in rows], pad_token_id, image_size, True, pixel_table)


def _fill_rows(rows: list[list[ProcessedSample]], pad_token_id: int, image_size: tuple[int, int], packed: bool,
               pixel_table: torch.Tensor | None) -> Batch:
    length = max(sum(len(s.input_ids) for s in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    ordered: list[ProcessedSample] = []  # samples in token order: row by row, left to right
    for row, members in enumerate(rows):
        start = 0
        for sample in members:
            end = start + len(sample.input_ids)
            input_ids[row, start:end] = sample.input_ids
            labels[row, start:end] = sample.labels
            # A sample's first token has no predecessor in the sample: never a target, as at position 0.
            labels[row, start] = IGNORE_INDEX
            attention_mask[row, start:end] = 1
            sample_index[row, start:end] = len(ordered)
            position_ids[row, start:end] = torch.arange(end - start)
            ordered.append(sample)
            start = end
        # Padding continues as one more run of positions, so it forms its own block, apart from every sample.
        position_ids[row, start:] = torch.arange(length - start)
    images = [s.pixel_values for s in ordered if s.pixel_values is not None]
    pixel_dtype = torch.uint8 if pixel_table is not None else torch.float32
    pixel_values = torch.cat(images) if images else torch.zeros((1, 3, *image_size), dtype=pixel_dtype)
    layouts = [image for s in ordered for image in s.images]
    owners = [number for number, s in enumerate(ordered) for _ in s.images]
    if pixel_values.dtype == torch.uint8 and pixel_table is None:
        raise ValueError("uint8 pixel values need the normalisation table (ImageProcessing.normalisation_table())")
    has_image = torch.tensor([s.pixel_values is not None for s in ordered], dtype=torch.bool)
    return Batch(input_ids, labels, attention_mask, pixel_values, has_image, [s.key for s in ordered], sample_index,
                 position_ids if packed else None, pixel_table if pixel_values.dtype == torch.uint8 else None,
                 sample_ids=torch.tensor([s.sample_id for s in ordered], dtype=torch.long),
                 image_layout=layout_tensor(layouts), image_samples=torch.tensor(owners, dtype=torch.long))
