"""What AnyRes costs on CPU: image tokens, sequence length, samples/s, step time and memory, per image mode.

    python benchmarks/anyres_cost.py                 # demo-tiny's model, 2 ranks ZeRO-3, pad / anyres / anyres_max_4
    python benchmarks/anyres_cost.py --smoke         # a few samples and steps (checks that it runs)

Every mode trains the same model (demo-tiny's: a 64-pixel tower of 8-pixel patches, 64 tokens a view, and its
4-layer LLM, random-init from the same seed) on the same shards: procedural pictures of several sizes and
aspect ratios (from a 48-pixel square to 300 × 90), one per sample, with a short question and answer. The
modes differ only in `model.image_aspect_ratio` (and, for AnyRes, the grid "(1x1),...,(3x3)" of 64-pixel
tiles with spatial_unpad; `--max-tiles` sets anyres_max_N). Each run is `vdep train demo-tiny` on 2 ranks
under ZeRO-3 (finetune: projector and LLM, VDEP on), as `vdep demo` runs; the modes alternate within the
invocation (`--repeats` rounds of every mode), so slow phases of a shared machine fall on every mode.

Reported per mode: image tokens per sample and sequence length per sample (mean and max, counted with the
preprocessing the runs use, over every sample), samples/s and the median step time (over the timed steps of
every round, the first `WARMUP_STEPS` of each run not timed), and the peak resident memory of the largest
rank (`getrusage` of the ranks, in a process that starts only them).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import WARMUP_STEPS, StepClock

# (height, width): squares, wide and tall pictures, small and large against the 64-pixel view
SIZES = [(48, 48), (64, 128), (128, 64), (96, 96), (150, 150), (90, 300), (300, 90), (200, 130), (64, 200), (180, 180)]
GRID = "(1x1),...,(3x3)"
WORDS = ["red", "blue", "green", "square", "circle", "small", "large", "left", "right", "top", "bottom", "shape"]


@dataclass
class ModeResult:
    """One mode's measurements, pooled over its rounds."""

    mode: str
    image_tokens: list[int] = field(default_factory=list)  # per sample
    lengths: list[int] = field(default_factory=list)  # per sample
    step_times: list[float] = field(default_factory=list)  # seconds, every round's timed steps
    peak_rss_mib: float = 0.0


def write_data(folder: Path, count: int, seed: int) -> Path:
    from data_throughput import natural_image

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for index in range(count):
        height, width = SIZES[index % len(SIZES)]
        name = f"{index:05d}.jpg"
        natural_image(rng, width, height).save(images / name, format="JPEG", quality=90)
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        records.append({"id": f"s{index}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}?"}, {"from": "gpt", "value": answer}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def mode_overrides(mode: str) -> list[str]:
    if mode == "pad":
        return ["model.image_aspect_ratio=pad"]
    return [f"model.image_aspect_ratio={mode}", f'model.image_grid_pinpoints="{GRID}"',
            "model.mm_patch_merge_type=spatial_unpad"]


def run_overrides(args, shards: Path, tokenizer: Path, run_dir: Path, mode: str) -> list[str]:
    return [
        *mode_overrides(mode), f"model.tokenizer={tokenizer}", f"model.language_model.tiny.max_position_embeddings={args.max_length}",
        "stage=finetune", "stages.finetune.init_from=none", f"stages.finetune.shards=[{shards}]",
        f"stages.finetune.max_steps={args.steps}", f"stages.finetune.micro_batch_size={args.micro_batch_size}",
        f"stages.finetune.global_batch_size={args.micro_batch_size * args.ranks}", "stages.finetune.zero=zero3",
        "stages.finetune.save_every=0", f"data.max_length={args.max_length}", "data.num_workers=0",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.log_every=1", "run.seed=0",
    ]


def ranks_worker(spec: dict) -> None:
    """Runs in a process of its own: starts the ranks, waits, and prints the largest rank's peak RSS (the
    children's `ru_maxrss`, which counts only processes this one waited for: the ranks)."""
    from vdep.train.launch import launch_local

    code = launch_local(spec["ranks"], ["train", "demo-tiny", *spec["overrides"]])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("RANKS_RESULT " + json.dumps({"code": code, "peak_rss_mib": peak_kib / 1024}))


def train_once(args, overrides: list[str], run_dir: Path) -> tuple[list[float], float]:
    """One run: its timed step intervals (s) and the largest rank's peak RSS (MiB)."""
    spec = {"ranks": args.ranks, "overrides": overrides}
    result = subprocess.run([sys.executable, __file__, "--ranks-worker", json.dumps(spec)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RANKS_RESULT ")]
    outcome = json.loads(lines[-1].split(" ", 1)[1]) if lines else {"code": result.returncode}
    metrics_file = run_dir / "finetune" / "metrics.jsonl"
    if outcome["code"] != 0 or not metrics_file.is_file():
        log = run_dir / "train.log"
        raise SystemExit(f"run {run_dir.name} failed ({outcome['code']}): {result.stderr[-3000:]}\n"
                         f"{log.read_text()[-3000:] if log.is_file() else ''}")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    clock = StepClock([m["time"] for m in metrics], args.micro_batch_size * args.ranks)
    return clock.timed(), outcome["peak_rss_mib"]


def count_tokens(run_dir: Path, shards: Path) -> tuple[list[int], list[int]]:
    """Image tokens and sequence length of every sample, with the preprocessing the run used (its config,
    tokenizer and base tower)."""
    import webdataset as wds

    from vdep.data.anyres import MediaProcessor
    from vdep.data.conversation import SampleError
    from vdep.data.dataset import SamplePreprocessor
    from vdep.data.shards import discover_shards
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.build import load_image_processing, model_spec
    from vdep.model.tokenizer import load_tokenizer
    from vdep.rundir import RunDir

    run = RunDir(run_dir)
    config = run.read_config()
    tokenizer = load_tokenizer(run.tokenizer)
    base = run.base_paths(config.model)
    spec = model_spec(config.model, base, tokenizer)
    processing = load_image_processing(base, config.model.image_aspect_ratio == "pad")
    encoder = TemplateTokenizer(tokenizer, spec.image_token_id, spec.num_image_tokens)
    preprocess = SamplePreprocessor(make_template(config.stages["finetune"].template, tokenizer), encoder,
                                    MediaProcessor(spec.geometry, processing), config.data.max_length)
    image_tokens, lengths = [], []
    for shard in discover_shards([str(shards)]):
        for raw in wds.tariterators.tarfile_samples([{"url": shard.path}]):
            try:
                sample = preprocess(raw)
            except SampleError as exc:  # a sample the run skipped too (counted in its log)
                raise SystemExit(f"sample {raw['__key__']} is skipped in mode {config.model.image_aspect_ratio}: {exc}; "
                                 "raise --max-length") from None
            image_tokens.append(int((sample.input_ids == spec.image_token_id).sum()))
            lengths.append(len(sample.input_ids))
    return image_tokens, lengths


def print_table(results: list[ModeResult], args) -> None:
    import deepspeed
    import torch
    import transformers

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}; "
          f"{args.ranks} ranks, ZeRO-3, micro-batch {args.micro_batch_size} (global {args.micro_batch_size * args.ranks}), "
          f"{args.steps} steps a run (the first {WARMUP_STEPS} not timed), {args.repeats} round(s) of every mode, "
          f"{len(results[0].lengths)} samples\n")
    print("| mode | image tokens / sample, mean (max) | sequence length, mean (max) | samples/s | step ms, median | "
          "peak RSS of a rank (MiB) |\n| --- | --- | --- | --- | --- | --- |")
    for r in results:
        samples_per_s = args.micro_batch_size * args.ranks * len(r.step_times) / sum(r.step_times)
        print(f"| {r.mode} | {statistics.fmean(r.image_tokens):.0f} ({max(r.image_tokens)}) | "
              f"{statistics.fmean(r.lengths):.0f} ({max(r.lengths)}) | {samples_per_s:.2f} | "
              f"{1e3 * statistics.median(r.step_times):.0f} | {r.peak_rss_mib:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few samples and steps, one round, one rank")
    parser.add_argument("--max-tiles", type=int, default=4, help="N of the anyres_max_N mode")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every mode, alternating")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--workdir", help="where the data and runs go (a temporary folder inside it; default: /tmp)")
    parser.add_argument("--ranks-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ranks_worker:
        ranks_worker(json.loads(args.ranks_worker))
        return
    if args.smoke:
        args.steps, args.repeats, args.micro_batch_size, args.ranks = WARMUP_STEPS + 2, 1, 2, 1
    modes = ["pad", "anyres", f"anyres_max_{args.max_tiles}"]
    samples = args.micro_batch_size * args.ranks * (args.steps + 1)

    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer

    results = {mode: ModeResult(mode) for mode in modes}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        data = write_data(root / "raw", samples, seed=0)
        shards = root / "shards"
        build_shards(BuildOptions([data], root / "raw" / "images", shards, samples_per_shard=64, progress=False))
        tokenizer = make_tokenizer([str(shards)], 300, root / "tokenizer")
        for round_index in range(args.repeats):
            for mode in modes:
                run_dir = root / "runs" / f"{mode}-{round_index}"
                step_times, peak = train_once(args, run_overrides(args, shards, tokenizer, run_dir, mode), run_dir)
                result = results[mode]
                result.step_times += step_times
                result.peak_rss_mib = max(result.peak_rss_mib, peak)
                if not result.lengths:
                    result.image_tokens, result.lengths = count_tokens(run_dir, shards)
                print(f"{mode}, round {round_index + 1}: median step {1e3 * statistics.median(step_times):.0f} ms, "
                      f"peak RSS {peak:.0f} MiB", flush=True)
    print_table([results[mode] for mode in modes], args)


if __name__ == "__main__":
    main()
