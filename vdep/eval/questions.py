"""Evaluation questions from a LLaVA-format file (JSON list or JSONL) or a shard directory.

Each record gives one question: its first user turn (with one `<image>` where each image goes: a record's
`image` is a file or a list of files, as in LLaVA-NeXT/OneVision data; its `video` a video file or a list of
frame images, marked with `<image>` too; a shard sample's images and video frames are its members,
`data/media.py`) and, as the reference answer, the first assistant turn. `category` (or the demo data's `kind`) groups the accuracy.
A record that cannot be used (broken JSON, no conversation, missing or undecodable image, ...) is a
`BadRecord`: counted and named in the report, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..conventions import IMAGE_MARKER
from ..data.conversation import SampleError, check_image_markers, count_image_markers, parse_conversation
from ..data.media import media_entries
from ..data.remote import RemoteSettings
from ..data.shards import discover_shards
from ..data.tar_reader import iterate_samples, open_shard
from ..data_tools.media import MediaSource, VideoSampling, media_sources
from ..errors import DataError

# build-shards' own defaults (--video-fps 1.0, --max-frames 32): a video is asked as training would have stored it.
BUILD_VIDEO_SAMPLING = VideoSampling()


@dataclass(frozen=True)
class QuestionVideo:
    """A question's video: a video file (decoded and sampled when the question is answered, as build-shards does:
    `data_tools.media.decode_video`) or its frames (image files, already sampled, or a shard sample's members)."""

    file: Path | None = None
    frames: tuple[Path | bytes, ...] = ()
    sampling: VideoSampling = BUILD_VIDEO_SAMPLING  # which frames of `file` are kept (vdep eval --video-fps, --max-frames)

    @property
    def where(self) -> str:
        return str(self.file) if self.file is not None else ", ".join(str(f) for f in self.frames if isinstance(f, Path))


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the first user turn, `<image>` marker included
    reference: str  # the first assistant turn
    category: str | None = None
    # In marker order: image files (read when answered) or a shard sample's image members.
    images: tuple[Path | bytes, ...] = ()
    # A video, asked after the images (a record holds `image` or `video`, not both; docs/data.md).
    video: QuestionVideo | None = None

    @property
    def has_image(self) -> bool:
        return bool(self.images) or self.video is not None

    @property
    def image_files(self) -> list[Path]:
        return [image for image in self.images if isinstance(image, Path)]

    def read_images(self) -> list[bytes]:
        return [image if isinstance(image, bytes) else image.read_bytes() for image in self.images]

    @property
    def where(self) -> str:
        """What a bad image or video is reported under: the record's files, or its id."""
        return ", ".join(map(str, self.image_files)) or (self.video.where if self.video is not None else "") or self.id

    @property
    def text(self) -> str:
        """The question without its image marker (what a chat message's text part holds)."""
        return self.question.replace(IMAGE_MARKER, "").strip()


@dataclass(frozen=True)
class BadRecord:
    where: str  # file and record number or shard and sample key
    record_id: str | None
    reason: str

    def describe(self) -> str:
        return f"{self.where}" + (f" (id {self.record_id})" if self.record_id is not None else "") + f": {self.reason}"


@dataclass
class QuestionSet:
    questions: list[Question] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


def load_questions(data: Path, image_root: Path | None, video: VideoSampling = BUILD_VIDEO_SAMPLING) -> QuestionSet:
    """The questions of a LLaVA .json/.jsonl file (images and videos relative to `image_root`, a video's frames kept
    as build-shards keeps them with `video`) or a shard directory (its frames were sampled when it was built)."""
    if data.is_dir():
        return _from_shards(data)
    if not data.is_file():
        raise DataError(f"--data {data}: no such file or shard directory")
    if image_root is None:
        raise DataError(f"--data {data}: give --image-root, the folder the records' 'image' paths are relative to")
    questions = QuestionSet()
    for where, record in _file_records(data, questions):
        _add(questions, where, record, lambda record: _record_media(image_root, record, video))
    return questions


def questions_from_records(records: list, image_root: Path, source: str = "records") -> QuestionSet:
    """The questions of LLaVA records already read (the demo's held-out list)."""
    questions = QuestionSet()
    for index, record in enumerate(records):
        _add(questions, f"{source}[{index}]", record, lambda record: _record_media(image_root, record))
    return questions


def _file_records(data: Path, questions: QuestionSet):
    text = data.read_text(encoding="utf-8")
    if data.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{data}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                questions.bad.append(BadRecord(f"{data}:{number}", None, f"not JSON ({exc.msg})"))
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--data {data}: not a JSON list of records ({exc}); a .jsonl file holds one per line") from None
    if not isinstance(records, list):
        raise DataError(f"--data {data}: the JSON holds a {type(records).__name__}, not a list of LLaVA records")
    for index, record in enumerate(records):
        yield f"{data}[{index}]", record


def _record_media(image_root: Path, record: dict, sampling: VideoSampling = BUILD_VIDEO_SAMPLING
                  ) -> tuple[tuple[Path, ...], QuestionVideo | None]:
    """A record's `image` (a file name or a list of them) and `video` (a video file or a list of frame images),
    relative to `image_root`, read for form as build-shards reads them (`data_tools.media.media_sources`); a
    video's frames are kept as build-shards keeps them with `sampling`."""
    if record.get("image") == "":
        record = {key: value for key, value in record.items() if key != "image"}  # LLaVA's text-only records
    images: tuple[Path, ...] = ()
    video = None
    for source in media_sources(record):
        paths = tuple(image_root / name for name in source.paths)
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            kind = "video" if source.is_file else "image"
            raise SampleError(f"missing_{kind}", f"{kind} {missing} does not exist")
        if source.type == "image":
            images += paths
        else:
            video = _question_video(source, paths, sampling)
    return images, video


def _question_video(source: MediaSource, paths: tuple[Path, ...], sampling: VideoSampling) -> QuestionVideo:
    if source.is_file:
        return QuestionVideo(file=paths[0], sampling=sampling)
    if len(paths) > sampling.max_frames:
        paths = tuple(paths[i] for i in sampling.indices(len(paths), None))
    return QuestionVideo(frames=paths)


def _shard_media(sample: dict) -> tuple[tuple[bytes, ...], QuestionVideo | None]:
    """A shard sample's images in marker order, and its video's frames (`data/media.py`)."""
    entries = media_entries(json.loads(sample["json"]), sample)
    images = tuple(sample[entry.members[0]] for entry in entries if entry.type == "image")
    videos = [QuestionVideo(frames=tuple(sample[name] for name in entry.members)) for entry in entries
              if entry.type == "video"]
    return images, (videos[0] if videos else None)


def _add(questions: QuestionSet, where: str, record: object, media_of) -> None:
    record_id = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None
    try:
        if not isinstance(record, dict):
            raise SampleError("bad_record", f"a record must be a JSON object, not {type(record).__name__}")
        turns = parse_conversation(record.get("conversations"))
        images, video = media_of(record)
        check_image_markers(turns, images=len(images) + (video is not None))  # the record as training would take it
        # The question asked is the first turn: the images its markers stand for (the first ones, in marker order;
        # a video comes after the images).
        asked = count_image_markers(turns[:1])
        images, video = images[:asked], (video if asked > len(images) else None)
    except SampleError as exc:
        questions.bad.append(BadRecord(where, record_id, f"{exc.reason}: {exc}"))
        return
    category = record.get("category", record.get("kind"))
    questions.questions.append(Question(
        id=record_id if record_id is not None else where, question=turns[0].text, reference=turns[1].text,
        category=None if category is None else str(category), images=images, video=video,
    ))


def _from_shards(folder: Path) -> QuestionSet:
    questions = QuestionSet()
    settings = RemoteSettings()
    for index, shard in enumerate(discover_shards([str(folder)], settings)):
        with open_shard(shard.path, settings) as stream:
            for sample in iterate_samples(stream, shard.path, index):
                where = f"{shard.path}:{sample['__key__']}"
                try:
                    record = json.loads(sample.get("json", b"null"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    questions.bad.append(BadRecord(where, None, "bad_json: its .json member is not JSON"))
                    continue
                _add(questions, where, record, lambda _record, sample=sample: _shard_media(sample))
    return questions
