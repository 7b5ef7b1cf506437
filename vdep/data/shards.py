"""Shard discovery and the per-epoch shard plan.

A shard directory holds `NNNNNN.tar` files and a `sizes.json` (`{"000000.tar": 1000, ...}`) written
by `vdep build-shards`; so does a remote prefix (`https://...`, `s3://...`, `gs://...`, remote.py),
whose shards are the ones its `sizes.json` names (HTTP has no listing). The plan for an epoch is a pure function of (shards, seed, epoch, number of
consumers), where a consumer is one DataLoader worker of one rank: every rank computes every
consumer's plan, so all ranks agree on the epoch length without talking to each other.
"""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import DataError
from .remote import MissingShardError, RemoteSettings, is_remote, join, read_text

SIZES_FILE = "sizes.json"
# Written by `vdep build-shards`: its summary (with `complete`: every planned shard done) and its plan.
STATS_FILE = "stats.json"
BUILD_FILE = "build.json"
# Image members a shard sample may have (KEY.jpg, ...): the loader reads the first one present.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def split_member_name(name: str) -> tuple[str, str]:
    """A tar member's (sample key, extension), by WebDataset's rule: the key is the path up to the
    first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


@dataclass(frozen=True)
class Shard:
    path: str
    num_samples: int


@dataclass(frozen=True)
class ConsumerPlan:
    """What one consumer reads in one epoch: these shards in order, keeping samples i with
    i % stride == offset, and at most `limit` of them (resampling)."""

    shards: tuple[Shard, ...]
    stride: int
    offset: int
    limit: int | None = None

    @property
    def num_samples(self) -> int:
        total = sum(s.num_samples for s in self.shards)
        kept = len(range(self.offset, total, self.stride))
        return kept if self.limit is None else min(kept, self.limit)


def discover_shards(specs: list[str], settings: RemoteSettings | None = None) -> list[Shard]:
    """All shards of the given directories or remote prefixes (or single .tar files), with sizes from sizes.json.

    A folder that `vdep build-shards` is still building (or whose build stopped part-way) is refused by
    name (`check_build_finished`): training on it would use a subset, with a schedule sized to it."""
    shards: list[Shard] = []
    for spec in specs:
        if is_remote(spec):
            shards += _remote_shards(spec, settings or RemoteSettings())
            continue
        path = Path(spec)
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            if not tars:
                raise DataError(f"shard directory {path} holds no .tar files; build them with `vdep build-shards`")
            sizes = _read_sizes(path)
        elif path.is_file() and path.suffix == ".tar":
            tars = [path]
            sizes = _read_sizes(path.parent)
        else:
            raise DataError(f"{spec} is neither a shard directory nor a .tar shard")
        for tar in tars:
            if tar.name not in sizes:
                raise DataError(
                    f"{tar} is not listed in {tar.parent / SIZES_FILE}; rebuild the shards or add its sample count"
                )
            shards.append(Shard(str(tar), int(sizes[tar.name])))
    return shards


def _remote_shards(spec: str, settings: RemoteSettings) -> list[Shard]:
    if spec.endswith(".tar"):
        prefix, _, name = spec.rpartition("/")
        sizes = _parse_sizes(_read_remote_sizes(prefix, settings), join(prefix, SIZES_FILE))
        if name not in sizes:
            raise DataError(f"{spec} is not listed in {join(prefix, SIZES_FILE)}; rebuild the shards or add its count")
        return [Shard(spec, sizes[name])]
    sizes = _parse_sizes(_read_remote_sizes(spec, settings), join(spec, SIZES_FILE))
    if not sizes:
        raise DataError(f"{join(spec, SIZES_FILE)} names no shard")
    return [Shard(join(spec, name), count) for name, count in sorted(sizes.items())]


def folder_file(folder: str, name: str, settings: RemoteSettings | None = None) -> str | None:
    """The text of file `name` in a shard folder or remote prefix, or None when there is none."""
    if is_remote(folder):
        try:
            return read_text(join(folder, name), settings or RemoteSettings())
        except MissingShardError:
            return None
    path = Path(folder) / name
    return path.read_text() if path.is_file() else None


@dataclass(frozen=True)
class BuildProgress:
    """What a shard folder's stats.json says of its build: `vdep build-shards` writes it after every part
    (`complete` once every planned shard is done), and sizes.json only when the build is complete."""

    complete: bool | None  # None: no stats.json (no part has finished yet, or a folder not built by vdep)
    finished_shards: int | None = None
    planned_shards: int | None = None

    def describe(self) -> str:
        if self.finished_shards is not None and self.planned_shards is not None:
            return f"{self.finished_shards} of {self.planned_shards} shards are finished"
        return "no part of it has finished yet"


def build_progress(folder: str, settings: RemoteSettings | None = None) -> BuildProgress:
    text = folder_file(folder, STATS_FILE, settings)
    if text is None:
        return BuildProgress(None)
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{join(folder, STATS_FILE)} is not valid JSON ({exc}); write the summary again with "
                        "the build's `vdep build-shards ... --resume`") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("complete", True), bool):
        raise DataError(f"{join(folder, STATS_FILE)} must be an object whose 'complete' is true or false")

    def count(key: str) -> int | None:
        return stats[key] if isinstance(stats.get(key), int) else None

    return BuildProgress(stats.get("complete"), count("finished_shards"), count("planned_shards"))


def unfinished_build(folder: str, has_sizes: bool, settings: RemoteSettings | None = None) -> BuildProgress | None:
    """The progress of a folder whose `vdep build-shards` has not finished (None when it has, or when the folder
    is not a build's): its stats.json says complete: false, or it has no sizes.json and no stats.json but the
    build.json of a build that started there. A folder with neither (img2dataset's, or hand-made with a
    sizes.json) passes."""
    progress = build_progress(folder, settings)
    started = progress.complete is None and not has_sizes and folder_file(folder, BUILD_FILE, settings) is not None
    return progress if progress.complete is False or started else None


def check_build_finished(folder: str, has_sizes: bool, settings: RemoteSettings | None = None) -> None:
    """Refuse an unfinished build by name (`unfinished_build`)."""
    progress = unfinished_build(folder, has_sizes, settings)
    if progress is not None:
        raise DataError(
            f"{folder} holds an unfinished `vdep build-shards` build: {progress.describe()}, and {SIZES_FILE} is "
            "written only when every shard is (training on the shards so far would use a subset, with a schedule "
            "sized to it). Wait for the build's other parts (SLURM array tasks) to finish, or run the missing parts "
            "again (`--part K --num-parts P`) or the same build-shards command with --resume; "
            "`vdep inspect-shards` shows its progress"
        )


def _read_remote_sizes(prefix: str, settings: RemoteSettings) -> str:
    try:
        text: str | None = read_text(join(prefix, SIZES_FILE), settings)
    except MissingShardError:
        text = None
    check_build_finished(prefix, text is not None, settings)
    if text is None:
        raise DataError(
            f"{prefix} has no {SIZES_FILE} (shard name → sample count), which vdep needs to plan epochs and to find "
            "the shards (HTTP cannot list a folder): upload the one `vdep build-shards` wrote beside the shards "
            "(and its shard_stats/), or build into the bucket with `vdep build-shards --out s3://...`"
        )
    return text


def _read_sizes(directory: Path) -> dict[str, int]:
    path = directory / SIZES_FILE
    check_build_finished(str(directory), path.is_file())
    if not path.is_file():
        raise DataError(
            f"{directory} has no {SIZES_FILE} (shard name → sample count), which vdep needs to plan epochs; "
            "shards written by `vdep build-shards` have one"
        )
    return _parse_sizes(path.read_text(), str(path))


def _parse_sizes(text: str, source: str) -> dict[str, int]:
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise DataError(f"{source} must map shard file names to non-negative sample counts")
    return sizes


def resolve_split(split: Literal["auto", "shards", "samples", "resample"], num_shards: int, num_consumers: int) -> str:
    if split == "auto":
        return "shards" if num_shards >= num_consumers else "samples"
    if split == "shards" and num_shards < num_consumers:
        raise DataError(
            f"data.split=shards needs at least one shard per consumer, but there are {num_shards} shards for "
            f"{num_consumers} consumers (ranks × loader workers); use more shards or data.split=samples"
        )
    return split


def plan_epoch(shards: list[Shard], seed: int, epoch: int, num_consumers: int, split: str) -> list[ConsumerPlan]:
    """Every consumer's reading plan for one epoch (identical on every rank).

    `shards` and `samples` read every sample exactly once per epoch. `resample` lets each consumer
    draw shards with replacement (its own seeded stream) until it has its share, total / consumers
    samples: no consumer depends on another's shards, so any number of nodes and workers can read
    a shard set of any size, at the price of some samples being seen twice and others not at all in
    an epoch (as WebDataset's resampled shards).
    """
    if split == "resample":
        share = sum(s.num_samples for s in shards) // num_consumers
        plans = []
        for consumer in range(num_consumers):
            rng = random.Random(f"vdep-resample-{seed}-{epoch}-{consumer}")
            drawn: list[Shard] = []
            while sum(s.num_samples for s in drawn) < share:
                drawn.append(rng.choice(shards))
            plans.append(ConsumerPlan(tuple(drawn), 1, 0, share))
        return plans
    order = list(shards)
    random.Random(f"vdep-shards-{seed}-{epoch}").shuffle(order)
    if split == "shards":
        return [ConsumerPlan(tuple(order[c::num_consumers]), 1, 0) for c in range(num_consumers)]
    return [ConsumerPlan(tuple(order), num_consumers, c) for c in range(num_consumers)]


def micro_batches_per_rank(
    plans: list[ConsumerPlan], world_size: int, num_workers: int, micro_batch_size: int
) -> list[int]:
    """Full micro-batches each rank's loader yields in the epoch (each worker drops its last partial batch)."""
    workers = max(num_workers, 1)
    return [
        sum(plans[rank * workers + w].num_samples // micro_batch_size for w in range(workers))
        for rank in range(world_size)
    ]


def count_image_samples(shard: Shard, settings: RemoteSettings | None = None) -> int:
    """Samples with an image in a shard: from build-shards' `shard_stats/NNNNNN.json` when there is
    one, otherwise, for a local shard, by listing the tar's member names (headers only, no data read).
    Listing a remote tar costs a request per header block, so a remote shard needs its stats file."""
    if is_remote(shard.path):
        prefix, _, name = shard.path.rpartition("/")
        stats = join(prefix, f"shard_stats/{name.split('.')[0]}.json")
        try:
            return int(json.loads(read_text(stats, settings or RemoteSettings()))["with_image"])
        except MissingShardError:
            raise DataError(
                f"{stats} is missing: data.group_by_modality_length needs each remote shard's image count; upload "
                "the shard_stats/ folder that `vdep build-shards` wrote beside the shards"
            ) from None
    path = Path(shard.path)
    stats = path.parent / "shard_stats" / f"{path.name.split('.')[0]}.json"
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["with_image"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # fall back to reading the tar
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, extension = split_member_name(info.name)
                if extension.lower() in IMAGE_EXTENSIONS:
                    keys.add(key)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot list {path}: {exc}") from None
    return len(keys)


def image_fraction(shards: list[Shard], settings: RemoteSettings | None = None) -> float:
    """The share of samples with an image over all shards (modality grouping's quotas follow it)."""
    total = sum(s.num_samples for s in shards)
    return sum(count_image_samples(s, settings) for s in shards) / total if total else 0.0
