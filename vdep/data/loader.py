"""A stage's data: shard plan, epoch length, the DataLoader over one rank's stream, and its position."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from ..errors import DataError
from .batch import Batch
from .dataset import Batching, ConsumerState, SamplePreprocessor, ShardStream
from .shards import Shard, micro_batches_per_rank, plan_epoch, resolve_split


@dataclass
class DataPosition:
    """Where one rank's loader stands within an epoch; saved with every checkpoint (one file per rank).

    `consumers` maps each of the rank's loader workers to its resume position (see ShardStream), and
    `next_consumer` is the worker whose turn is next. Valid for the same world size, worker count,
    shards, seed and batching settings; vdep refuses a resume that changes the world size.
    """

    epoch: int = 0
    micro_batches: int = 0  # consumed by this rank in `epoch`
    next_consumer: int = 0
    consumers: dict[int, ConsumerState] = field(default_factory=dict)

    def advance(self, batch: Batch, workers: int) -> None:
        self.micro_batches += 1
        self.consumers[batch.consumer] = batch.resume_position
        self.next_consumer = (batch.consumer + 1) % workers

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "micro_batches": self.micro_batches, "next_consumer": self.next_consumer,
                "consumers": {str(k): v.to_json() for k, v in self.consumers.items()}}

    @classmethod
    def from_json(cls, data: dict) -> DataPosition:
        return cls(data["epoch"], data["micro_batches"], data["next_consumer"],
                   {int(k): ConsumerState.from_json(v) for k, v in data["consumers"].items()})


@dataclass
class StageLoader:
    """Yields this rank's micro-batches, epoch by epoch, and knows every epoch's length in steps."""

    stream: ShardStream
    num_workers: int
    grad_accum_steps: int
    pin_memory: bool = False

    @classmethod
    def create(
        cls,
        shards: list[Shard],
        preprocess: SamplePreprocessor,
        batching: Batching,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        grad_accum_steps: int,
        seed: int,
        split: str,
        shuffle_buffer: int,
        pin_memory: bool = False,
    ) -> StageLoader:
        split = resolve_split(split, len(shards), world_size * max(num_workers, 1))  # type: ignore[arg-type]
        stream = ShardStream(
            shards,
            preprocess,
            batching,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=seed,
            split=split,
            shuffle_buffer=shuffle_buffer,
        )
        return cls(stream, num_workers, grad_accum_steps, pin_memory)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps every rank can fill in this epoch (the rank with the fewest samples decides)."""
        s = self.stream
        plans = plan_epoch(s.shards, s.seed, epoch, s.num_consumers, s.split)
        per_rank = micro_batches_per_rank(plans, s.world_size, self.num_workers, s.micro_batch_size)
        return min(per_rank) // self.grad_accum_steps

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        """Optimizer steps of the stage: `max_steps`, or `epochs` worth of steps (a fraction allowed)."""
        if max_steps is not None:
            return max_steps
        whole, fraction = int(epochs), epochs - int(epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        if fraction > 0:
            total += math.floor(fraction * self.steps_in_epoch(whole))
        if total == 0:
            s = self.stream
            raise DataError(
                f"the data gives no complete optimizer step: {sum(x.num_samples for x in s.shards)} samples "
                f"for {s.world_size} rank(s) × {self.grad_accum_steps} accumulation step(s) × micro-batch "
                f"{s.micro_batch_size}; add data or reduce the batch size"
            )
        return total

    @property
    def workers(self) -> int:
        return self.stream.workers_per_rank

    def micro_batches(self, epoch: int, position: DataPosition | None = None) -> Iterator[Batch]:
        """The epoch's micro-batches, from its start or from `position` (of the same epoch)."""
        if position is not None and position.epoch == epoch:
            self.stream.set_epoch(epoch, position.consumers, position.next_consumer)
        else:
            self.stream.set_epoch(epoch)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        yield from loader
