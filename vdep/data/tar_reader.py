"""A shard's raw samples from any byte offset, local or remote, each with where it lies in the shard.

Samples are WebDataset's: consecutive regular members of the tar with the same key (the member's path
up to the first dot of its file name), each member under its lower-cased extension; `__key__`,
`__url__`, and `__ref__` (a `SampleRef`: the byte range of the sample in its shard). Meta members
(`__name__`) and non-regular entries are skipped, as webdataset does. Opening a shard at a sample's
first byte yields exactly the samples a full read yields from there on: this is what lets a resumed
run continue mid-shard without reading the consumed part.

Errors keep their kind: a `tarfile.TarError` (or a duplicate member) is corrupt data inside the shard,
which the caller counts and skips; a `TransportError` or `MissingShardError` (remote.py) is not data
and propagates.
"""

from __future__ import annotations

import bisect
import io
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .remote import MissingShardError, RemoteFile, RemoteSettings, is_remote, open_remote

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class SampleRef:
    """Where a raw sample lies: shard `shard` of the reader's list, bytes [start, end)."""

    shard: int
    start: int
    end: int

    def to_json(self) -> list[int]:
        return [self.shard, self.start, self.end]

    @classmethod
    def from_json(cls, data: list[int]) -> SampleRef:
        return cls(int(data[0]), int(data[1]), int(data[2]))


class DuplicateMember(tarfile.TarError):
    """Two members of one sample with the same extension: the shard is malformed."""


def base_and_extension(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name into the sample key and the extension(s)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else None


def open_shard(location: str, settings: RemoteSettings, offset: int = 0) -> BinaryIO:
    if is_remote(location):
        return open_remote(location, settings, offset)
    try:
        handle = Path(location).open("rb")  # noqa: SIM115 (the caller reads and closes it, as open_remote's)
    except OSError as exc:  # deleted or unreadable since the run started: never a skip
        raise MissingShardError(f"{location}: cannot open the shard ({exc.strerror}); it was listed when the run "
                                "started. Restore it (or rebuild the shards) and run the same command to continue "
                                "from the last checkpoint") from None
    handle.seek(offset)
    return handle


def iterate_samples(stream: BinaryIO, location: str, shard: int, base: int = 0) -> Iterator[dict]:
    """The samples of a tar stream that starts at byte `base` of shard number `shard` (at `location`)."""
    # Not closed here: closing the archive would close the caller's stream, which the caller owns.
    archive = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115
    current: dict | None = None
    start = end = 0
    for info in archive:
        if not info.isreg() or info.name is None or _META.match(info.name):
            continue
        split = base_and_extension(info.name)
        if split is None:
            continue
        key, extension = split[0], split[1].lower()
        if current is not None and key != current["__key__"]:
            current["__ref__"] = SampleRef(shard, start, end)
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": location}
            start = base + info.offset
        if extension in current:
            raise DuplicateMember(f"{location}: sample {key} has two .{extension} members")
        current[extension] = archive.extractfile(info).read()
        end = base + info.offset_data + -(-info.size // BLOCK) * BLOCK
        archive.members = []  # keep memory flat over a long shard
    if current is not None:
        current["__ref__"] = SampleRef(shard, start, end)
        yield current


# Requests a restore sends at once (a consumer's shuffle buffer lies in a few shards; their spans are read
# in parallel, as object stores serve concurrent ranged requests of one object well).
RESTORE_CONNECTIONS = 8
# A gap between two waiting samples of a remote shard shorter than this many requests (data.remote.request_mb)
# is read with them rather than costing a request of its own (docs/design.md, "The data position";
# benchmarks/data_throughput.py --remote --resume measures 0, only touching samples, against it).
REMOTE_GAP_IN_REQUESTS = 1.0


@dataclass(frozen=True)
class ByteSpan:
    """Bytes [start, end) of shard `shard` that one read covers: one or more samples and the gaps between them."""

    shard: int
    start: int
    end: int


def byte_spans(refs: Iterable[SampleRef], max_gap: Callable[[int], int]) -> list[ByteSpan]:
    """The spans that cover `refs`: per shard, in byte order, a sample joins the span before it when the gap
    between them is smaller than `max_gap(shard)` bytes (0: only samples that touch)."""
    spans: list[ByteSpan] = []
    for ref in sorted(set(refs), key=lambda r: (r.shard, r.start)):
        last = spans[-1] if spans else None
        if last is not None and last.shard == ref.shard and ref.start - last.end < max(max_gap(ref.shard), 1):
            spans[-1] = ByteSpan(ref.shard, last.start, max(last.end, ref.end))
        else:
            spans.append(ByteSpan(ref.shard, ref.start, ref.end))
    return spans


def read_samples(paths: Sequence[str], refs: Sequence[SampleRef], settings: RemoteSettings) -> list[dict]:
    """The samples at `refs` (a `SampleRef`'s shard indexes `paths`), in the order of `refs`.

    What a restore reads: a consumer's shuffle buffer and carried samples, hundreds of small ranges in a few
    shards. A remote shard's ranges closer than one request (`data.remote.request_mb`) are read as one span,
    the gaps included, in requests of at most request_mb, `RESTORE_CONNECTIONS` at once: the requests grow
    with the shards and the bytes, not with the samples (docs/design.md, "The data position"). A local
    shard is read sample by sample (a seek costs nothing), so no consumed byte is read there."""
    if not refs:
        return []
    remote_gap = int(settings.request_bytes * REMOTE_GAP_IN_REQUESTS)
    spans = byte_spans(refs, lambda shard: remote_gap if is_remote(paths[shard]) else 0)
    pieces = [(span, start, min(span.end, start + settings.request_bytes))
              for span in spans for start in range(span.start, span.end, settings.request_bytes)]
    shards = {span.shard for span in spans}
    remote = {shard: RemoteFile(paths[shard], settings) for shard in shards if is_remote(paths[shard])}
    data: list[bytes] = [b""] * len(pieces)
    fetched = [number for number, (span, _, _) in enumerate(pieces) if span.shard in remote]
    if fetched:
        pool = ThreadPoolExecutor(min(RESTORE_CONNECTIONS, len(fetched)), "vdep-restore")
        try:
            futures = [pool.submit(remote[pieces[n][0].shard].read_range, *pieces[n][1:]) for n in fetched]
            for number, future in zip(fetched, futures):
                data[number] = future.result()  # a TransportError (retries spent) or MissingShardError surfaces here
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    with ExitStack() as stack:
        local = {shard: stack.enter_context(Path(paths[shard]).open("rb")) for shard in shards - set(remote)}
        for number, (span, start, end) in enumerate(pieces):
            if span.shard in local:
                local[span.shard].seek(start)
                data[number] = local[span.shard].read(end - start)
    span_bytes: dict[ByteSpan, bytearray] = {span: bytearray() for span in spans}
    for (span, _, _), chunk in zip(pieces, data):
        span_bytes[span] += chunk
    starts = [(span.shard, span.start) for span in spans]  # sorted, as byte_spans returns them
    samples = []
    for ref in refs:
        span = spans[bisect.bisect_right(starts, (ref.shard, ref.start)) - 1]
        chunk = bytes(span_bytes[span][ref.start - span.start: ref.end - span.start])
        samples.append(parse_sample(paths[ref.shard], ref, chunk))
    return samples


def parse_sample(location: str, ref: SampleRef, data: bytes) -> dict:
    """The one sample whose bytes [ref.start, ref.end) are `data`."""
    samples = list(iterate_samples(io.BytesIO(data + bytes(2 * BLOCK)), location, ref.shard, ref.start))
    if len(samples) != 1 or samples[0]["__ref__"] != ref:
        raise tarfile.ReadError(f"{location}: bytes {ref.start}-{ref.end - 1} do not hold the sample recorded there")
    return samples[0]
