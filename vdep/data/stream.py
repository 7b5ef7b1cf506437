"""One consumer's raw samples in shuffled order, with a position that restores without re-reading.

The raw stream of a consumer is its plan's shards read in order (keeping samples i with
i % stride == offset, at most `limit`: shards.ConsumerPlan), through a seeded shuffle buffer. Its
state after any number of samples (`StreamState`) is small and exact:
- where the plan's reading stands: the shard, the byte after the last sample read, and the counts of
  samples seen and kept (`SourcePosition`);
- which samples wait in the shuffle buffer, by byte range (`SampleRef`), and the buffer's RNG state;
- once the plan is read to its end, the buffer's remaining samples in their final order.
Restoring reads the waiting samples by range (in one batch: tar_reader.read_samples) and continues the
plan at its byte: no consumed byte is read again, except, from a remote shard, those between waiting
samples closer than one request, which a batch reads rather than pay a request per sample. The order of
samples is exactly that of an uninterrupted stream.

After a resume on another number of consumers (elastic resume, remainder.py), a consumer reads a
`RemainderPlan` instead: its deal of what the checkpoint's consumers had not consumed, with a
`RemainderPosition` in place of the `SourcePosition`.

Corrupt tar data ends the shard it is in, and a shard that holds fewer samples than sizes.json says is
reported with the count (`ShardEvents`: the consumer counts both); transport errors propagate.
"""

from __future__ import annotations

import random
import tarfile
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .remote import RemoteSettings, is_remote
from .shards import ConsumerPlan
from .tar_reader import SampleRef, iterate_samples, open_shard, read_samples


@dataclass(frozen=True)
class SourcePosition:
    """Where reading a consumer's plan stands: at byte `offset` of shard number `shard`."""

    shard: int = 0
    offset: int = 0
    seen: int = 0  # samples of the plan's shards passed so far (before the stride)
    kept: int = 0  # of which this consumer's (after the stride)
    in_shard: int = 0  # samples of shard `shard` passed so far

    def to_json(self) -> list[int]:
        return [self.shard, self.offset, self.seen, self.kept, self.in_shard]

    @classmethod
    def from_json(cls, data: list[int]) -> SourcePosition:
        return cls(*(int(value) for value in data))


@dataclass(frozen=True)
class RemainderPosition:
    """Where reading a `RemainderPlan` stands: in part `part`, at `source` of that part's plan, with
    `dealt` samples of the deal (the pending ones included) passed so far."""

    part: int
    source: SourcePosition
    dealt: int

    def to_json(self) -> dict:
        return {"part": self.part, "source": self.source.to_json(), "dealt": self.dealt}

    @classmethod
    def from_json(cls, data: dict) -> RemainderPosition:
        return cls(int(data["part"]), SourcePosition.from_json(data["source"]), int(data["dealt"]))


def _position_from_json(data: list | dict) -> SourcePosition | RemainderPosition:
    return RemainderPosition.from_json(data) if isinstance(data, dict) else SourcePosition.from_json(data)


@dataclass(frozen=True)
class StreamState:
    """A consumer's shuffled stream, restorable (see the module docstring)."""

    source: SourcePosition | RemainderPosition = field(default_factory=SourcePosition)
    rng: list | None = None  # the shuffle RNG's state (random.Random.getstate as lists); None: fresh
    buffer: tuple[SampleRef, ...] = ()
    draining: bool = False  # the plan is read: `buffer` is the remaining samples in their final order

    def to_json(self) -> dict:
        return {"source": self.source.to_json(), "rng": self.rng, "buffer": [r.to_json() for r in self.buffer],
                "draining": self.draining}

    @classmethod
    def from_json(cls, data: dict) -> StreamState:
        return cls(_position_from_json(data["source"]), data["rng"],
                   tuple(SampleRef.from_json(r) for r in data["buffer"]), bool(data["draining"]))


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass(frozen=True)
class ShardEvents:
    """What a reader tells its consumer about a shard's data (the consumer counts it)."""

    # corrupt tar data: the rest of the shard cannot be read
    corrupt: Callable[[str, Exception], None]
    # (location, samples sizes.json lists, samples the shard held): a shard shorter than its manifest
    short: Callable[[str, int, int], None]


class PlanReader:
    """A consumer plan's raw samples in order, starting at `position`.

    Each shard read to its end (or to a corruption) is checked against the sample count sizes.json gives
    it: a shortfall is reported once per shard and reading (in a plan that reads every shard for several
    consumers, `split: samples`, by the first of them only)."""

    def __init__(self, plan: ConsumerPlan, settings: RemoteSettings, position: SourcePosition, events: ShardEvents):
        self.plan = plan
        self.settings = settings
        self.position = position
        self.events = events

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan
        upcoming: tuple[int, Future] | None = None
        pool = ThreadPoolExecutor(1, thread_name_prefix="vdep-next-shard")
        try:
            while self.position.shard < len(plan.shards):
                if plan.limit is not None and self.position.kept >= plan.limit:
                    return
                number = self.position.shard
                stream = upcoming[1].result() if upcoming is not None and upcoming[0] == number else \
                    open_shard(plan.shards[number].path, self.settings, self.position.offset)
                upcoming = None
                following = number + 1
                if following < len(plan.shards) and is_remote(plan.shards[following].path):
                    # The next remote shard's first request goes out while this one is read.
                    upcoming = (following, pool.submit(open_shard, plan.shards[following].path, self.settings, 0))
                with stream:
                    ended = yield from self._read_shard(number, stream)
                expected = plan.shards[number].num_samples
                if ended and self.position.in_shard < expected and plan.offset == 0:
                    self.events.short(plan.shards[number].path, expected, self.position.in_shard)
                self.position = SourcePosition(number + 1, 0, self.position.seen, self.position.kept)
        finally:
            if upcoming is not None and upcoming[1].done() and upcoming[1].exception() is None:
                upcoming[1].result().close()
            pool.shutdown(wait=False, cancel_futures=True)

    def _read_shard(self, number: int, stream) -> Generator[dict, None, bool]:
        """The shard's samples for this consumer; returns whether the shard was read to its end (its
        last byte or a corruption), rather than left at the plan's limit."""
        location = self.plan.shards[number].path
        samples = iterate_samples(stream, location, number, self.position.offset)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return True
            except (tarfile.TarError, EOFError) as exc:  # corrupt data inside the shard: the rest of it is lost
                self.events.corrupt(location, exc)
                return True
            position = self.position
            mine = position.seen % self.plan.stride == self.plan.offset
            self.position = SourcePosition(number, sample["__ref__"].end, position.seen + 1, position.kept + mine,
                                           position.in_shard + 1)
            if mine:
                yield sample
                if self.plan.limit is not None and self.position.kept >= self.plan.limit:
                    return False


@dataclass(frozen=True)
class RemainderPlan:
    """One new consumer's share of an epoch's remainder (remainder.py): the samples that the consumers
    of a checkpoint written on another number of ranks had read but not consumed (`pending`, dealt before
    the stream starts), then the rest of each old consumer's plan (`parts`, from `starts`), dealt on:
    sample number t of the deal (pending ones first) is this consumer's when t % consumers == consumer.

    `shards` is every part's shards one after the other, so a `SampleRef` of this plan names its part's
    shard by its number in `shards` (`bases[part]` + its number in the part)."""

    parts: tuple[ConsumerPlan, ...]
    starts: tuple[SourcePosition, ...]
    pending: tuple[SampleRef, ...]  # this consumer's deal of the pending samples, refs into `shards`
    pending_total: int  # pending samples of every consumer (the deal of the parts continues after them)
    consumer: int
    consumers: int

    @property
    def shards(self) -> tuple:
        return tuple(shard for part in self.parts for shard in part.shards)

    @property
    def bases(self) -> list[int]:
        bases, total = [], 0
        for part in self.parts:
            bases.append(total)
            total += len(part.shards)
        return bases

    def initial_state(self) -> StreamState:
        start = RemainderPosition(0, self.starts[0] if self.starts else SourcePosition(), self.pending_total)
        return StreamState(start, None, self.pending)


class RemainderReader:
    """A `RemainderPlan`'s samples (after its pending ones) in order, from `position` on."""

    def __init__(self, plan: RemainderPlan, settings: RemoteSettings, position: RemainderPosition, events: ShardEvents):
        self.plan = plan
        self.settings = settings
        self.position = position
        self.events = events

    def __iter__(self) -> Iterator[dict]:
        plan, bases = self.plan, self.plan.bases
        while self.position.part < len(plan.parts):
            part = self.position.part
            reader = PlanReader(plan.parts[part], self.settings, self.position.source, self.events)
            for sample in reader:
                dealt = self.position.dealt
                self.position = RemainderPosition(part, reader.position, dealt + 1)
                if dealt % plan.consumers == plan.consumer:
                    ref = sample["__ref__"]
                    sample["__ref__"] = SampleRef(bases[part] + ref.shard, ref.start, ref.end)
                    yield sample
            following = part + 1
            start = plan.starts[following] if following < len(plan.parts) else SourcePosition()
            self.position = RemainderPosition(following, start, self.position.dealt)


class ShuffledStream:
    """A seeded reservoir shuffle of a `PlanReader`'s samples: fill a buffer of `size`, then emit a
    random element for each new one; at the end, shuffle what is left and emit it. With a `state`, it
    continues exactly where that state was taken.

    Restoring reads the buffer's samples, and the `carried` ones that the consumer holds beside the stream
    (a grouping window's carry, in this plan's shards too), in one batch: grouped by shard and byte range
    (tar_reader.read_samples), so a buffer of a thousand remote samples costs a few requests per shard, not
    two per sample. The carried samples are then in `carried_samples`, in the order of `carried`."""

    def __init__(self, plan: ConsumerPlan | RemainderPlan, settings: RemoteSettings, size: int, seed: str,
                 events: ShardEvents, state: StreamState | None = None, carried: Sequence[SampleRef] = ()):
        state = state or (plan.initial_state() if isinstance(plan, RemainderPlan) else StreamState())
        self.plan = plan
        self.settings = settings
        self.size = size
        self.reader: PlanReader | RemainderReader = (
            RemainderReader(plan, settings, state.source, events) if isinstance(plan, RemainderPlan)  # type: ignore[arg-type]
            else PlanReader(plan, settings, state.source, events))  # type: ignore[arg-type]
        self.rng = _rng_from_json(state.rng) if state.rng is not None else random.Random(seed)
        restored = read_samples([shard.path for shard in plan.shards], [*state.buffer, *carried], settings)
        self.buffer = restored[: len(state.buffer)]
        self.carried_samples = restored[len(state.buffer):]
        self.draining = state.draining
        self._source = iter(self.reader)

    def state(self) -> StreamState:
        return StreamState(self.reader.position, _rng_to_json(self.rng),
                           tuple(sample["__ref__"] for sample in self.buffer), self.draining)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.size <= 1:
            return next(self._source)
        while not self.draining:
            sample = next(self._source, None)
            if sample is None:
                self.rng.shuffle(self.buffer)
                self.draining = True
                break
            if len(self.buffer) < self.size:
                self.buffer.append(sample)
                continue
            index = self.rng.randrange(self.size)
            self.buffer[index], sample = sample, self.buffer[index]
            return sample
        if not self.buffer:
            raise StopIteration
        return self.buffer.pop(0)
