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
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..conventions import IGNORE_INDEX, round_half_up
from .anyres import ImageGeometry, MediaProcessor
from .batch import Batch, ProcessedSample, collate, collate_packed, sample_id
from .conversation import SampleError, check_image_markers, parse_conversation
from .images import ImageProcessing
from .media import decode_media, media_entries
from .remainder import EpochRemainder
from .remote import RemoteSettings
from .shards import Shard, plan_epoch
from .stream import ShardEvents, ShuffledStream, SourcePosition, StreamState
from .tar_reader import SampleRef
from .templates import ConversationTemplate, TemplateTokenizer, TokenizedConversation

# Skip messages kept per batch; the counts are always complete.
MAX_MESSAGES_PER_BATCH = 5


class SamplePreprocessor:
    """A raw tar sample (`__key__`, `json`, its image/video members) → a `ProcessedSample`."""

    def __init__(
        self,
        template: ConversationTemplate,
        encoder: TemplateTokenizer,
        media: MediaProcessor | ImageProcessing,
        max_length: int,
    ):
        self.template = template
        self.encoder = encoder
        # An `ImageProcessing` alone is LLaVA-1.5's rule: one view per image, `encoder.num_image_tokens` tokens each.
        self.media = media if isinstance(media, MediaProcessor) else single_view_media(media, encoder.num_image_tokens)
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
        entries = media_entries(meta, raw)
        check_image_markers(turns, images=len(entries))
        views = self.media(decode_media(entries, raw, key)) if entries else None
        image_tokens = [image.tokens for image in views.images] if views is not None else []
        tokens = self.encoder.encode(self.template.segments(turns, bool(entries)), image_tokens)
        tokens = truncate(tokens, self.max_length, self.encoder.image_token_id)
        # Through numpy: quicker than torch.tensor on a Python list (this runs once per sample).
        labels = torch.from_numpy(np.array(tokens.labels, dtype=np.int64))
        if not bool((labels != IGNORE_INDEX).any()):
            raise SampleError("no_supervised_tokens", "no token of the sample is supervised")
        return ProcessedSample(
            key=key, input_ids=torch.from_numpy(np.array(tokens.input_ids, dtype=np.int64)), labels=labels,
            pixel_values=views.pixels if views is not None else None,
            images=views.images if views is not None else [],
        )


def single_view_media(processing: ImageProcessing, tokens_per_view: int) -> MediaProcessor:
    """LLaVA-1.5's media rule (pad or square): one view per image of `tokens_per_view` tokens."""
    side = processing.output_size[0]
    geometry = ImageGeometry("pad" if processing.pad_to_square else "square", side, math.isqrt(tokens_per_view),
                             tokens_per_view)
    return MediaProcessor(geometry, processing)


def truncate(tokens: TokenizedConversation, max_length: int, image_token_id: int) -> TokenizedConversation:
    """Cut a too-long sample to `max_length`, never inside the image placeholders."""
    if len(tokens.input_ids) <= max_length:
        return tokens
    image_positions = [i for i, t in enumerate(tokens.input_ids) if t == image_token_id]
    if image_positions and image_positions[-1] >= max_length:  # every image's tokens, all of them, or the sample goes
        raise SampleError(
            "too_long",
            f"{len(tokens.input_ids)} tokens with image placeholders up to position {image_positions[-1]}; "
            f"cutting to max_length={max_length} would cut the image",
        )
    return TokenizedConversation(tokens.input_ids[:max_length], tokens.labels[:max_length])


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
    image_fraction: float = 0.5  # of the stage's samples (grouping sets each window's modality quotas from it)
    # Give out the stream's last samples as one smaller micro-batch (validation reads every sample; training
    # steps take full micro-batches only).
    keep_partial: bool = False

    @property
    def window_batches(self) -> int:
        return self.group_window if self.group_by_modality_length else 1

    # A consumer holds at most this many windows of samples (and at least 256 samples) for later
    # windows before it gives up aligning a window (see ShardStream): bounds memory when a consumer's
    # data is far off the mix (256 CLIP-336 images are ~90 MB of uint8 pixels).
    MAX_CARRY_WINDOWS = 4
    MIN_CARRY_SAMPLES = 256

    def collate(self, samples: list[ProcessedSample]) -> Batch:
        if self.packing:
            return collate_packed(samples, self.pad_token_id, self.image_size, self.pack_capacity, self.pixel_table)
        return collate(samples, self.pad_token_id, self.image_size, self.pixel_table)

    def image_batches(self, window: int) -> int:
        """Image micro-batches of window `window` (the same for every consumer): the running total
        follows the image fraction exactly, so the quotas never drift from the data's mix."""
        total = self.window_batches * self.image_fraction
        return round_half_up((window + 1) * total) - round_half_up(window * total)

    def layout(self, seed: int, epoch: int, window: int) -> list[bool]:
        """Which micro-batches of the window hold images (True) or text: one seeded order for all consumers."""
        images = self.image_batches(window)
        slots = [True] * images + [False] * (self.window_batches - images)
        random.Random(f"vdep-layout-{seed}-{epoch}-{window}").shuffle(slots)
        return slots


def by_length(samples: list[tuple[int, ProcessedSample]]) -> list[tuple[int, ProcessedSample]]:
    return sorted(samples, key=lambda item: (-len(item[1].input_ids), item[0]))


@dataclass(frozen=True)
class ConsumerState:
    """Where a consumer resumes: `read` shuffled raw samples consumed, of which those in `carry` (their
    index in the shuffled stream and their byte range) are held for a later window; `window` windows
    complete, `drop` batches of the next one given out; `stream`, the shuffled stream after `read`
    samples (stream.py). A position written by vdep 0.1 has no `stream` and no ranges: it is restored by
    replaying the stream from the epoch's start, without decoding."""

    read: int = 0
    carry: tuple[tuple[int, SampleRef | None], ...] = ()
    window: int = 0
    drop: int = 0
    stream: StreamState | None = field(default_factory=StreamState)

    def to_json(self) -> dict:
        return {"read": self.read, "carry": [[i, ref.to_json() if ref else None] for i, ref in self.carry],
                "window": self.window, "drop": self.drop,
                "stream": self.stream.to_json() if self.stream is not None else None}

    @classmethod
    def from_json(cls, data: dict | list) -> ConsumerState:
        if isinstance(data, list):  # vdep 0.1: [read, carried indices, window, drop]
            return cls(int(data[0]), tuple((int(i), None) for i in data[1]), int(data[2]), int(data[3]), None)
        carry = tuple((int(i), SampleRef.from_json(ref) if ref else None) for i, ref in data["carry"])
        stream = StreamState.from_json(data["stream"]) if data["stream"] is not None else None
        return cls(int(data["read"]), carry, int(data["window"]), int(data["drop"]), stream)


@dataclass
class StreamReport:
    """What a consumer met after its last micro-batch of the epoch (skipped samples, short shards): it
    ends the stream in place of a batch, and the loader hands it to the trainer aside (loader.py)."""

    consumer: int
    skipped: dict[str, int]
    skip_messages: list[str]
    shortfalls: dict[str, tuple[int, int]]


class ShardStream(IterableDataset):
    """The micro-batches of one rank for one epoch; DataLoader workers split the rank's share.

    A consumer's stream is: its plan's raw samples → seeded shuffle buffer → windows → micro-batches.
    A window is one micro-batch, or with `group_by_modality_length` `group_window` of them whose
    modalities follow a layout shared by every consumer of every rank (`Batching.layout`): the k-th
    micro-batch of every rank has the same modality, as with LLaVA's global grouping, and within a
    modality the samples are sorted by length. A consumer fills a window's image and text quotas from
    its stream; samples beyond a quota wait in a carry for the next window (never dropped). A consumer
    whose data strays far from the mix (say, shards sorted by modality) would carry without bound: past
    `MAX_CARRY_WINDOWS` windows (at least `MIN_CARRY_SAMPLES` samples) of carry it fills the window with
    what it has, oldest first (that window is grouped for this consumer only). At the end of the stream the rest is batched the same way.

    Data position. After each micro-batch the consumer records where it resumes (`ConsumerState`): the
    raw samples read and which of them are carried at the start of the current window (with their byte
    ranges), the shuffled stream's state there (stream.py: the plan's byte position, the shuffle buffer's
    samples by byte range, its RNG), the window's number and its batches already given out. Restoring
    reads the buffered and carried samples by range (one batch, few requests per remote shard) and the plan
    on from its byte, decodes only the carried samples, fills the window again and drops its batches already
    given out: exactly the stream an uninterrupted run continues with, and no consumed byte is read twice
    (but for the small gaps a remote batch reads, stream.py). DataLoader workers take
    turns, so the restored loader also starts with the consumer whose turn was next (`first_consumer`).

    After a resume on another number of consumers, the epoch's `remainder` (remainder.py) replaces the
    epoch's plans: each consumer reads its deal of what the checkpoint's consumers had not consumed.
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
        remote: RemoteSettings | None = None,
    ):
        super().__init__()
        self.shards = shards
        self._shard_numbers = {shard.path: number for number, shard in enumerate(shards)}
        self.preprocess = preprocess
        self.batching = batching
        self.rank = rank
        self.world_size = world_size
        self.workers_per_rank = max(num_workers, 1)
        self.seed = seed
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.remote = remote or RemoteSettings()
        self.epoch = 0
        self.start_positions: dict[int, ConsumerState] = {}  # local consumer → where it resumes
        self.first_consumer = 0
        self.remainder: EpochRemainder | None = None  # the epoch's rest after a change of consumers

    @property
    def micro_batch_size(self) -> int:
        return self.batching.micro_batch_size

    @property
    def num_consumers(self) -> int:
        return self.world_size * self.workers_per_rank

    def set_epoch(self, epoch: int, positions: dict[int, ConsumerState] | None = None, first_consumer: int = 0,
                  remainder: EpochRemainder | None = None) -> None:
        self.epoch = epoch
        self.start_positions = dict(positions or {})
        self.first_consumer = first_consumer
        self.remainder = remainder if remainder is not None and remainder.epoch == epoch else None

    def shuffled(self, consumer: int, state: StreamState | None, carried: tuple[SampleRef, ...] = ()) -> ShuffledStream:
        """The consumer's raw (undecoded) samples in shuffled order, from `state` on (None: the start); the
        `carried` samples are read with the stream's buffer (its `carried_samples`)."""
        events = ShardEvents(self._on_tar_error, self._on_short_shard)
        if self.remainder is not None:  # its own seed: a deal is not the epoch's plan
            start = None if state == StreamState() else state  # a consumer that has not begun its deal
            return ShuffledStream(self.remainder.plan(self, consumer), self.remote, self.shuffle_buffer,
                                  f"vdep-remainder-{self.seed}-{self.epoch}-{consumer}", events, start, carried)
        plan = plan_epoch(self.shards, self.seed, self.epoch, self.num_consumers, self.split)[consumer]
        return ShuffledStream(plan, self.remote, self.shuffle_buffer, f"vdep-samples-{self.seed}-{self.epoch}-{consumer}",
                              events, state, carried)

    def _on_tar_error(self, location: str, exc: Exception) -> None:
        self._skipped["bad_tar"] += 1
        if len(self._messages) < MAX_MESSAGES_PER_BATCH:
            self._messages.append(f"{location}: unreadable tar data ({exc}); the rest of this shard is not read")

    def _on_short_shard(self, location: str, expected: int, read: int) -> None:
        self._skipped["missing_from_shard"] += expected - read
        self._shortfalls[location] = (expected, read)
        if len(self._messages) < MAX_MESSAGES_PER_BATCH:
            self._messages.append(f"{location}: sizes.json lists {expected} samples, the shard held {read}; "
                                  f"{expected - read} are missing from this epoch")

    def _start_report(self) -> None:
        self._skipped: Counter[str] = Counter()
        self._messages: list[str] = []
        self._shortfalls: dict[str, tuple[int, int]] = {}  # shard → (samples listed, samples held)
        self._refs: dict[int, SampleRef] = {}  # byte ranges of the samples read and not yet given out

    def _clear_report(self) -> None:
        """Forget what the stream met since the last batch (it was reported with an earlier batch)."""
        self._skipped.clear()
        self._messages.clear()
        self._shortfalls.clear()

    def _restore(self, consumer: int, state: ConsumerState) -> tuple[ShuffledStream, list]:
        """The stream after `state.read` samples, and the carried samples, decoded again."""
        if state.stream is None:  # a position without byte ranges: replay from the epoch's start
            stream = self.shuffled(consumer, None)
            held = {index for index, _ in state.carry}
            kept = [(index, sample) for index, sample in zip(range(state.read), stream) if index in held]
        else:  # the carried samples are read by range, in the same requests as the stream's buffer
            stream = self.shuffled(consumer, state.stream, tuple(ref for _, ref in state.carry))  # type: ignore[misc]
            kept = [(index, sample) for (index, _), sample in zip(state.carry, stream.carried_samples)]
        self._clear_report()  # anything met while replaying was reported by the original run
        carry = [(index, self._process(sample)) for index, sample in kept]  # these succeeded before
        for index, sample in kept:
            self._refs[index] = sample["__ref__"]
        return stream, carry

    def _process(self, raw: dict[str, Any]) -> ProcessedSample:
        """A raw sample preprocessed, with its identity: its shard's number in the stage's list and its key."""
        processed = self.preprocess(raw)
        processed.sample_id = sample_id(self._shard_numbers[raw["__url__"]], processed.key)
        return processed

    def _position(self, read: int, carry: list, window: int, drop: int, stream: StreamState) -> ConsumerState:
        return ConsumerState(read, tuple((index, self._refs[index]) for index, _ in carry), window, drop, stream)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.first_consumer) % self.workers_per_rank
        consumer = self.rank * self.workers_per_rank + local
        state = self.start_positions.get(local, ConsumerState())
        self._start_report()
        stream, carry = self._restore(consumer, state)
        raw = zip(itertools.count(state.read), stream)
        read, window, drop = state.read, state.window, state.drop
        while True:
            at_start = self._position(read, carry, window, 0, stream.state())
            batches, carry, read = self._fill_window(raw, carry, read, window)
            if not batches:
                # Met after the last batch, reported all the same; with the samples left short of a micro-batch.
                if carry:
                    self._skipped["unused_at_epoch_end"] += len(carry)
                if self._skipped or self._shortfalls:
                    yield StreamReport(local, dict(self._skipped), list(self._messages), dict(self._shortfalls))
                return
            after = self._position(read, carry, window + 1, 0, stream.state())
            for number, members in enumerate(batches):
                if number < drop:  # given out before the checkpoint, with the window's skip counts
                    self._clear_report()
                    continue
                batch = self.batching.collate([sample for _, sample in members])
                batch.skipped, batch.skip_messages = dict(self._skipped), list(self._messages)
                batch.shortfalls = dict(self._shortfalls)
                self._clear_report()
                batch.consumer = local
                batch.resume_position = after if number + 1 == len(batches) else replace(at_start, drop=number + 1)
                yield batch
            self._refs = {index: self._refs[index] for index, _ in carry}
            window, drop = window + 1, 0

    def unconsumed(self, consumer: int, state: ConsumerState | None) -> tuple[SourcePosition, list[SampleRef]]:
        """Where consumer `consumer` (of this stream's epoch and geometry) stood at `state` (None: it gave out
        nothing): its plan's reading position and the samples it had read but not given out, by range.
        A window half given out (`drop`) is filled again to find which of its samples were not."""
        if state is None:
            return SourcePosition(), []
        assert state.stream is not None
        if state.drop == 0:
            return state.stream.source, [ref for _, ref in state.carry] + list(state.stream.buffer)  # type: ignore[misc]
        self._start_report()
        stream, carry = self._restore(consumer, state)
        batches, carry, _ = self._fill_window(zip(itertools.count(state.read), stream), carry, state.read, state.window)
        left = [index for members in batches[state.drop:] for index, _ in members] + [index for index, _ in carry]
        after = stream.state()
        return after.source, [self._refs[index] for index in left] + list(after.buffer)  # type: ignore[return-value]

    def _fill_window(self, raw, carry: list, read: int, window: int) -> tuple[list[list[tuple[int, ProcessedSample]]], list, int]:
        """(the window's micro-batches as (index, sample) pairs, the new carry, raw samples read); no batches at
        the end of the stream."""
        batching = self.batching
        size = batching.micro_batch_size
        layout = batching.layout(self.seed, self.epoch, window) if batching.group_by_modality_length else None
        if layout is None:
            wanted = {None: size}
        else:
            wanted = {True: size * sum(layout), False: size * (len(layout) - sum(layout))}
        pools: dict[object, list] = {key: [] for key in wanted}
        for item in carry:
            pools[self._pool_key(item[1], layout)].append(item)
        limit = max(size * batching.window_batches * (1 + batching.MAX_CARRY_WINDOWS), batching.MIN_CARRY_SAMPLES)
        while any(len(pools[k]) < wanted[k] for k in wanted):
            if sum(len(p) for p in pools.values()) >= limit:
                break  # too far off the mix: fill this window with what there is (below)
            try:
                index, sample = next(raw)
            except StopIteration:
                break
            read += 1
            try:
                pools[self._pool_key(processed := self._process(sample), layout)].append((index, processed))
                self._refs[index] = sample["__ref__"]
            except SampleError as exc:
                self._skipped[exc.reason] += 1
                if len(self._messages) < MAX_MESSAGES_PER_BATCH:
                    self._messages.append(f"skipped sample {sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {exc} "
                                          f"[{exc.reason}]")
        if all(len(pools[k]) >= wanted[k] for k in wanted):
            if layout is None:
                return [pools[None][:size]], pools[None][size:], read
            chunks = {}
            for key in (True, False):
                members = by_length(pools[key][: wanted[key]])
                chunks[key] = iter([members[i : i + size] for i in range(0, len(members), size)])
            batches = [next(chunks[key]) for key in layout]
            rest = sorted(pools[True][wanted[True]:] + pools[False][wanted[False]:], key=lambda item: item[0])
            return batches, rest, read
        # The end of the stream, or a carry past its limit: the oldest samples, in as many full
        # micro-batches as the window holds, grouped by modality and length among themselves.
        pool = sorted((item for p in pools.values() for item in p), key=lambda item: item[0])
        count = min(len(pool) // size, batching.window_batches) * size
        if count == 0 and batching.keep_partial:
            count = len(pool)
        if count == 0:
            return [], pool, read
        taken = sorted(pool[:count], key=lambda item: (item[1].pixel_values is None, -len(item[1].input_ids), item[0]))
        batches = [taken[i : i + size] for i in range(0, count, size)]
        return batches, pool[count:], read

    @staticmethod
    def _pool_key(sample: ProcessedSample, layout: list[bool] | None) -> bool | None:
        return None if layout is None else sample.pixel_values is not None
