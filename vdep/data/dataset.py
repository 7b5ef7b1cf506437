"""From tar shards to collated micro-batches: one consumer's stream.

Each DataLoader worker of each rank is one consumer. It reads the shards its plan names, shuffles raw
samples in a seeded buffer, and only then decodes them (decode after shuffle: the buffer holds bytes,
not tensors). A sample that cannot be used raises `SampleError` during preprocessing; the stream counts
it by reason, keeps a few messages that name it, and moves on. The counts travel with the next batch,
so the trainer can log and total them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .batch import Batch, ProcessedSample, collate
from .conversation import SampleError, check_image_markers, parse_conversation
from .images import ImageProcessing, decode_image, preprocess_image
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
        pixel_values = preprocess_image(decode_image(image_bytes), self.image_processing) if has_image else None
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


class ShardStream(IterableDataset):
    """The micro-batches of one rank for one epoch; DataLoader workers split the rank's share."""

    def __init__(
        self,
        shards: list[Shard],
        preprocess: SamplePreprocessor,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
        seed: int,
        split: str,
        shuffle_buffer: int,
        pad_token_id: int,
    ):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.rank = rank
        self.world_size = world_size
        self.workers_per_rank = max(num_workers, 1)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.pad_token_id = pad_token_id
        self.epoch = 0

    @property
    def num_consumers(self) -> int:
        return self.world_size * self.workers_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        consumer = self.rank * self.workers_per_rank + (info.id if info is not None else 0)
        plan = plan_epoch(self.shards, self.seed, self.epoch, self.num_consumers, self.split)[consumer]
        skipped: Counter[str] = Counter()
        messages: list[str] = []

        def on_tar_error(exc: Exception) -> bool:
            skipped["bad_tar"] += 1
            if len(messages) < MAX_MESSAGES_PER_BATCH:
                messages.append(f"unreadable tar data: {exc}")
            return True  # keep reading

        raw = wds.tariterators.tarfile_samples(({"url": s.path} for s in plan.shards), handler=on_tar_error)
        mine = (sample for index, sample in enumerate(raw) if index % plan.stride == plan.offset)
        rng = random.Random(f"vdep-samples-{self.seed}-{self.epoch}-{consumer}")
        pending: list[ProcessedSample] = []
        image_size = self.preprocess.image_processing.output_size
        for sample in buffer_shuffle(mine, self.shuffle_buffer, rng):
            try:
                pending.append(self.preprocess(sample))
            except SampleError as exc:
                skipped[exc.reason] += 1
                if len(messages) < MAX_MESSAGES_PER_BATCH:
                    messages.append(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: {exc} [{exc.reason}]")
                continue
            if len(pending) == self.micro_batch_size:
                batch = collate(pending, self.pad_token_id, image_size)
                batch.skipped, batch.skip_messages = dict(skipped), list(messages)
                skipped.clear()
                messages.clear()
                pending = []
                yield batch
