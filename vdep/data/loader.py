"""A stage's data: shard plan, epoch length, and the DataLoader over one rank's stream."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DataLoader

from ..errors import DataError
from .batch import Batch
from .dataset import SamplePreprocessor, ShardStream
from .shards import Shard, micro_batches_per_rank, plan_epoch, resolve_split


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
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        split: str,
        shuffle_buffer: int,
        pad_token_id: int,
        pin_memory: bool = False,
    ) -> StageLoader:
        split = resolve_split(split, len(shards), world_size * max(num_workers, 1))  # type: ignore[arg-type]
        stream = ShardStream(
            shards,
            preprocess,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            micro_batch_size=micro_batch_size,
            seed=seed,
            split=split,
            shuffle_buffer=shuffle_buffer,
            pad_token_id=pad_token_id,
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

    def micro_batches(self, epoch: int) -> Iterator[Batch]:
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
