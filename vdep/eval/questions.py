"""Evaluation questions from a LLaVA-format file (JSON list or JSONL) or a shard directory.

Each record gives one question: its first user turn (with `<image>` where the image goes) and, as the
reference answer, the first assistant turn. `category` (or the demo data's `kind`) groups the accuracy.
A record that cannot be used (broken JSON, no conversation, missing or undecodable image, ...) is a
`BadRecord`: counted and named in the report, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..conventions import IMAGE_MARKER
from ..data.conversation import SampleError, check_image_markers, parse_conversation
from ..data.remote import RemoteSettings
from ..data.shards import IMAGE_EXTENSIONS, discover_shards
from ..data.tar_reader import iterate_samples, open_shard
from ..errors import DataError


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the first user turn, `<image>` marker included
    reference: str  # the first assistant turn
    category: str | None = None
    image_path: Path | None = None  # a file's image (read when answered)
    image_bytes: bytes | None = None  # a shard sample's image

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_bytes is not None

    def read_image(self) -> bytes:
        return self.image_bytes if self.image_bytes is not None else self.image_path.read_bytes()  # type: ignore[union-attr]

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
        _add(questions, where, record, lambda name: _image_file(image_root, name))
    return questions


def questions_from_records(records: list, image_root: Path, source: str = "records") -> QuestionSet:
    """The questions of LLaVA records already read (the demo's held-out list)."""
    questions = QuestionSet()
    for index, record in enumerate(records):
        _add(questions, f"{source}[{index}]", record, lambda name: _image_file(image_root, name))
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


def _image_file(image_root: Path, name: str) -> dict:
    path = image_root / name
    if not path.is_file():
        raise SampleError("missing_image", f"image {path} does not exist")
    return {"image_path": path}


def _add(questions: QuestionSet, where: str, record: object, image_of) -> None:
    record_id = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else None
    try:
        if not isinstance(record, dict):
            raise SampleError("bad_record", f"a record must be a JSON object, not {type(record).__name__}")
        turns = parse_conversation(record.get("conversations"))
        _one_image_only(record)
        image = image_of(record["image"]) if record.get("image") else {}
        check_image_markers(turns[:1], bool(image))
    except SampleError as exc:
        questions.bad.append(BadRecord(where, record_id, f"{exc.reason}: {exc}"))
        return
    category = record.get("category", record.get("kind"))
    questions.questions.append(Question(
        id=record_id if record_id is not None else where, question=turns[0].text, reference=turns[1].text,
        category=None if category is None else str(category), **image,
    ))


def _one_image_only(record: dict) -> None:
    """vdep eval asks about one image per question: a record with several images or a video is named, not read
    wrongly (training takes them: docs/data.md; their evaluation is issue 25's next item)."""
    images = record.get("image")
    if isinstance(images, list):
        if len(images) != 1:
            raise SampleError("unsupported_record", f"{len(images)} images: vdep eval answers questions about one image")
        record["image"] = images[0]
    if record.get("video") is not None or record.get("media") is not None:
        raise SampleError("unsupported_record", "a video or several images: vdep eval answers questions about one image")


def _from_shards(folder: Path) -> QuestionSet:
    questions = QuestionSet()
    settings = RemoteSettings()
    for index, shard in enumerate(discover_shards([str(folder)], settings)):
        with open_shard(shard.path, settings) as stream:
            for sample in iterate_samples(stream, shard.path, index):
                where = f"{shard.path}:{sample['__key__']}"
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                try:
                    record = json.loads(sample.get("json", b"null"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    questions.bad.append(BadRecord(where, None, "bad_json: its .json member is not JSON"))
                    continue
                if isinstance(record, dict) and image is not None:
                    record = {**record, "image": sample["__key__"]}
                _add(questions, where, record, lambda _name, data=image: {"image_bytes": data})
    return questions
