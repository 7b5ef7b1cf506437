"""`vdep inspect-shards DIR`: what a shard folder holds, and whether `sizes.json` tells the truth.

Reads every tar (sequentially, without decoding images), counts samples and the image/text-only mix,
checks each count against `sizes.json` (the loader plans epochs from it, so a wrong count means wrong
epoch lengths), and with `--tokenizer` tokenizes every conversation with a template to give the
token-length histogram that `data.max_length` should be chosen from. A few samples are printed as
they will be read.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from vdep.data.conversation import SampleError, parse_conversation
from vdep.data.shards import IMAGE_EXTENSIONS, SIZES_FILE
from vdep.errors import DataError

LENGTH_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)


@dataclass
class ShardInspection:
    samples: int = 0
    with_image: int = 0
    text_only: int = 0
    image_formats: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    unusable: Counter = field(default_factory=Counter)  # samples the loader would skip, by reason
    mismatches: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def inspect_shards(folder: Path, encode=None, num_examples: int = 3) -> ShardInspection:
    """`encode(turns, has_image) -> token count` gives token lengths (see `make_length_encoder`)."""
    sizes_path = folder / SIZES_FILE
    if not sizes_path.is_file():
        raise DataError(f"{folder} has no {SIZES_FILE}; is it a folder written by `vdep build-shards`?")
    sizes = json.loads(sizes_path.read_text())
    tars = sorted(folder.glob("*.tar"))
    report = ShardInspection()
    for name in sorted(set(sizes) - {t.name for t in tars}):
        report.mismatches.append(f"{name} is listed in {SIZES_FILE} but missing")
    for tar in tars:
        count = 0
        try:
            for sample in wds.tariterators.tarfile_samples([{"url": str(tar)}]):
                count += 1
                members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
                _inspect_sample(report, tar, sample["__key__"], members, encode, num_examples)
        except (tarfile.TarError, OSError) as exc:
            report.mismatches.append(f"{tar.name} cannot be read after {count} samples: {exc}")
        report.samples += count
        if tar.name not in sizes:
            report.mismatches.append(f"{tar.name} holds {count} samples but is not listed in {SIZES_FILE}")
        elif sizes[tar.name] != count:
            report.mismatches.append(f"{tar.name} holds {count} samples but {SIZES_FILE} says {sizes[tar.name]}")
    return report


def _inspect_sample(report: ShardInspection, tar: Path, key: str, members: dict, encode, num_examples: int) -> None:
    image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_format:
        report.with_image += 1
        report.image_formats[image_format] += 1
    else:
        report.text_only += 1
    try:
        meta = json.loads(members.get("json", b"null"))
        turns = parse_conversation(meta.get("conversations") if isinstance(meta, dict) else None)
        if encode is not None:
            report.lengths.append(encode(turns, image_format is not None))
    except (json.JSONDecodeError, UnicodeDecodeError):
        report.unusable["bad_json"] += 1
        return
    except SampleError as exc:
        report.unusable[exc.reason] += 1
        return
    if len(report.examples) < num_examples:
        lines = [f"--- {tar.name}:{key} ({'image ' + image_format if image_format else 'text-only'}, "
                 f"id {meta.get('id')!r}, from {meta.get('source')})"]
        lines += [f"  {turn.role}: {turn.text[:200]!r}" for turn in turns[:4]]
        report.examples.append("\n".join(lines))


def make_length_encoder(tokenizer_path: str, template_name: str, num_image_tokens: int):
    """Token count of a conversation as training will see it (template, `<image>` expanded)."""
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.tokenizer import image_token_id, prepare_tokenizer

    tokenizer = prepare_tokenizer(tokenizer_path)
    template = make_template(template_name, tokenizer)
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), num_image_tokens)

    def encode(turns, has_image: bool) -> int:
        return len(encoder.encode(template.segments(turns, has_image)).input_ids)

    return encode


def histogram(lengths: list[int]) -> list[tuple[str, int]]:
    rows, lower = [], 0
    for upper in LENGTH_BUCKETS:
        rows.append((f"{lower + 1}-{upper}", sum(lower < n <= upper for n in lengths)))
        lower = upper
    rows.append((f">{lower}", sum(n > lower for n in lengths)))
    return [row for row in rows if row[1]]


def format_report(report: ShardInspection) -> str:
    lines = [f"{report.samples} samples: {report.with_image} with image ({dict(report.image_formats)}), "
             f"{report.text_only} text-only"]
    if report.lengths:
        ordered = sorted(report.lengths)
        lines.append(f"token lengths: min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
                     f"p99 {ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}, max {ordered[-1]}")
        lines += [f"  {bucket:>12} {count:8d}" for bucket, count in histogram(report.lengths)]
    if report.unusable:
        lines.append(f"samples the loader would skip: {dict(report.unusable)}")
    lines += report.examples
    if report.mismatches:
        lines.append(f"{SIZES_FILE} does not match the tars:")
        lines += [f"  {m}" for m in report.mismatches]
    else:
        lines.append(f"{SIZES_FILE} matches the tars")
    return "\n".join(lines)
