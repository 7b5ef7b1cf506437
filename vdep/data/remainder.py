"""The rest of an epoch when a run resumes on another number of data consumers (elastic resume).

A consumer is one DataLoader worker of one rank; an epoch's plan (shards.plan_epoch) depends on how
many there are, so the positions of a checkpoint's consumers mean nothing to a different set of them.
At the restore, every rank reads every old rank's data position and forms the same `EpochRemainder`:
- `pending`: the samples the old consumers had read but not consumed (in their shuffle buffers, held
  for a later window, or in the part of a window not yet given out), by byte range;
- `starts`: where each old consumer's plan reading stood; what follows is unread.
The union of the two is exactly the epoch's samples that no old consumer consumed. They are dealt
round-robin to the new consumers (pending ones first, then each old plan's rest in turn): sample t of
the deal goes to consumer t % N. Each new consumer shuffles its deal in its own seeded buffer and
batches it as usual (stream.RemainderPlan). So no sample of the epoch is lost or consumed twice, every
new consumer gets the same number of samples to within one, and the order differs from the
uninterrupted run's. The next epoch is planned for the new consumers as usual.

Costs and limits: a new consumer reads every old plan's rest and keeps its deal, so the rest of the
interrupted epoch is read once per new consumer (under `split: samples`, where every old plan spans
every shard, once per old consumer as well; the next epoch reads each shard once again). A
remainder is built from plain epoch positions only: an epoch that already continued after a change
of consumers must end before the number changes again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import CheckpointError
from .shards import plan_epoch
from .stream import RemainderPlan, RemainderPosition, SourcePosition
from .tar_reader import SampleRef


@dataclass(frozen=True)
class EpochRemainder:
    """What the consumers of a checkpoint had not consumed of `epoch` (see the module docstring)."""

    epoch: int
    consumers: int  # the checkpoint's consumers (ranks × loader workers)
    split: str  # data.split as the checkpoint's run resolved it
    starts: tuple[SourcePosition, ...]  # by old consumer
    pending: tuple[tuple[int, SampleRef], ...]  # (old consumer, ref into its plan's shards)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "consumers": self.consumers, "split": self.split, "starts": [s.to_json() for s in self.starts],
                "pending": [[consumer, ref.to_json()] for consumer, ref in self.pending]}

    @classmethod
    def from_json(cls, data: dict) -> EpochRemainder:
        return cls(int(data["epoch"]), int(data["consumers"]), str(data["split"]), tuple(SourcePosition.from_json(s) for s in data["starts"]),
                   tuple((int(consumer), SampleRef.from_json(ref)) for consumer, ref in data["pending"]))

    def plan(self, stream, consumer: int) -> RemainderPlan:
        """New consumer `consumer`'s share (of `stream.num_consumers`), for the ShardStream `stream`."""
        parts = tuple(plan_epoch(stream.shards, stream.seed, self.epoch, self.consumers, self.split))
        bases = [sum(len(p.shards) for p in parts[:i]) for i in range(len(parts))]
        count = stream.num_consumers
        mine = tuple(SampleRef(bases[old] + ref.shard, ref.start, ref.end)
                     for t, (old, ref) in enumerate(self.pending) if t % count == consumer)
        return RemainderPlan(parts, self.starts, mine, len(self.pending), consumer, count)


def epoch_remainder(stream, epoch: int, old_world: int, old_split: str, positions: list, where: str) -> EpochRemainder:
    """The remainder of `epoch` from the data positions (loader.DataPosition, by old rank) of a checkpoint
    written on `old_world` ranks with `old_split`; `stream` is this run's ShardStream (same shards, seed,
    workers); `where` names the checkpoint in errors."""
    old = copy.copy(stream)  # the checkpoint's geometry, to replay a window half given out
    old.world_size, old.split, old.remainder = old_world, old_split, None
    old.set_epoch(epoch)
    workers = stream.workers_per_rank
    starts: list[SourcePosition] = []
    pending: list[tuple[int, SampleRef]] = []
    for rank, position in enumerate(positions):
        if position.remainder is not None:
            raise CheckpointError(
                f"{where}: epoch {epoch} already continued on another number of ranks ({position.remainder.consumers} "
                f"consumers before that), and its rest cannot be dealt again. Resume on {old_world} rank(s) until "
                "the epoch ends (its end-of-epoch checkpoint can then be resumed on any number)"
            )
        for local in range(workers):
            consumer = rank * workers + local
            state = position.consumers.get(local)
            if state is not None and (state.stream is None or any(ref is None for _, ref in state.carry)):
                raise CheckpointError(
                    f"{where}: the data position of rank {rank} was written by vdep 0.1 (no byte ranges), so the rest of "
                    f"epoch {epoch} cannot be dealt to another number of ranks. Resume on {old_world} rank(s)"
                )
            source, refs = old.unconsumed(consumer, state)
            if isinstance(source, RemainderPosition):  # a position of a remainder plan without a recorded remainder
                raise CheckpointError(f"{where}: rank {rank}'s data position reads an epoch remainder it does not record")
            starts.append(source)
            pending += [(consumer, ref) for ref in refs]
    return EpochRemainder(epoch, old_world * workers, old_split, tuple(starts), tuple(pending))
