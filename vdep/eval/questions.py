"""Evaluation questions from a LLaVA-format file (JSON list or JSONL) or a shard directory.

Each record gives one question: its first user turn (with one `<image>` where each image goes: a record's
`image` is a file or a list of files, as in LLaVA-NeXT/OneVision data; a shard sample's images are its
members, `data/media.py`) and, as the reference answer, the first assistant turn. `category` (or the demo data's `kind`) groups the accuracy.
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
from ..errors import DataError


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the first user turn, `<image>` marker included
    reference: str  # the first assistant turn
    category: str | None = None
    # In marker order: image files (read when answered) or a shard sample's image members.
    images: tuple[Path | bytes, ...] = ()

    @property
    def has_image(self) -> bool:
        return bool(self.images)

    @property
    def image_files(self) -> list[Path]:
        return [image for image in self.images if isinstance(image, Path)]

    def read_images(self) -> list[bytes]:
        return [image if isinstance(image, bytes) else image.read_bytes() for image in self.images]

    @property
    def where(self) -> str:
        """What a bad image is reported under: the record's image files, or its id."""
        return ", ".join(map(str, self.image_files)) or self.id

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


def load_questions(data: Path, image_root: Path | None) -> QuestionSet:
    """The questions of a LLaVA .json/.jsonl file (images relative to `image_root`) or a shard directory."""
    if data.is_dir():
        return _from_shards(data)
    if not data.is_file():
        raise DataError(f"--data {data}: no such file or shard directory")
    if image_root is None:
        raise DataError(f"--data {data}: give --image-root, the folder the records' 'image' paths are relative to")
    questions = QuestionSet()
    for where, record in _file_records(data, questions):
        _add(questions, where, record, lambda names: _image_files(image_root, names))
    return questions


def questions_from_records(records: list, image_root: Path, source: str = "records") -> QuestionSet:
    """The questions of LLaVA records already read (the demo's held-out list)."""
    questions = QuestionSet()
    for index, record in enumerate(records):
        _add(questions, f"{source}[{index}]", record, lambda names: _image_files(image_root, names))
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


def _image_files(image_root: Path, names: object) -> tuple[Path, ...]:
    """A record's `image`: one file name or a list of them (LLaVA-NeXT/OneVision), relative to `image_root`."""
    listed = names if isinstance(names, list) else [names]
    if not listed or not all(isinstance(name, str) and name for name in listed):
        raise SampleError("bad_record", "'image' must be a file name or a non-empty list of file names")
    paths = tuple(image_root / name for name in listed)
    for path in paths:
        if not path.is_file():
            raise SampleError("missing_image", f"image {path} does not exist")
    return paths


def _shard_images(sample: dict) -> tuple[bytes, ...]:
    """A shard sample's images in marker order (`data/media.py`); a video is not asked."""
    entries = media_entries(json.loads(sample["json"]), sample)
    if any(entry.type == "video" for entry in entries):
        raise SampleError("unsupported_record", "a video: vdep eval answers questions about images")
    return tuple(sample[entry.members[0]] for entry in entries)


def _add(questions: QuestionSet, where: str, record: object, image_of, shard: bool = False) -> None:
    record_id = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None
    try:
        if not isinstance(record, dict):
            raise SampleError("bad_record", f"a record must be a JSON object, not {type(record).__name__}")
        turns = parse_conversation(record.get("conversations"))
        if record.get("video") is not None:
            raise SampleError("unsupported_record", "a video: vdep eval answers questions about images")
        images = image_of(record.get("image")) if shard or record.get("image") not in (None, "") else ()
        check_image_markers(turns, images=len(images))  # the record as training would take it
        # The question asked is the first turn: the images its markers stand for (the first ones, in marker order).
        images = images[: count_image_markers(turns[:1])]
    except SampleError as exc:
        questions.bad.append(BadRecord(where, record_id, f"{exc.reason}: {exc}"))
        return
    category = record.get("category", record.get("kind"))
    questions.questions.append(Question(
        id=record_id if record_id is not None else where, question=turns[0].text, reference=turns[1].text,
        category=None if category is None else str(category), images=images,
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
                _add(questions, where, record, lambda _name, sample=sample: _shard_images(sample), shard=True)
    return questions
