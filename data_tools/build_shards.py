"""`vdep build-shards`: LLaVA-style JSON/JSONL + an image folder → WebDataset tar shards.

Each input record is `{"id": ..., "image": "relative/path.jpg" (optional), "conversations": [...]}`.
Output, in `--out`:
- `000000.tar`, `000001.tar`, ...: per sample `KEY.<image extension>` (the original bytes) and
  `KEY.json` (`{"id", "conversations", "source": {"file", "index"}}`); KEY is a 9-digit sequence number;
- `sizes.json`: shard file name → sample count (the loader plans epochs from it);
- `stats.json`: totals, the image/text-only mix, and rejections by reason;
- `errors.jsonl`: one line per rejected record: input file, index, id, reason, message.
A bad record never stops the build; it is counted and explained.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from vdep.data.conversation import SampleError, check_image_markers, parse_conversation
from vdep.data.dataset import IMAGE_EXTENSIONS
from vdep.data.images import decode_image
from vdep.data.shards import SIZES_FILE
from vdep.errors import DataError


@dataclass
class BuildReport:
    written: int = 0
    with_image: int = 0
    text_only: int = 0
    rejected: Counter = field(default_factory=Counter)
    shards: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"wrote {self.written} samples ({self.with_image} with image, {self.text_only} text-only) "
            f"in {len(self.shards)} shard(s)"
        ]
        if self.rejected:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.rejected.most_common())
            lines.append(f"rejected {sum(self.rejected.values())} record(s): {reasons} (details in errors.jsonl)")
        return "\n".join(lines)


def read_records(path: Path) -> Iterator[tuple[int, object]]:
    """(index, record) pairs of a JSON list or a JSONL file; a broken JSONL line yields a `SampleError`."""
    if path.suffix == ".jsonl":
        with path.open() as lines:
            for index, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield index, SampleError("bad_json", f"line {index + 1} is not valid JSON: {exc}")
        return
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); for one record per line, name it .jsonl") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records")
    yield from enumerate(records)


def prepare_record(record: object, image_root: Path) -> tuple[dict, str | None, bytes | None]:
    """Validate one record; returns (json payload, image extension, image bytes)."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("bad_record", "the record is not a JSON object")
    turns = parse_conversation(record.get("conversations"))
    image_name = record.get("image")
    check_image_markers(turns, image_name is not None)
    payload = {"id": record.get("id"), "conversations": record["conversations"]}
    if image_name is None:
        return payload, None, None
    if not isinstance(image_name, str):
        raise SampleError("bad_record", "'image' must be a relative path string")
    image_path = image_root / image_name
    extension = image_path.suffix.lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        raise SampleError("unsupported_image_format", f"{image_name}: use one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        data = image_path.read_bytes()
    except OSError as exc:
        raise SampleError("missing_image", f"{image_path}: {exc.strerror or exc}") from None
    decode_image(data)  # a truncated or non-image file is rejected here, not during training
    return payload, extension, data


def build_shards(inputs: list[Path], image_root: Path, out: Path, samples_per_shard: int = 1000) -> BuildReport:
    if samples_per_shard < 1:
        raise DataError("--samples-per-shard must be at least 1")
    for path in inputs:
        if not path.is_file():
            raise DataError(f"input {path} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise DataError(f"{out} already holds shards; choose an empty --out directory")
    report = BuildReport()
    with (out / "errors.jsonl").open("w") as errors, wds.ShardWriter(
        str(out / "%06d.tar"), maxcount=samples_per_shard, verbose=0
    ) as writer:
        for path in inputs:
            for index, record in read_records(path):
                try:
                    payload, extension, image = prepare_record(record, image_root)
                except SampleError as exc:
                    report.rejected[exc.reason] += 1
                    record_id = record.get("id") if isinstance(record, dict) else None
                    errors.write(json.dumps(
                        {"file": str(path), "index": index, "id": record_id, "reason": exc.reason, "message": str(exc)}
                    ) + "\n")
                    continue
                payload["source"] = {"file": path.name, "index": index}
                sample = {"__key__": f"{report.written:09d}", "json": json.dumps(payload).encode()}
                if image is not None:
                    sample[extension] = image
                    report.with_image += 1
                else:
                    report.text_only += 1
                writer.write(sample)
                shard_name = f"{report.written // samples_per_shard:06d}.tar"
                report.shards[shard_name] = report.shards.get(shard_name, 0) + 1
                report.written += 1
    (out / SIZES_FILE).write_text(json.dumps(report.shards, indent=1))
    (out / "stats.json").write_text(json.dumps({
        "samples": report.written,
        "with_image": report.with_image,
        "text_only": report.text_only,
        "rejected": dict(report.rejected),
        "shards": len(report.shards),
    }, indent=1))
    return report
