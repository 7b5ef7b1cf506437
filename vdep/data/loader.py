"""A stage's data: shard plan, epoch length, the DataLoader over one rank's stream, and its position."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from ..errors import DataError
from .batch import Batch
from .dataset import Batching, ConsumerState, SamplePreprocessor, ShardStream, StreamReport
from .remainder import EpochRemainder
from .remote import RemoteSettings
from .shards import ConsumerPlan, Shard, micro_batches_per_rank, plan_epoch, resolve_split


@dataclass
class DataPosition:
    """Where one rank's loader stands within an epoch; saved with every checkpoint (one file per rank).

    `consumers` maps each of the rank's loader workers to its resume position (see ShardStream), and
    `next_consumer` is the worker whose turn is next. Valid for the same world size, worker count,
    shards, seed and batching settings; a resume on another number of ranks deals the epoch's rest
    (`remainder`, kept for the rest of that epoch: remainder.py) instead.
    """

    epoch: int = 0
    micro_batches: int = 0  # consumed by this rank in `epoch`
    next_consumer: int = 0
    consumers: dict[int, ConsumerState] = field(default_factory=dict)
    remainder: EpochRemainder | None = None

    def advance(self, batch: Batch, workers: int) -> None:
        self.micro_batches += 1
        self.consumers[batch.consumer] = batch.resume_position
        self.next_consumer = (batch.consumer + 1) % workers

    def to_json(self) -> dict:
        data = {"epoch": self.epoch, "micro_batches": self.micro_batches, "next_consumer": self.next_consumer,
                "consumers": {str(k): v.to_json() for k, v in self.consumers.items()}}
        if self.remainder is not None:
            data["remainder"] = self.remainder.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> DataPosition:
        remainder = EpochRemainder.from_json(data["remainder"]) if data.get("remainder") else None
        return cls(data["epoch"], data["micro_batches"], data["next_consumer"],
                   {int(k): ConsumerState.from_json(v) for k, v in data["consumers"].items()}, remainder)

    # The checkpoint protocol (train/checkpoint.py: Stateful).
    def state_dict(self) -> dict:
        return self.to_json()

    def load_state_dict(self, state: dict) -> None:
        restored = DataPosition.from_json(state)
        self.epoch, self.micro_batches, self.next_consumer = restored.epoch, restored.micro_batches, restored.next_consumer
        self.consumers, self.remainder = restored.consumers, restored.remainder


@dataclass(frozen=True)
class RankGeometry:
    """How a run's data was split: over `world_size` ranks, `grad_accum` micro-batches a step, `split` as
    resolved for its number of consumers (data.split: auto depends on it)."""

    world_size: int
    grad_accum: int
    split: str


@dataclass(frozen=True)
class StageLength:
    """How long a stage trains, and what an epoch is.

    An epoch is one pass over the stage's shards: every sample read once (or, with `data.split:
    resample`, each consumer's drawn share). `epochs: E` (a fraction allowed) trains E passes and
    then stops, even when samples skipped on the way (undecodable, too long) made a pass end before
    the steps sizes.json promised; it never starts an extra pass to make up steps. `planned_steps`,
    the LR schedule's and the progress bar's length, is the sizes.json count, so such a stage ends a
    little early, with the LR not quite at its floor (the stage summary says by how much). `max_steps`
    trains exactly that many steps, repeating the data epoch after epoch as needed.
    """

    planned_steps: int
    max_steps: int | None
    whole_epochs: int
    final_epoch_steps: int  # steps of the fractional last epoch (0: none)

    def done(self, step: int, epoch: int, steps_in_epoch: int) -> bool:
        """Whether training stops at this point: `step` steps done, `steps_in_epoch` of them in `epoch`."""
        if step >= self.planned_steps:
            return True
        if self.max_steps is not None:
            return False
        return epoch > self.whole_epochs or (epoch == self.whole_epochs and steps_in_epoch >= self.final_epoch_steps)

    def describe(self) -> str:
        if self.max_steps is not None:
            return f"{self.max_steps} steps (max_steps)"
        part = " and a part" if self.final_epoch_steps else ""
        return f"{self.planned_steps} steps ({self.whole_epochs} epoch(s){part}, by sizes.json)"


@dataclass
class StageLoader:
    """Yields this rank's micro-batches, epoch by epoch, and knows every epoch's length in steps."""

    stream: ShardStream
    num_workers: int
    grad_accum_steps: int
    pin_memory: bool = False
    # What consumers met after their last micro-batch (dataset.StreamReport), for the trainer to count.
    reports: list[StreamReport] = field(default_factory=list)

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
        remote: RemoteSettings | None = None,
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
            remote=remote,
        )
        return cls(stream, num_workers, grad_accum_steps, pin_memory)

    @property
    def geometry(self) -> RankGeometry:
        return RankGeometry(self.stream.world_size, self.grad_accum_steps, self.stream.split)

    def steps_in_epoch(self, epoch: int, geometry: RankGeometry | None = None) -> int:
        """Optimizer steps every rank can fill in this epoch (the rank with the fewest samples decides), on
        this loader's ranks or as split by `geometry`."""
        s = self.stream
        geometry = geometry or self.geometry
        world, accum, split = geometry.world_size, geometry.grad_accum, geometry.split
        plans = plan_epoch(s.shards, s.seed, epoch, world * s.workers_per_rank, split)
        per_rank = micro_batches_per_rank(plans, world, self.num_workers, s.micro_batch_size)
        return min(per_rank) // accum

    def stage_length(self, epochs: float, max_steps: int | None, geometry: RankGeometry | None = None) -> StageLength:
        """How long a stage of `epochs` epochs (a fraction allowed), or of `max_steps` steps, trains; with
        `geometry`, as planned for that split (an elastic resume keeps the
        length its checkpoint's run planned, and so the LR schedule)."""
        whole, fraction = int(epochs), epochs - int(epochs)
        final_epoch_steps = math.floor(fraction * self.steps_in_epoch(whole, geometry)) if fraction > 0 else 0
        planned = sum(self.steps_in_epoch(e, geometry) for e in range(whole)) + final_epoch_steps
        if max_steps is not None:
            return StageLength(max_steps, max_steps, whole, final_epoch_steps)
        if planned == 0:
            s = self.stream
            raise DataError(
                f"the data gives no complete optimizer step: {sum(x.num_samples for x in s.shards)} samples "
                f"for {s.world_size} rank(s) × {self.grad_accum_steps} accumulation step(s) × micro-batch "
                f"{s.micro_batch_size}; add data or reduce the batch size"
            )
        return StageLength(planned, None, whole, final_epoch_steps)

    @property
    def samples_per_epoch(self) -> int:
        """The samples sizes.json lists for the stage's shards."""
        return sum(shard.num_samples for shard in self.stream.shards)

    def consumer_plans(self, epoch: int) -> dict[int, ConsumerPlan]:
        """This rank's consumers' reading plans for `epoch`, by local worker number."""
        s = self.stream
        plans = plan_epoch(s.shards, s.seed, epoch, s.num_consumers, s.split)
        return {local: plans[s.rank * s.workers_per_rank + local] for local in range(s.workers_per_rank)}

    @property
    def workers(self) -> int:
        return self.stream.workers_per_rank

    def micro_batches(self, epoch: int, position: DataPosition | None = None) -> Iterator[Batch]:
        """The epoch's micro-batches, from its start or from `position` (of the same epoch)."""
        if position is not None and position.epoch == epoch:
            self.stream.set_epoch(epoch, position.consumers, position.next_consumer, position.remainder)
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
        for item in loader:
            if isinstance(item, StreamReport):
                self.reports.append(item)
            else:
                yield item
