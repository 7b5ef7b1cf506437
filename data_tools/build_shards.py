"""`vdep build-shards`: LLaVA JSON/JSONL, img2dataset tars and text-only conversations → WebDataset shards.

The build is planned before anything is written: every input record gets a position in one order
(input order, or a seeded permutation with `--shuffle`), and shard `i` holds the accepted records among
positions `[i·N, (i+1)·N)`. A shard is therefore a function of its slice of the plan only, which gives:

- deterministic keys (`KEY` = the record's 9-digit position in the plan) and contents;
- parallel workers that each build whole shards, with no coordination;
- atomic shards: a shard is written under a temporary name (`NNNNNN.tar.<pid>.tmp`, see `vdep.atomic`)
  and renamed when complete, then its stats file `shard_stats/NNNNNN.json` is written (also atomically):
  that file is the shard's "done" mark;
- `--resume` after a crash: shards with a done mark are kept, the rest are built again (first removing
  the temporary files that killed writers left of those shards, and only of those; for a remote output,
  the staging areas of dead processes, output.py);
- a worker process that raises or dies (killed, out of memory) ends the build with an error naming its
  shard; the shards finished so far keep their done marks for `--resume`;
- disjoint parts of one plan in a SLURM array (`--part K --num-parts P`), all writing into one folder.

Output in `--out`: `NNNNNN.tar` (per sample `KEY.<image extension>` with the original bytes unless a
mode conversion or `--max-side` re-encoded them, and `KEY.json` with `id`, `conversations` and `source`),
`sizes.json` (shard → count; written only when every planned shard is done, so that no training run
plans from part of a build), `stats.json` (totals, modality mix, rejections by reason, conversions,
`complete`: whether every planned shard is done; written after every part),
`errors.jsonl` (one line per rejected record with file, index, id, reason and message) and
`build.json` (the options and input fingerprint that `--resume` checks).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import random
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from vdep.atomic import atomic_path
from vdep.data.conversation import SampleError, check_image_markers, parse_conversation
from vdep.data.shards import BUILD_FILE, SIZES_FILE, STATS_FILE
from vdep.errors import DataError

from .image_fixing import fix_image
from .media import StoredMedia, VideoSampling, media_sources, read_media
from .output import BuildOutput
from .sources import DEFAULT_CAPTION_PROMPT, RecordRef, expand_inputs, img2dataset_record, read_inputs, read_member

SHARD_STATS_DIR = "shard_stats"
# Rejected records the summary names on the console (all of them are in errors.jsonl).
ERRORS_SHOWN = 5


@dataclass(frozen=True)
class BuildOptions:
    inputs: list[Path]
    image_root: Path | None
    out: Path | str  # a folder, or a remote prefix (s3://BUCKET/PREFIX, gs://...)
    samples_per_shard: int = 1000
    workers: int = 1
    shuffle: bool = False
    seed: int = 0
    resume: bool = False
    max_error_rate: float = 0.1
    max_side: int | None = None
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    part: int = 0
    num_parts: int = 1
    progress: bool = True
    staging: Path | None = None  # where a remote build writes each file before uploading it
    video: VideoSampling = field(default_factory=VideoSampling)  # which frames of a video file are stored

    @property
    def output(self) -> BuildOutput:
        return BuildOutput(self.out, self.staging)

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise DataError("--samples-per-shard must be at least 1")
        if self.workers < 1:
            raise DataError("--workers must be at least 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise DataError("--max-error-rate is a fraction between 0 and 1 (0.1 allows 10% rejected records)")
        if self.max_side is not None and self.max_side < 1:
            raise DataError("--max-side must be a positive number of pixels")
        if not 0 <= self.part < self.num_parts:
            raise DataError(f"--part {self.part} must lie in 0..{self.num_parts - 1} (--num-parts {self.num_parts})")
        if self.video.fps <= 0 or self.video.max_frames < 1:
            raise DataError("--video-fps must be positive and --max-frames at least 1")

    def plan_settings(self) -> dict:
        """What decides the shards' contents; `--resume` refuses to continue a build made with other values."""
        files = expand_inputs(self.inputs)
        return {
            "inputs": [{"file": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
            "image_root": str(self.image_root.resolve()) if self.image_root else None,
            "samples_per_shard": self.samples_per_shard,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "max_side": self.max_side,
            "caption_prompt": self.caption_prompt,
            # Only when not the default: a build.json written before videos were read stays valid for --resume.
            **({"video": asdict(self.video)} if self.video != VideoSampling() else {}),
        }


@dataclass
class ShardResult:
    """One shard's outcome; also the content of its `shard_stats/NNNNNN.json` done mark."""

    shard: int
    records: int = 0
    written: int = 0
    with_image: int = 0
    text_only: int = 0
    image_bytes: int = 0
    images: int = 0  # images of the samples (a sample may hold several)
    videos: int = 0
    frames: int = 0  # video frames stored
    rejected: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)  # original mode → count
    resized: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return shard_name(self.shard)


@dataclass
class BuildReport:
    shards: list[ShardResult]
    planned_shards: int
    reused_shards: int = 0
    seconds: float = 0.0

    def total(self, attribute: str) -> int:
        return sum(getattr(s, attribute) for s in self.shards)

    def counter(self, attribute: str) -> Counter:
        total: Counter = Counter()
        for shard in self.shards:
            total.update(getattr(shard, attribute))
        return total

    @property
    def written(self) -> int:
        return self.total("written")

    @property
    def records(self) -> int:
        return self.total("records")

    @property
    def rejected(self) -> Counter:
        return self.counter("rejected")

    @property
    def error_rate(self) -> float:
        return sum(self.rejected.values()) / self.records if self.records else 0.0

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        lines = [
            (f"wrote {self.written} samples ({self.total('with_image')} with image, {self.total('text_only')} "
             f"text-only) in {sum(1 for s in self.shards if s.written)} shard(s) from {self.records} records "
             f"({self.reused_shards} shard(s) kept from an earlier run; {rate:.0f} records/s)")
        ]
        if self.rejected:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.rejected.most_common())
            lines.append(
                f"rejected {sum(self.rejected.values())} record(s) ({100 * self.error_rate:.2f}%): {reasons} "
                "(details in errors.jsonl)"
            )
            errors = [error for shard in self.shards for error in shard.errors]
            for error in errors[:ERRORS_SHOWN]:
                record = f"{error['file']} record {error['index']}" + (f" (id {error['id']})" if error["id"] is not None else "")
                lines.append(f"  {record}: {error['message']} [{error['reason']}]")
            if len(errors) > ERRORS_SHOWN:
                lines.append(f"  ... and {len(errors) - ERRORS_SHOWN} more")
        converted = self.counter("converted")
        if converted or self.total("resized"):
            modes = ", ".join(f"{mode}: {count}" for mode, count in converted.most_common())
            lines.append(f"re-encoded: {self.total('resized')} resized, mode conversions {modes or 'none'}")
        return "\n".join(lines)


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def done_mark(index: int) -> str:
    return f"{SHARD_STATS_DIR}/{index:06d}.json"


def remove_leftovers(output: BuildOutput, index: int) -> None:
    """The temporary files of shard `index` (and of its done mark) that a killed writer left in a local
    output folder. (A remote build's are in the staging area of the process that died, which the build
    removes whole: BuildOutput.remove_stale_staging.)

    Temporary names carry the writer's pid (`vdep.atomic`), so the pattern names this shard's only:
    the parts of an array job share the folder, and another part may be writing its shards now."""
    if output.remote:
        return
    shard, folder = shard_name(index), output.local
    mark = output.path(done_mark(index))
    for path in [folder / f"{shard}.tmp",  # the name used before vdep.atomic
                 *folder.glob(f"{shard}.*.tmp"), *mark.parent.glob(f"{mark.name}.*.tmp")]:
        path.unlink(missing_ok=True)


class _NoSample(Exception):
    """Every record of a shard was rejected: leave the block without renaming its temporary file."""


# ------------------------------------------------------------------------------------------ one record
def prepare_record(ref: RecordRef, image_root: Path | None, options: BuildOptions) -> tuple[dict, StoredMedia]:
    """Validate one record; returns (json payload, the pictures to store with it)."""
    record: object = ref.record
    extension: str | None = None
    if ref.is_img2dataset:
        record, extension = img2dataset_record(ref, options.caption_prompt)
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("bad_record", "the record is not a JSON object")
    turns = parse_conversation(record.get("conversations"))
    sources = [] if extension is not None else media_sources(record)
    check_image_markers(turns, images=1 if extension is not None else len(sources))
    payload = {"id": record.get("id"), "conversations": record["conversations"]}
    if extension is not None:  # img2dataset
        payload["source_metadata"] = record["source_metadata"]
        return payload, img2dataset_media(ref, extension, options)
    media = read_media(sources, image_root, options.max_side, options.video)
    if media.media_json() is not None:
        payload["media"] = media.media_json()
    return payload, media


def img2dataset_media(ref: RecordRef, extension: str, options: BuildOptions) -> StoredMedia:
    fixed = fix_image(read_member(ref, extension), extension, options.max_side, f"member {ref.key}.{extension} of {ref.file}")
    media = StoredMedia(converted=[fixed.converted_from] if fixed.converted_from else [],
                        resized=int(fixed.resized_from is not None))
    media.add("image", [(fixed.extension, fixed.data)])
    return media


# ------------------------------------------------------------------------------------------ one shard
def build_shard(index: int, refs: list[tuple[int, RecordRef]], options: BuildOptions) -> ShardResult:
    """Write shard `index` from its (plan position, record) pairs; atomic, then the done mark."""
    started = time.perf_counter()
    result = ShardResult(index, records=len(refs))
    output = options.output
    try:
        with atomic_path(output.path(shard_name(index))) as temporary:
            with tarfile.open(temporary, "w") as tar:
                for position, ref in refs:
                    _add_record(tar, position, ref, options, result)
            if not result.written:
                raise _NoSample
    except _NoSample:
        pass  # nothing accepted: no shard (atomic_path removed the file), but the done mark records why
    else:
        output.publish(shard_name(index))  # uploaded (remote) before its done mark
    result.seconds = time.perf_counter() - started
    output.write_text(done_mark(index), json.dumps(asdict(result)))
    return result


def _add_record(tar: tarfile.TarFile, position: int, ref: RecordRef, options: BuildOptions, result: ShardResult) -> None:
    try:
        payload, media = prepare_record(ref, options.image_root, options)
    except SampleError as exc:
        result.rejected[exc.reason] = result.rejected.get(exc.reason, 0) + 1
        result.errors.append({"file": ref.file, "index": ref.index, "id": _jsonable(ref.record_id),
                              "reason": exc.reason, "message": str(exc)})
        return
    key = f"{position:09d}"
    payload["source"] = {"file": Path(ref.file).name, "index": ref.index}
    _add_member(tar, f"{key}.json", json.dumps(payload, ensure_ascii=False).encode())
    for entry, (_, data) in zip((m for e in media.entries for m in e.members), media.pictures):
        _add_member(tar, f"{key}.{entry}", data)
    _count_media(result, media)
    result.written += 1


def _count_media(result: ShardResult, media: StoredMedia) -> None:
    if not media.pictures:
        result.text_only += 1
        return
    result.with_image += 1
    result.images += media.images
    result.videos += media.videos
    result.frames += media.frames
    result.image_bytes += sum(len(data) for _, data in media.pictures)
    for mode in media.converted:
        result.converted[mode] = result.converted.get(mode, 0) + 1
    result.resized += media.resized


def _jsonable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical bytes for identical inputs
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


Task = tuple[int, list[tuple[int, RecordRef]], BuildOptions]  # build_shard's arguments


def _in_shard(index: int) -> str:
    return f"while building shard {shard_name(index)}"


def build_serially(tasks: list[Task]) -> Iterator[ShardResult]:
    for task in tasks:
        try:
            yield build_shard(*task)
        except Exception as exc:
            exc.add_note(_in_shard(task[0]))
            raise


def build_in_parallel(tasks: list[Task], workers: int) -> Iterator[ShardResult]:
    """Results in the order they finish, from forked worker processes (they inherit the imported modules).

    A worker that raises ends the build with its exception (its shard named); one that dies (a signal,
    the out-of-memory killer) breaks the pool, which ends the build with a `DataError` naming the
    shards left unfinished. Either way nothing waits for a result that will not come; the shards done
    so far keep their done marks for `--resume`.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    futures = {pool.submit(build_shard, *task): task[0] for task in tasks}
    unfinished = set(futures.values())
    try:
        for future in as_completed(futures):
            shard = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                names = ", ".join(shard_name(i) for i in sorted(unfinished))
                raise DataError(
                    f"a worker process died (killed by a signal, perhaps by the out-of-memory killer) while building "
                    f"the shards; unfinished: {names}. The shards finished so far are kept: run the same command "
                    "with --resume to build the rest (with fewer --workers if memory ran out)"
                ) from None
            except Exception as exc:
                exc.add_note(f"{_in_shard(shard)} in a worker process")
                raise
            unfinished.discard(shard)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ the build
def plan_positions(num_records: int, shuffle: bool, seed: int) -> list[int]:
    """The plan: record indices (into the concatenated inputs) in shard order."""
    order = list(range(num_records))
    if shuffle:
        random.Random(f"vdep-build-{seed}").shuffle(order)
    return order


def load_done_marks(output: BuildOutput, shards: range) -> dict[int, ShardResult]:
    marks, tars = output.listing(f"{SHARD_STATS_DIR}/*.json"), output.listing("*.tar")  # one listing each
    done: dict[int, ShardResult] = {}
    for index in shards:
        if done_mark(index) not in marks:
            continue
        result = ShardResult(**json.loads(output.read_text(done_mark(index)) or "{}"))
        if result.written and shard_name(index) not in tars:
            continue  # the mark outlived its shard (deleted by hand): build it again
        done[index] = result
    return done


def prepare_out_dir(options: BuildOptions) -> None:
    output = options.output
    out = output.location
    output.prepare()
    output.path(SHARD_STATS_DIR).mkdir(parents=True, exist_ok=True)
    settings = options.plan_settings()
    previous_text = output.read_text(BUILD_FILE)
    if previous_text is not None:
        previous = json.loads(previous_text)
        if not options.resume and options.num_parts == 1:
            raise DataError(f"{out} already holds a build; choose an empty --out folder, or pass --resume to finish it")
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise DataError(
                f"{out} holds a build made with different settings ({', '.join(changed)}); --resume continues "
                "only the same plan: use the original inputs and options, or a new --out folder"
            )
    elif options.num_parts == 1 and output.listing("*.tar"):  # (parts start together: another may be writing)
        raise DataError(f"{out} already holds shards; choose an empty --out folder")
    else:
        output.write_text(BUILD_FILE, json.dumps(settings, indent=1))


def build_shards(options: BuildOptions) -> BuildReport:
    options.check()
    output = options.output
    # What dead builds staged for this output (a killed part, a build's workers) goes at the start; this build's
    # own staging, and its workers', when it ends, whether it succeeded or failed (output.py, "Staging").
    output.remove_stale_staging()
    try:
        return _build(options, output)
    finally:
        output.end_staging()


def _build(options: BuildOptions, output: BuildOutput) -> BuildReport:
    started = time.perf_counter()
    prepare_out_dir(options)
    refs = read_inputs(options.inputs)
    order = plan_positions(len(refs), options.shuffle, options.seed)
    per_shard = options.samples_per_shard
    planned = math.ceil(len(order) / per_shard)
    mine = range(planned * options.part // options.num_parts, planned * (options.part + 1) // options.num_parts)
    done = load_done_marks(output, mine) if options.resume or options.num_parts > 1 else {}
    tasks = [
        (index, [(p, refs[order[p]]) for p in range(index * per_shard, min((index + 1) * per_shard, len(order)))], options)
        for index in mine if index not in done
    ]
    for index, _, _ in tasks:  # a shard of this part whose writer died is written again below
        remove_leftovers(output, index)
    results = dict(done)
    parallel = options.workers > 1 and len(tasks) > 1
    # A build that fails leaves here with the exception, before the summary; the done marks stay for --resume,
    # which writes it. (A part that finishes while others have not writes stats.json with complete: false and no
    # sizes.json, which the loader refuses by name.)
    results_in_order = build_in_parallel(tasks, min(options.workers, len(tasks))) if parallel else build_serially(tasks)
    kept = 0
    with progress_bar(sum(len(t[1]) for t in tasks), options.progress) as progress:
        for result in results_in_order:
            results[result.shard] = result
            kept += result.written
            progress.set_postfix(kept=kept, refresh=False)
            progress.update(result.records)
    report = BuildReport([results[i] for i in sorted(results)], planned, reused_shards=len(done))
    report.seconds = time.perf_counter() - started
    write_summary(output, planned)
    return report


def write_summary(output: BuildOutput, planned: int) -> None:
    """stats.json and errors.jsonl from every done mark in the folder (all parts so far), and sizes.json once
    every planned shard is done: the loader plans epochs from sizes.json, so an unfinished build has none
    (and its stats.json says complete: false, which the loader refuses by name, shards.check_build_finished).

    Parts of an array job finish at about the same time: each writes after its last done mark, and writes
    again while the marks it sees change, so the last summary written counts every part's shards."""
    marks = output.listing(f"{SHARD_STATS_DIR}/*.json")
    while True:
        _write_summary_of(output, planned)
        seen, marks = marks, output.listing(f"{SHARD_STATS_DIR}/*.json")
        if marks == seen:
            return


def _write_summary_of(output: BuildOutput, planned: int) -> None:
    results = load_done_marks(output, range(planned))
    complete = len(results) == planned
    sizes = {shard_name(i): r.written for i, r in sorted(results.items()) if r.written}
    if complete:  # before stats.json: a reader that finds complete: true finds sizes.json too
        output.write_text(SIZES_FILE, json.dumps(sizes, indent=1))
    report = BuildReport(list(results.values()), planned)
    stats = {
        "complete": complete,
        "planned_shards": planned,
        "finished_shards": len(results),
        "records": report.records,
        "samples": report.written,
        "with_image": report.total("with_image"),
        "text_only": report.total("text_only"),
        "images": report.total("images"),
        "videos": report.total("videos"),
        "frames": report.total("frames"),
        "image_bytes": report.total("image_bytes"),
        "rejected": dict(report.rejected.most_common()),
        "error_rate": round(report.error_rate, 6),
        "converted_modes": dict(report.counter("converted").most_common()),
        "resized": report.total("resized"),
        "shards": len(sizes),
    }
    output.write_text(STATS_FILE, json.dumps(stats, indent=1))
    lines = [json.dumps(error, ensure_ascii=False) for _, r in sorted(results.items()) for error in r.errors]
    output.write_text("errors.jsonl", "".join(line + "\n" for line in lines))


def progress_bar(total: int, enabled: bool) -> tqdm:
    """Records done, kept, rate and ETA on stderr: live on a terminal, at most one update every 30 s in a
    log file (SLURM); the first and last states are always shown."""
    terminal = sys.stderr.isatty()
    return tqdm(total=total, desc="build-shards", unit=" records", file=sys.stderr,
                disable=not enabled or total == 0, mininterval=0.5 if terminal else 30.0, miniters=1,
                dynamic_ncols=terminal, ascii=not terminal)
