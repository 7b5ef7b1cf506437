"""From tar shards to collated micro-batches: one consumer's stream.

Each DataLoader worker of each rank is one consumer. It reads the shards its plan names, shuffles raw
samples in a seeded buffer, and only then decodes them (decode after shuffle: the buffer holds bytes,
not tensors). A sample that cannot be used raises `SampleError` during preprocessing; the stream counts
it by reason, keeps a few messages that name it, and moves on. The counts travel with the next batch,
so the trainer can log and total them.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .batch import Batch, ProcessedSample, collate, collate_packed
from .conversation import SampleError, check_image_markers, parse_conversation
from .images import ImageProcessing, decode_image, image_pixels
from .shards import Shard, plan_epoch
from .templates import IGNORE_INDEX, ConversationTemplate, TemplateTokenizer, TokenizedConversation

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Skip messages kept per batch; the counts are always complete.
MAX_MESSAGES_PER_BATCH = 5


class SamplePreprocessor:
    """A raw tar sample (`__key__`, `json`, optional image bytes) → a `ProcessedSample`."""

    def __init__(
        self,
        template: ConversationTemplate,
        encoder: TemplateTokenizer,
        image_processing: ImageProcessing,
        max_length: int,
    ):
        self.template = template
        self.encoder = encoder
        self.image_processing = image_processing
        self.max_length = max_length

    def __call__(self, raw: dict[str, Any]) -> ProcessedSample:
        key = raw["__key__"]
        if "json" not in raw:
            raise SampleError("bad_json", "the sample has no .json member")
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SampleError("bad_json", f"the .json member is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise SampleError("bad_json", "the .json member must be an object with 'conversations'")
        turns = parse_conversation(meta.get("conversations"))
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        has_image = image_bytes is not None
        check_image_markers(turns, has_image)
        pixel_values = image_pixels(decode_image(image_bytes), self.image_processing) if has_image else None
        tokens = self.encoder.encode(self.template.segments(turns, has_image))
        tokens = truncate(tokens, self.max_length, self.encoder.image_token_id)
        if all(label == IGNORE_INDEX for label in tokens.labels):
            raise SampleError("no_supervised_tokens", "no token of the sample is supervised")
        return ProcessedSample(
            key=key,
            input_ids=torch.tensor(tokens.input_ids, dtype=torch.long),
            labels=torch.tensor(tokens.labels, dtype=torch.long),
            pixel_values=pixel_values,
        )


def truncate(tokens: TokenizedConversation, max_length: int, image_token_id: int) -> TokenizedConversation:
    """Cut a too-long sample to `max_length`, never inside the image placeholders."""
    if len(tokens.input_ids) <= max_length:
        return tokens
    image_positions = [i for i, t in enumerate(tokens.input_ids) if t == image_token_id]
    if image_positions and image_positions[-1] >= max_length:
        raise SampleError(
            "too_long",
            f"{len(tokens.input_ids)} tokens with image placeholders up to position {image_positions[-1]}; "
            f"cutting to max_length={max_length} would cut the image",
        )
    return TokenizedConversation(tokens.input_ids[:max_length], tokens.labels[:max_length])


def buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Seeded reservoir-style shuffle: fill a buffer, then emit a random element for each new one."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class Batching:
    """How a consumer turns preprocessed samples into micro-batches."""

    micro_batch_size: int
    pad_token_id: int
    image_size: tuple[int, int]
    pixel_table: torch.Tensor | None = None  # (3, 256): normalises the uint8 pixels on the device
    packing: bool = False
    pack_capacity: int = 0  # tokens per packed row (data.max_length)
    group_by_modality_length: bool = False
    group_window: int = 1  # micro-batches per grouping window

    @property
    def window_batches(self) -> int:
        return self.group_window if self.group_by_modality_length else 1

    def collate(self, samples: list[ProcessedSample]) -> Batch:
        if self.packing:
            return collate_packed(samples, self.pad_token_id, self.image_size, self.pack_capacity, self.pixel_table)
        return collate(samples, self.pad_token_id, self.image_size, self.pixel_table)

    def arrange(self, window: list[ProcessedSample], rng: random.Random) -> list[list[ProcessedSample]]:
        """A full window's samples as micro-batches.

        Without grouping, in arrival order. With grouping (LLaVA's group_by_modality_length), samples
        are sorted by modality then length, cut into micro-batches, and the batches shuffled: every
        micro-batch holds one modality of similar lengths, except at most one that takes the
        remainders of both modalities.
        """
        size = self.micro_batch_size
        if not self.group_by_modality_length:
            return [window[i : i + size] for i in range(0, len(window), size)]
        ordered = sorted(window, key=lambda s: (s.pixel_values is None, -len(s.input_ids)))
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        rng.shuffle(batches)
        return batches


class ShardStream(IterableDataset):
    """The micro-batches of one rank for one epoch; DataLoader workers split the rank's share.

    Data position. A consumer's stream is: its plan's raw samples → seeded shuffle buffer → windows
    of `window_batches × micro_batch_size` usable samples → micro-batches. After each micro-batch the
    consumer records where it would resume: (shuffled raw samples before the current window, batches
    of that window already given out). Restoring replays the raw stream up to that point without
    decoding anything (tar reading and the shuffle only), preprocesses the one window again and
    drops its batches already given out; the result is exactly the stream an uninterrupted run
    continues with. DataLoader workers take turns, so the restored loader also starts with the
    consumer whose turn was next (`first_consumer`).
    """

    def __init__(
        self,
        shards: list[Shard],
        preprocess: SamplePreprocessor,
        batching: Batching,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        split: str,
        shuffle_buffer: int,
    ):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.batching = batching
        self.rank = rank
        self.world_size = world_size
        self.workers_per_rank = max(num_workers, 1)
        self.seed = seed
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.start_positions: dict[int, tuple[int, int]] = {}  # local consumer → resume position
        self.first_consumer = 0

    @property
    def micro_batch_size(self) -> int:
        return self.batching.micro_batch_size

    @property
    def num_consumers(self) -> int:
        return self.world_size * self.workers_per_rank

    def set_epoch(self, epoch: int, positions: dict[int, tuple[int, int]] | None = None, first_consumer: int = 0) -> None:
        self.epoch = epoch
        self.start_positions = dict(positions or {})
        self.first_consumer = first_consumer

    def raw_samples(self, consumer: int) -> Iterator[dict]:
        """The consumer's raw (undecoded) samples in shuffled order, with tar errors counted."""
        plan = plan_epoch(self.shards, self.seed, self.epoch, self.num_consumers, self.split)[consumer]
        raw = wds.tariterators.tarfile_samples(({"url": s.path} for s in plan.shards), handler=self._on_tar_error)
        mine = (sample for index, sample in enumerate(raw) if index % plan.stride == plan.offset)
        if plan.limit is not None:
            mine = itertools.islice(mine, plan.limit)
        rng = random.Random(f"vdep-samples-{self.seed}-{self.epoch}-{consumer}")
        return buffer_shuffle(mine, self.shuffle_buffer, rng)

    def _on_tar_error(self, exc: Exception) -> bool:
        self._skipped["bad_tar"] += 1
        if len(self._messages) < MAX_MESSAGES_PER_BATCH:
            self._messages.append(f"unreadable tar data: {exc}")
        return True  # keep reading

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.first_consumer) % self.workers_per_rank
        consumer = self.rank * self.workers_per_rank + local
        window_start, drop = self.start_positions.get(local, (0, 0))
        self._skipped: Counter[str] = Counter()
        self._messages: list[str] = []
        batching = self.batching
        window_size = batching.window_batches * batching.micro_batch_size
        raw = self.raw_samples(consumer)
        for _ in itertools.islice(raw, window_start):  # replay without decoding
            pass
        self._skipped.clear()  # tar errors met while replaying were reported by the original run
        self._messages.clear()
        position = window_start
        window: list[ProcessedSample] = []
        for sample in raw:
            position += 1
            try:
                window.append(self.preprocess(sample))
            except SampleError as exc:
                self._skipped[exc.reason] += 1
                if len(self._messages) < MAX_MESSAGES_PER_BATCH:
                    self._messages.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {exc} [{exc.reason}]")
                continue
            if len(window) < window_size:
                continue
            yield from self._emit(window, consumer, local, window_start, position, drop)
            window, window_start, drop = [], position, 0
        full = len(window) - len(window) % batching.micro_batch_size  # the last window may be short
        if full:
            yield from self._emit(window[:full], consumer, local, window_start, position, drop)

    def _emit(self, window: list[ProcessedSample], consumer: int, local: int, window_start: int, position: int,
              drop: int) -> Iterator[Batch]:
        rng = random.Random(f"vdep-groups-{self.seed}-{self.epoch}-{consumer}-{window_start}")
        batches = self.batching.arrange(window, rng)
        for index, members in enumerate(batches):
            if index < drop:  # given out before the checkpoint, with the window's skip counts
                self._skipped.clear()
                self._messages.clear()
                continue
            batch = self.batching.collate(members)
            batch.skipped, batch.skip_messages = dict(self._skipped), list(self._messages)
            self._skipped.clear()
            self._messages.clear()
            batch.consumer = local
            done = index + 1 == len(batches)
            batch.resume_position = (position, 0) if done else (window_start, index + 1)
            yield batch
