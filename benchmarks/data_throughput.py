"""Data path throughput: vdep's shard loader vs the naive path, and `build-shards` images/s.

    python benchmarks/data_throughput.py                  # 2000 samples, one core per path
    python benchmarks/data_throughput.py --max-side 336   # images stored near the training resolution
    python benchmarks/data_throughput.py --square         # 336 px squares: no pad, no resize (the ceiling)
    python benchmarks/data_throughput.py --smoke          # 64 samples: checks that it runs (CI)
    python benchmarks/data_throughput.py --remote --workers 0,1,2,4   # from a throttled local HTTP server
    python benchmarks/data_throughput.py --remote --shards https://host/prefix/   # from an existing location
    python benchmarks/data_throughput.py --remote --resume --samples 4000 --samples-per-shard 500  # a restore

`--remote` compares vdep's loader reading the shards from a local HTTP server that limits each connection
(`--rate-mb`, default 25 MB/s) and delays each request (`--latency-ms`, default 50) with the same loader
reading them from the local disk, for each number of DataLoader workers; `--shards URL` reads a location
of your own instead (its shards, not the generated ones). `--remote --resume` times restoring one consumer's
shuffle buffer from that server instead: batched by shard and byte range (vdep), with only touching samples
merged, and one request per sample as before the batching, with the requests and bytes each sends.

Both paths produce the same collated micro-batches (LLaVA-1.5 preprocessing: pad to square, CLIP
336 px resize and centre crop, normalise; `vicuna_v1` template; a real SentencePiece tokenizer
trained here on the conversations). The naive path is what LLaVA-style trainers do: a JSON list in
memory, `PIL.Image.open` of each image file, transformers' `CLIPImageProcessor`, and LLaVA's v1
tokenization per item (the whole conversation, then each round and its instruction again to find
the lengths to mask), then the same collate. The data: synthetic JPEGs (natural-image-like content, quality 90,
sides 320-640 px as in LLaVA's pretraining images) and 1-3-round conversations.

vdep's loader ships uint8 pixels that the model normalises on the device (bit-identical to the
processor); a third row adds that normalisation on the CPU, for a like-for-like CPU figure.
All are measured in one process with one thread (torch and the image libraries), so the figure is
per CPU core; DataLoader workers scale it by the number of cores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

WORDS = ["the", "a", "red", "blue", "green", "small", "large", "square", "circle", "left", "right", "of", "on", "near", "image", "shows", "there", "is", "an", "object", "with", "color", "background", "shape", "three", "two", "one", "above", "below", "person", "street", "car", "tree", "sky", "water"]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def natural_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Smooth gradients, shapes and a little noise: compresses like a photo, unlike pure noise."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colours = np.array([[rng.random() for _ in range(3)] for _ in range(3)])
    pixels = 255 * (colours[0] * x + colours[1] * y + colours[2] * (1 - x) * (1 - y)) / 2
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        box = sorted(rng.randint(0, width) for _ in range(2)), sorted(rng.randint(0, height) for _ in range(2))
        draw.ellipse((box[0][0], box[1][0], box[0][1], box[1][1]), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_dataset(folder: Path, count: int, seed: int = 0, max_side: int = 640, square: bool = False) -> Path:
    """`count` JPEGs with sides in [max_side/2, max_side] (all max_side × max_side with `square`) and
    LLaVA JSON conversations about them."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for index in range(count):
        width, height = rng.randint(max_side // 2, max_side), rng.randint(max_side // 2, max_side)
        if square:
            width = height = max_side
        name = f"{index:06d}.jpg"
        natural_image(rng, width, height).save(images / name, format="JPEG", quality=90)
        turns = [{"from": "human", "value": "<image>\n" + sentence(rng, 6, 14).replace(".", "?")},
                 {"from": "gpt", "value": " ".join(sentence(rng, 8, 20) for _ in range(rng.randint(1, 4)))}]
        for _ in range(rng.randint(0, 2)):
            turns += [{"from": "human", "value": sentence(rng, 6, 14).replace(".", "?")},
                      {"from": "gpt", "value": sentence(rng, 8, 30)}]
        records.append({"id": str(index), "image": name, "conversations": turns})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def clip_336_processing():
    from vdep.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing

    return ImageProcessing(shortest_edge=336, size=None, crop=(336, 336), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                           pad_to_square=True)


def naive_batches(data_json: Path, image_root: Path, tokenizer, micro_batch_size: int):
    """LLaVA's LazySupervisedDataset in essence: a JSON list, PIL per item, the HF processor, a DataLoader."""
    # transformers' PIL-backed CLIP processor (what CLIPImageProcessor falls back to without torchvision).
    from transformers import CLIPImageProcessorPil

    from vdep.data.batch import ProcessedSample, collate
    from vdep.data.conversation import parse_conversation
    from vdep.data.images import expand_to_square
    from vdep.data.templates import VICUNA_SYSTEM
    from vdep.model.tokenizer import image_token_id

    processing = clip_336_processing()
    processor = CLIPImageProcessorPil(**{k: v for k, v in processing.to_hf_dict("clip").items() if k != "image_processor_type"})
    records = json.loads(data_json.read_text())

    class NaiveDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, index):
            record = records[index]
            image = Image.open(image_root / record["image"]).convert("RGB")
            image = expand_to_square(image, processing.pad_colour)
            pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
            input_ids, labels = llava_v1_tokenize(parse_conversation(record["conversations"]))
            return ProcessedSample(str(index), torch.tensor(input_ids), torch.tensor(labels), pixels)

    image_id = image_token_id(tokenizer)

    def tokenize_with_image(text: str) -> list[int]:
        """Tokenize the text around each <image> separately and join with the image id (as LLaVA does)."""
        ids = [tokenizer.bos_token_id]
        for index, chunk in enumerate(text.split("<image>")):
            if index:
                ids.append(image_id)
            ids += tokenizer(chunk, add_special_tokens=False).input_ids
        return ids

    def llava_v1_tokenize(turns):
        """LLaVA's v1 preprocessing in essence: tokenize the whole conversation, then re-tokenize each
        round and its instruction to find the lengths to mask (1 + 2 x rounds tokenizer passes)."""
        rounds = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns), 2)]
        text = VICUNA_SYSTEM + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in rounds)
        input_ids = tokenize_with_image(text)
        labels = list(input_ids)
        position = 1
        labels[0] = -100
        for index, (question, answer) in enumerate(rounds):
            prefix = (VICUNA_SYSTEM + " " if index == 0 else "") + f"USER: {question} ASSISTANT: "
            round_length = len(tokenize_with_image(prefix + answer + "</s>")) - 1
            instruction_length = len(tokenize_with_image(prefix)) - 2
            labels[position : position + instruction_length] = [-100] * instruction_length
            position += round_length
        expanded_ids, expanded_labels = [], []
        for token, label in zip(input_ids, labels):
            count = 576 if token == image_id else 1
            expanded_ids += [token] * count
            expanded_labels += [-100 if token == image_id else label] * count
        return expanded_ids, expanded_labels

    loader = torch.utils.data.DataLoader(
        NaiveDataset(), batch_size=micro_batch_size, num_workers=0, drop_last=True,
        collate_fn=lambda samples: collate(samples, tokenizer.pad_token_id, (336, 336)),
    )
    yield from loader


def vdep_batches(shards: Path | str, tokenizer, micro_batch_size: int, normalise_here: bool, workers: int = 0):
    from vdep.data.dataset import Batching, SamplePreprocessor
    from vdep.data.images import normalise_pixels
    from vdep.data.loader import StageLoader
    from vdep.data.shards import discover_shards
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.tokenizer import image_token_id

    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), 576)
    processing = clip_336_processing()
    preprocess = SamplePreprocessor(make_template("vicuna_v1", tokenizer), encoder, processing, 2048)
    batching = Batching(micro_batch_size, tokenizer.pad_token_id, (336, 336), processing.normalisation_table())
    loader = StageLoader.create(
        discover_shards([str(shards)]), preprocess, batching,
        rank=0, world_size=1, num_workers=workers, grad_accum_steps=1, seed=0, split="auto", shuffle_buffer=1000,
    )
    for batch in loader.micro_batches(0):
        if normalise_here:  # what the model does on the GPU, done on this core instead
            batch.pixel_values = normalise_pixels(batch.pixel_values, batch.pixel_table)
        yield batch


def stage_costs(data_json: Path, image_root: Path, tokenizer, limit: int = 200) -> list[tuple[str, float]]:
    """Milliseconds per sample of each step of vdep's per-sample work, on the first `limit` samples."""
    from vdep.data.conversation import parse_conversation
    from vdep.data.images import decode_image, expand_to_square, image_pixels
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.tokenizer import image_token_id

    processing = clip_336_processing()
    records = json.loads(data_json.read_text())[:limit]
    blobs = [(image_root / r["image"]).read_bytes() for r in records]
    template = make_template("vicuna_v1", tokenizer)
    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), 576)

    def per_sample(fn, items) -> float:
        started = time.perf_counter()
        outputs = [fn(item) for item in items]
        return (time.perf_counter() - started) * 1000 / len(items), outputs

    decode_ms, images = per_sample(decode_image, blobs)
    pad_ms, squares = per_sample(lambda im: expand_to_square(im.convert("RGB"), processing.pad_colour), images)
    resize_ms, _ = per_sample(lambda im: im.resize((336, 336), resample=processing.resample), squares)
    # Each image timed once; the landscape and portrait rows split the same timings.
    timed = [(im, per_sample(lambda im: image_pixels(im, processing), [im])[0]) for im in images]
    pixels_ms = statistics.fmean(ms for _, ms in timed)
    landscape_ms = mean_or_nan([ms for im, ms in timed if im.width > im.height])
    portrait_ms = mean_or_nan([ms for im, ms in timed if im.width <= im.height])
    # The floor: even an image one pixel short of the crop pays a full-size resize.
    near_336 = [im.convert("RGB").resize((335, 335)) for im in images]
    floor_ms, _ = per_sample(lambda im: im.resize((336, 336), resample=processing.resample), near_336)
    tokenize_ms, _ = per_sample(lambda r: encoder.encode(template.segments(parse_conversation(r["conversations"]), True)),
                                records)
    return [("JPEG decode", decode_ms), ("pad to square", pad_ms), ("bicubic resize of the padded square to 336", resize_ms),
            ("all image steps (decode excluded)", pixels_ms), ("... of a landscape image (padding rows)", landscape_ms),
            ("... of a portrait or square image", portrait_ms),
            ("bicubic resize of a 335 px square to 336 (an image stored near the training size still pays this)", floor_ms),
            ("template + tokenize", tokenize_ms)]


def mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")  # `--square` has no landscape image


def measure_interleaved(paths: dict[str, Iterator]) -> dict[str, tuple[float, int]]:
    """(seconds, samples) of each path, timing one batch of each in turn until all are exhausted.

    This machine's speed drifts by ±20% over minutes; timed in turn, the paths share the drift and
    their ratio holds still where back-to-back runs gave 1.86x and 2.30x for the same code.
    """
    totals = {name: (0.0, 0) for name in paths}
    active = dict(paths)
    while active:
        for name, batches in list(active.items()):
            started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                del active[name]
                continue
            seconds, samples = totals[name]
            totals[name] = (seconds + time.perf_counter() - started, samples + batch.num_samples)
    return totals


def loader_rate(shards: Path | str, tokenizer, micro_batch_size: int, workers: int) -> tuple[float, float]:
    """(samples/s, seconds to the first batch) of one epoch of vdep's loader."""
    started = time.perf_counter()
    first, samples = None, 0
    for batch in vdep_batches(shards, tokenizer, micro_batch_size, False, workers):
        first = first if first is not None else time.perf_counter() - started
        samples += batch.num_samples
    return samples / (time.perf_counter() - started), first or 0.0


def remote_rows(args, root: Path, shards: Path, tokenizer) -> list[tuple[str, str, str]]:
    """The loader from a throttled local HTTP server (or --shards URL) against the local disk, by workers."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server, from a checkout
    from tests.remote_servers import FaultyHTTP

    samples_total = sum(json.loads((shards / "sizes.json").read_text()).values())
    bytes_per_sample = sum(p.stat().st_size for p in shards.glob("*.tar")) / samples_total
    server = None
    if args.shards is None:
        server = FaultyHTTP(shards.parent, latency_s=args.latency_ms / 1000, rate_bytes_per_s=args.rate_mb * 2**20).start()
        location = f"{server.url}/{shards.name}"
    else:
        location = args.shards
    rows = []
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            for name, where in (("local disk", shards), ("remote", location)):
                if name == "local disk" and args.shards is not None:
                    continue
                rate, first = loader_rate(where, tokenizer, args.micro_batch_size, workers)
                megabytes = rate * bytes_per_sample / 2**20
                rows.append((f"{name}, {workers} worker(s)", f"{rate:.0f} samples/s ({megabytes:.1f} MB/s)",
                             f"first batch after {first:.2f} s"))
    finally:
        if server is not None:
            server.stop()
    return rows


def resume_rows(args, shards: Path) -> list[tuple[str, str, str]]:
    """Restoring one consumer's shuffle buffer (data.shuffle_buffer) from the throttled server: the position
    after `--resume-after` samples of an uninterrupted stream, read back batched (vdep), with only touching
    samples merged, and one request per sample (vdep before the batching: a size request and a GET each)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server, from a checkout
    from tests.remote_servers import FaultyHTTP
    from vdep.data import tar_reader
    from vdep.data.remote import RemoteFile, RemoteSettings
    from vdep.data.shards import ConsumerPlan, discover_shards
    from vdep.data.stream import ShardEvents, ShuffledStream

    settings = RemoteSettings()
    events = ShardEvents(lambda *a: None, lambda *a: None)
    local = ConsumerPlan(tuple(discover_shards([str(shards)])), 1, 0)
    stream = ShuffledStream(local, settings, args.shuffle_buffer, "benchmark", events)
    for _ in range(args.resume_after):
        next(stream)
    state = stream.state()
    buffer_bytes = sum(ref.end - ref.start for ref in state.buffer)
    shards_touched = len({ref.shard for ref in state.buffer})

    def per_sample(plan: ConsumerPlan) -> None:
        for ref in state.buffer:
            data = RemoteFile(plan.shards[ref.shard].path, settings)
            _ = data.size  # what each RemoteFile asked at its start
            tar_reader.parse_sample(plan.shards[ref.shard].path, ref, data.read_range(ref.start, ref.end))

    ways = {"one request per sample (before the batching)": per_sample,
            "only touching samples merged": lambda plan: ShuffledStream(plan, settings, args.shuffle_buffer,
                                                                        "benchmark", events, state),
            "gaps below request_mb read (vdep)": lambda plan: ShuffledStream(plan, settings, args.shuffle_buffer,
                                                                             "benchmark", events, state)}
    rows = []
    for name, restore in ways.items():
        tar_reader.REMOTE_GAP_IN_REQUESTS = 0.0 if name.startswith("only touching") else 1.0
        server = FaultyHTTP(shards.parent, latency_s=args.latency_ms / 1000, rate_bytes_per_s=args.rate_mb * 2**20).start()
        try:
            remote = ConsumerPlan(tuple(discover_shards([f"{server.url}/{shards.name}"], settings)), 1, 0)
            requests, sent = server.requests, server.body_bytes
            started = time.perf_counter()
            restore(remote)
            seconds = time.perf_counter() - started
            server.settle()
            sent_mb = (server.body_bytes - sent) / 2**20
            rows.append((name, f"{seconds:.2f} s", f"{server.requests - requests} requests, {sent_mb:.1f} MB"))
        finally:
            server.stop()
    tar_reader.REMOTE_GAP_IN_REQUESTS = 1.0
    rows.append(("the buffer", f"{len(state.buffer)} samples, {buffer_bytes / 2**20:.1f} MB",
                 f"in {shards_touched} shard(s) of {len(local.shards)}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="64 samples: check that everything runs")
    parser.add_argument("--max-side", type=int, default=640,
                        help="image sides are drawn from [max-side/2, max-side] (default 640: LLaVA-like originals; "
                             "336: images stored near the training resolution, as img2dataset's resizing or "
                             "build-shards --max-side leave them)")
    parser.add_argument("--square", action="store_true",
                        help="every image a 336 px square, as img2dataset's border resize mode stores them: "
                             "no padding or resizing is left to do, so this is the loader's ceiling")
    parser.add_argument("--remote", action="store_true", help="the loader from a throttled HTTP server vs the disk")
    parser.add_argument("--shards", help="with --remote: read this location (https://, s3://) instead")
    parser.add_argument("--workers", default="0,1,2,4", help="with --remote: DataLoader workers to try (default 0,1,2,4)")
    parser.add_argument("--rate-mb", type=float, default=25.0, help="with --remote: MB/s per connection (default 25)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="with --remote: delay per request (default 50)")
    parser.add_argument("--resume", action="store_true",
                        help="with --remote: time restoring a consumer's shuffle buffer instead of the loader")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="with --resume: data.shuffle_buffer")
    parser.add_argument("--resume-after", type=int, default=2000,
                        help="with --resume: samples the consumer gave out before the position is taken")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="with --remote: shard size (default 128)")
    args = parser.parse_args()
    if args.resume and (not args.remote or args.shards):
        parser.error("--resume measures a restore from the generated shards on the local server: use it with --remote "
                     "and without --shards")
    if args.square:
        args.max_side = 336
    count = 64 if args.smoke else args.samples
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer
    from vdep.model.tokenizer import prepare_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_json = make_dataset(root / "raw", count, max_side=args.max_side, square=args.square)
        rows = []
        for workers in (1, 2) if (os.cpu_count() or 1) > 1 else (1,):
            out = root / f"shards-{workers}"
            started = time.perf_counter()
            report = build_shards(BuildOptions([data_json], root / "raw" / "images", out, samples_per_shard=250,
                                               workers=workers, progress=False))
            seconds = time.perf_counter() - started
            rows.append((f"build-shards, {workers} worker(s)", f"{report.written / seconds:.0f} images/s", f"{seconds:.2f} s"))
        shards = root / "shards-1"
        tokenizer = None if args.resume else prepare_tokenizer(make_tokenizer([str(shards)], 2000, root / "tokenizer"))
        if args.remote:  # shards of 128 samples (~7 MB): enough of them for every worker to read its own
            small = root / f"shards-{args.samples_per_shard}"
            per_shard = 32 if args.smoke else args.samples_per_shard
            build_shards(BuildOptions([data_json], root / "raw" / "images", small, samples_per_shard=per_shard,
                                      progress=False))
            rows = resume_rows(args, small) if args.resume else remote_rows(args, root, small, tokenizer)
            where = args.shards or f"a local HTTP server, {args.rate_mb:g} MB/s per connection, {args.latency_ms:g} ms per request"
            print(f"\n{count} samples, micro-batch {args.micro_batch_size}, from {where}; torch {torch.__version__}, "
                  f"{os.cpu_count()} CPU core(s)\n")
            if args.resume:
                print(f"restoring a consumer's shuffle buffer ({args.shuffle_buffer}) after {args.resume_after} "
                      f"samples, shards of {per_shard}\n\n| restore | time | sent by the server |\n| --- | --- | --- |")
            else:
                print("| loader | throughput | detail |\n| --- | --- | --- |")
            for row in rows:
                print("| " + " | ".join(row) + " |")
            return
        totals = measure_interleaved({
            "naive (JSON list + PIL + CLIPImageProcessor)": naive_batches(data_json, root / "raw" / "images", tokenizer,
                                                                          args.micro_batch_size),
            "vdep (shards → collated batch, uint8 pixels)": vdep_batches(shards, tokenizer, args.micro_batch_size, False),
            "vdep, also normalising pixels on this core": vdep_batches(shards, tokenizer, args.micro_batch_size, True),
        })
        for name, (seconds, samples) in totals.items():
            rows.append((name, f"{samples / seconds:.0f} samples/s per core", f"{samples} samples in {seconds:.2f} s"))
        naive_rate, vdep_rate, vdep_cpu_rate = (samples / seconds for seconds, samples in totals.values())
        rows.append(("speed-up (vdep / naive)", f"{vdep_rate / naive_rate:.2f}x",
                     f"{vdep_cpu_rate / naive_rate:.2f}x when the CPU also normalises"))
        costs = stage_costs(data_json, root / "raw" / "images", tokenizer)
    sides = f"{args.max_side} px squares" if args.square else f"{args.max_side // 2}-{args.max_side} px per side"
    print(f"\n{count} samples ({sides}), micro-batch {args.micro_batch_size}, "
          f"1 thread, torch {torch.__version__}, the three loaders timed a batch each in turn\n")
    print("| path | throughput | detail |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| step of vdep's per-sample work | ms per sample |\n| --- | --- |")
    for name, milliseconds in costs:
        print(f"| {name} | {'-' if math.isnan(milliseconds) else f'{milliseconds:.2f}'} |")  # NaN: no such image


if __name__ == "__main__":
    main()
