"""Where shard-builder records come from: LLaVA JSON/JSONL files and img2dataset tar output.

Planning reads every input once and returns a list of small, picklable `RecordRef`s in input order.
A ref says where one record lives, not what it holds for images (img2dataset image bytes are read by
the worker that builds the shard, by offset into the tar), so the plan of a large build stays small
and a shard can be built from its refs alone, in any process, in any order.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vdep.conventions import IMAGE_MARKER
from vdep.data.conversation import SampleError
from vdep.data.shards import IMAGE_EXTENSIONS, split_member_name
from vdep.errors import DataError

LLAVA_SUFFIXES = (".json", ".jsonl")
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class TarMember:
    offset: int  # byte offset of the member's data in the tar
    size: int


@dataclass
class RecordRef:
    """One input record: a LLaVA record (parsed JSON, or the error that parsing raised) or an
    img2dataset sample (its members' locations in the tar)."""

    file: str  # input file the record comes from
    index: int  # position in that file (line, list index, or sample number in the tar)
    record: object = None  # LLaVA: the parsed record, or a SampleError for a broken JSONL line
    members: dict[str, TarMember] = field(default_factory=dict)  # img2dataset: extension → location
    key: str | None = None  # img2dataset: the sample's key in its tar

    @property
    def is_img2dataset(self) -> bool:
        return self.key is not None

    @property
    def record_id(self) -> object:
        if self.is_img2dataset:
            return self.key
        return self.record.get("id") if isinstance(self.record, dict) else None


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Input files in order: .json/.jsonl files, img2dataset .tar files, and folders of .tar files."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            if not tars:
                raise DataError(f"input folder {path} holds no .tar files (img2dataset output is a folder of .tar shards)")
            files.extend(tars)
        elif path.is_file() and path.suffix in (*LLAVA_SUFFIXES, ".tar"):
            files.append(path)
        elif not path.exists():
            raise DataError(f"input {path} does not exist")
        else:
            raise DataError(f"input {path}: use LLaVA .json/.jsonl files, img2dataset .tar files or folders of them")
    return files


def read_llava_records(path: Path) -> list[RecordRef]:
    """A JSON list or a JSONL file; a broken JSONL line becomes a ref holding its `SampleError`."""
    refs: list[RecordRef] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as lines:
            for index, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record: object = json.loads(line)
                except json.JSONDecodeError as exc:
                    record = SampleError("bad_json", f"line {index + 1} is not valid JSON: {exc}")
                refs.append(RecordRef(str(path), index, record))
        return refs
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); for one record per line, name it .jsonl") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records (LLaVA format)")
    return [RecordRef(str(path), index, record) for index, record in enumerate(records)]


def read_img2dataset_tar(path: Path) -> list[RecordRef]:
    """The samples of one img2dataset tar (`KEY.jpg`, `KEY.txt`, `KEY.json`), by member location.

    Reading only the tar headers is cheap; the bytes are read later by offset. A tar that cannot be
    read at all is a `DataError` (it names the file); one cut short keeps the samples before the cut,
    and a sample that lost members is rejected with a reason when its shard is built.
    """
    samples: dict[str, dict[str, TarMember]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            try:
                for info in tar:
                    if not info.isfile() or "." not in Path(info.name).name:
                        continue
                    key, extension = split_member_name(info.name)
                    samples.setdefault(key, {})[extension.lower()] = TarMember(info.offset_data, info.size)
            except (tarfile.TarError, OSError):
                pass  # a truncated tar: keep what was listed before the damage
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{path} is not a readable tar file ({exc})") from None
    return [RecordRef(str(path), index, members=members, key=key) for index, (key, members) in enumerate(samples.items())]


def read_inputs(inputs: list[Path]) -> list[RecordRef]:
    refs: list[RecordRef] = []
    for path in expand_inputs(inputs):
        refs.extend(read_img2dataset_tar(path) if path.suffix == ".tar" else read_llava_records(path))
    return refs


def read_member(ref: RecordRef, extension: str) -> bytes:
    member = ref.members[extension]
    with open(ref.file, "rb") as tar:
        tar.seek(member.offset)
        data = tar.read(member.size)
    if len(data) != member.size:
        raise SampleError("missing_image", f"{ref.file}: member {ref.key}.{extension} is cut short")
    return data


def img2dataset_record(ref: RecordRef, caption_prompt: str) -> tuple[dict, str | None]:
    """An img2dataset sample as a LLaVA record (a one-turn caption conversation) and its image extension."""
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in ref.members), None)
    if image_extension is None:
        raise SampleError("missing_image", f"sample {ref.key} has no image member (members: {', '.join(ref.members)})")
    if "txt" not in ref.members:
        raise SampleError("missing_caption", f"sample {ref.key} has no .txt caption")
    try:
        caption = read_member(ref, "txt").decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SampleError("bad_caption", f"sample {ref.key}: the caption is not UTF-8 text") from None
    source: dict = {"key": ref.key}
    if "json" in ref.members:
        try:
            metadata = json.loads(read_member(ref, "json"))
            if isinstance(metadata, dict):
                source.update({k: metadata[k] for k in ("url", "width", "height") if k in metadata})
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # img2dataset metadata is optional; the sample stands without it
    record = {
        "id": ref.key,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_MARKER}\n{caption_prompt}"},
            {"from": "gpt", "value": caption},
        ],
        "source_metadata": source,
    }
    return record, image_extension
