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

import io
import re
import tarfile
from collections.abc import Iterator
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
        handle = Path(location).open("rb")
    except OSError as exc:  # deleted or unreadable since the run started: never a skip
        raise MissingShardError(f"{location}: cannot open the shard ({exc.strerror}); it was listed when the run "
                                "started. Restore it (or rebuild the shards) and run the same command to continue "
                                "from the last checkpoint") from None
    handle.seek(offset)
    return handle


def iterate_samples(stream: BinaryIO, location: str, shard: int, base: int = 0) -> Iterator[dict]:
    """The samples of a tar stream that starts at byte `base` of shard number `shard` (at `location`)."""
    archive = tarfile.open(fileobj=stream, mode="r|")
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


def read_range(location: str, start: int, end: int, settings: RemoteSettings) -> bytes:
    """Bytes [start, end) of a shard: one ranged request (retried) for a remote one."""
    if is_remote(location):
        return RemoteFile(location, settings).read_range(start, end)
    with Path(location).open("rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


def read_sample(location: str, ref: SampleRef, settings: RemoteSettings) -> dict:
    """The one sample at `ref` (a range read: only its bytes)."""
    data = read_range(location, ref.start, ref.end, settings)
    samples = list(iterate_samples(io.BytesIO(data + bytes(2 * BLOCK)), location, ref.shard, ref.start))
    if len(samples) != 1 or samples[0]["__ref__"] != ref:
        raise tarfile.ReadError(f"{location}: bytes {ref.start}-{ref.end - 1} do not hold the sample recorded there")
    return samples[0]
