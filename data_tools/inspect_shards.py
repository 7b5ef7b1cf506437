"""`vdep inspect-shards DIR|URL`: what a shard folder (or remote prefix) holds, and whether `sizes.json`
tells the truth.

Reads every tar (sequentially, without decoding images, through the loader's own tar reader), counts samples and the image/text-only mix,
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

from vdep.data.conversation import SampleError, parse_conversation
from vdep.data.media import media_entries
from vdep.data.remote import MissingShardError, RemoteSettings, is_remote, join
from vdep.data.shards import IMAGE_EXTENSIONS, SIZES_FILE, folder_file, unfinished_build
from vdep.data.tar_reader import iterate_samples, open_shard
from vdep.errors import DataError

LENGTH_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)


@dataclass
class ShardInspection:
    samples: int = 0
    with_image: int = 0
    text_only: int = 0
    image_formats: Counter = field(default_factory=Counter)
    images_per_sample: Counter = field(default_factory=Counter)  # images and videos a sample holds → samples
    videos: int = 0
    frames: int = 0  # of the videos
    lengths: list[int] = field(default_factory=list)
    unusable: Counter = field(default_factory=Counter)  # samples the loader would skip, by reason
    mismatches: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    # An unfinished `vdep build-shards` build (stats.json: complete false): its progress, e.g. "3 of 6 shards are
    # finished"; training refuses the folder until it is complete.
    unfinished: str | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.unfinished is None


def inspect_shards(folder: str | Path, encode=None, num_examples: int = 3,
                   settings: RemoteSettings | None = None) -> ShardInspection:
    """`encode(turns, has_image) -> token count` gives token lengths (see `make_length_encoder`).

    `folder` is a local folder or a remote prefix (https://, s3://, gs://); a remote prefix's shards are
    the ones its sizes.json names (HTTP cannot list), so an unlisted remote tar goes unnoticed."""
    settings = settings or RemoteSettings()
    location = str(folder)
    report = ShardInspection()
    sizes_text = folder_file(location, SIZES_FILE, settings)
    progress = unfinished_build(location, sizes_text is not None, settings)
    if progress is not None:  # its progress, and the shards written so far (where a folder can be listed)
        if is_remote(location):
            report.unfinished = f"{progress.describe()} (a remote prefix's shards are found through {SIZES_FILE}: not read)"
            return report
        tars = sorted(Path(location).glob("*.tar"))
        for tar in tars:
            report.samples += _inspect_tar(report, str(tar), tar.name, encode, num_examples, settings)
        report.unfinished = f"{progress.describe()} (the {len(tars)} shard(s) written so far are counted above)"
        return report
    if sizes_text is None:
        raise DataError(f"{location} has no {SIZES_FILE}; is it a folder written by `vdep build-shards`?")
    sizes = json.loads(sizes_text)
    if is_remote(location):
        tars = {name: join(location, name) for name in sizes}
    else:
        tars = {tar.name: str(tar) for tar in Path(location).glob("*.tar")}
    for name in sorted(set(sizes) - set(tars)):
        report.mismatches.append(f"{name} is listed in {SIZES_FILE} but missing")
    for name in sorted(tars):
        count = _inspect_tar(report, tars[name], name, encode, num_examples, settings)
        report.samples += count
        if name not in sizes:
            report.mismatches.append(f"{name} holds {count} samples but is not listed in {SIZES_FILE}")
        elif count is not None and sizes[name] != count:
            report.mismatches.append(f"{name} holds {count} samples but {SIZES_FILE} says {sizes[name]}")
    return report


def _inspect_tar(report: ShardInspection, location: str, name: str, encode, num_examples: int,
                 settings: RemoteSettings) -> int:
    """The tar's sample count (what could be read of it: a corrupt tar is reported as a mismatch)."""
    count = 0
    try:
        with open_shard(location, settings) as stream:
            for sample in iterate_samples(stream, location, 0):
                count += 1
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                _inspect_sample(report, name, sample["__key__"], members, encode, num_examples)
    except MissingShardError:
        report.mismatches.append(f"{name} is listed in {SIZES_FILE} but cannot be read (missing or forbidden)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        report.mismatches.append(f"{name} cannot be read after {count} samples: {exc}")
    return count


def _inspect_sample(report: ShardInspection, tar: str, key: str, members: dict, encode, num_examples: int) -> None:
    image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_format:
        report.with_image += 1
        report.image_formats[image_format] += 1
    else:
        report.text_only += 1
    try:
        meta = json.loads(members.get("json", b"null"))
        media = _count_media(report, meta if isinstance(meta, dict) else {}, members)
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
        what = (f"{media} images/videos" if media > 1 else "image " + image_format) if image_format else "text-only"
        lines = [f"--- {tar}:{key} ({what}, id {meta.get('id')!r}, from {meta.get('source')})"]
        lines += [f"  {turn.role}: {turn.text[:200]!r}" for turn in turns[:4]]
        report.examples.append("\n".join(lines))


def _count_media(report: ShardInspection, meta: dict, members: dict) -> int:
    """The sample's images and videos (vdep/data/media.py), counted; their number."""
    entries = media_entries(meta, members)
    report.images_per_sample[len(entries)] += 1
    videos = [entry for entry in entries if entry.type == "video"]
    report.videos += len(videos)
    report.frames += sum(len(entry.members) for entry in videos)
    return len(entries)


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
    lines = [(f"{report.samples} samples: {report.with_image} with image ({dict(report.image_formats)}), "
              f"{report.text_only} text-only")]
    if set(report.images_per_sample) - {0, 1} or report.videos:
        per_sample = ", ".join(f"{n}: {count}" for n, count in sorted(report.images_per_sample.items()))
        lines.append(f"images and videos per sample (count: samples): {per_sample}; "
                     f"{report.videos} video(s) of {report.frames} frame(s) in all")
    if report.lengths:
        ordered = sorted(report.lengths)
        lines.append(f"token lengths: min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
                     f"p99 {ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}, max {ordered[-1]}")
        lines += [f"  {bucket:>12} {count:8d}" for bucket, count in histogram(report.lengths)]
    if report.unusable:
        lines.append(f"samples the loader would skip: {dict(report.unusable)}")
    lines += report.examples
    if report.unfinished is not None:
        lines.append(f"an unfinished build: {report.unfinished}; {SIZES_FILE} is written, and training accepts the "
                     "folder, when every part has finished: wait for the other parts, or run the missing ones again "
                     "(or the build with --resume)")
    elif report.mismatches:
        lines.append(f"{SIZES_FILE} does not match the tars:")
        lines += [f"  {m}" for m in report.mismatches]
    else:
        lines.append(f"{SIZES_FILE} matches the tars")
    return "\n".join(lines)
