"""Training throughput: vdep against transformers' Trainer with LlavaForConditionalGeneration, side by side.

    python benchmarks/train_throughput.py                   # one GPU: CLIP ViT-L/14-336 + a 1.1B Llama shape, bf16
    python benchmarks/train_throughput.py --llm 7b --micro-batch-size 4
    python benchmarks/train_throughput.py --smoke           # CPU: tiny shapes, a few steps (checks that it runs)
    python benchmarks/train_throughput.py --lora            # finetune with LoRA (r 128; --lora-r), both sides
    python benchmarks/train_throughput.py --image-aspect-ratio pad,anyres --no-baseline   # AnyRes against pad

Both sides get the same random-init weights (vdep writes them into its run directory; the baseline
builds `LlavaForConditionalGeneration` from the same configs), the same shards (synthetic JPEGs and
conversations, built here with `vdep build-shards`), the same preprocessing (vdep's, so data
preparation is not what is compared), the same micro-batch, the same DeepSpeed config (vdep's preset,
filled) and the same frozen parts (align: projector only; finetune: projector and LLM). vdep runs in
every configuration: both stages, VDEP on and off, padded and packed. Each run is its own process.
With `--lora` only finetune runs, with LoRA adapters on every Linear of the LLM and the projector
trained in full: vdep's `stages.finetune.lora`, and for the baseline peft's `get_peft_model` with the
same adapters and the projector as `modules_to_save`.
With `--image-aspect-ratio pad,anyres` every vdep configuration runs once per mode: `anyres` tiles the
synthetic pictures (sides from half to twice the tower's image size) on LLaVA-NeXT's grid, written in
tiles of the tower's image size ([[1,2],[2,1],[2,2],[3,1],[1,3]] × 336 for CLIP-336), with spatial_unpad;
`anyres_max_N` is OneVision's pooling on the same grid. The baseline (LlavaForConditionalGeneration: one
view an image) runs for `pad` only.

Reported per run: samples/s and tokens/s (mean over the steps after the warm-up), MFU (vdep's FLOP
model, against `--peak-tflops`; for the baseline the same useful FLOPs per sample at its rate) and the
peak GPU memory. On CPU (`--smoke`) the baseline runs without DeepSpeed in fp32 and the figures only
show that the script works.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CLIP_L_336 = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096, "image_size": 336, "patch_size": 14}
LLMS = {
    "1b": {"hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4, "intermediate_size": 5632},  # TinyLlama-1.1B
    "7b": {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "intermediate_size": 11008},  # Vicuna-7B
}
SMOKE_VISION = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}
SMOKE_LLM = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
WARMUP_STEPS = 3
DISTINCT_IMAGES = 64


def lexicon(size: int, seed: int = 0) -> list[str]:
    """Distinct made-up words, enough for SentencePiece to learn a Llama-sized vocabulary."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def make_data(folder: Path, count: int, image_side: int, words: list[str], seed: int = 0) -> dict[str, Path]:
    """Align (caption) and finetune (1-3 round) LLaVA JSON files over the same synthetic images."""
    from data_throughput import natural_image

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    align, finetune = [], []
    for index in range(count):
        # At most DISTINCT_IMAGES pictures, repeated: drawing one takes ~0.2 s, and every sample still carries
        # (and the loader decodes and resizes) its own copy.
        name = f"{index % DISTINCT_IMAGES:06d}.jpg"
        if index < DISTINCT_IMAGES:
            width, height = rng.randint(image_side // 2, image_side * 2), rng.randint(image_side // 2, image_side * 2)
            natural_image(rng, width, height).save(images / name, format="JPEG", quality=90)
        align.append({"id": f"a{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": text(8, 30)}]})
        turns = [{"from": "human", "value": "<image>\n" + text(6, 20) + "?"}, {"from": "gpt", "value": text(20, 120)}]
        for _ in range(rng.randint(0, 2)):
            turns += [{"from": "human", "value": text(6, 20) + "?"}, {"from": "gpt", "value": text(10, 80)}]
        finetune.append({"id": f"f{index}", "image": name, "conversations": turns})
    paths = {}
    for name, records in (("align", align), ("finetune", finetune)):
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    return paths


def model_overrides(args, tokenizer: Path) -> list[str]:
    """The random-init shapes, for the one run that builds the base weights."""
    vision = SMOKE_VISION if args.smoke else CLIP_L_336
    llm = SMOKE_LLM if args.smoke else LLMS[args.llm]
    return [
        *(f"model.vision_tower.tiny.{k}={v}" for k, v in vision.items()),
        *(f"model.language_model.tiny.{k}={v}" for k, v in llm.items()),
        f"model.language_model.tiny.max_position_embeddings={max(args.max_length, 512)}", f"model.tokenizer={tokenizer}",
    ]


def from_export(export: Path) -> list[str]:
    """Every measured run starts from the one export (`model.init_from`), as the baseline does."""
    return ["model.vision_tower=null", "model.language_model=null", "model.tokenizer=null", f"model.init_from={export}"]


def image_overrides(mode: str, image_size: int) -> list[str]:
    """The image mode's settings: pad as LLaVA-1.5; AnyRes on LLaVA-NeXT's grid in tiles of `image_size`."""
    if mode == "pad":
        return ["model.image_aspect_ratio=pad"]
    grid = [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    return [f"model.image_aspect_ratio={mode}", f"model.image_grid_pinpoints={json.dumps(grid).replace(' ', '')}",
            "model.mm_patch_merge_type=spatial_unpad"]


def vdep_overrides(args, shards: dict[str, Path], model: list[str], run_dir: Path, stage: str, vdep_on: bool,
                   packed: bool, mode: str = "pad") -> list[str]:
    vision = SMOKE_VISION if args.smoke else CLIP_L_336
    trainable = "[projector]" if stage == "align" else "[projector, language_model]"
    lora = [f"stages.{stage}.lora={{r: {args.lora_r}, alpha: {2 * args.lora_r}, dropout: 0.05}}"] if args.lora else []
    return [
        *lora, *model, *image_overrides(mode, vision["image_size"]), f"model.attn_implementation={args.attn}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"stage={stage}", f"stages.{stage}.init_from=none", f"stages.{stage}.shards=[{shards[stage]}]",
        f"stages.{stage}.trainable={trainable}", f"stages.{stage}.max_steps={args.steps}",
        f"stages.{stage}.global_batch_size={args.micro_batch_size}", f"stages.{stage}.micro_batch_size={args.micro_batch_size}",
        f"stages.{stage}.zero={args.zero}", f"stages.{stage}.save_every=0",
        f"data.max_length={args.max_length}", f"data.num_workers={args.workers}", f"data.packing={str(packed).lower()}",
        f"vdep.enabled={str(vdep_on).lower()}", "vdep.detach_input=false", "vdep.target_norm=none",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.log_every=1",
    ]


@dataclass(frozen=True)
class StepClock:
    """A run's step ends (wall clock), timed the same way for vdep (metrics.jsonl `time`) and the baseline
    (a Trainer callback at on_step_end, after a CUDA sync): samples over the time between the end of the
    warm-up's last step and the end of the last step, and the per-step times in between."""

    ends: list[float]  # ends[i]: the end of step i + 1
    samples_per_step: int

    def timed(self) -> list[float]:
        kept = self.ends[WARMUP_STEPS - 1:] if len(self.ends) > WARMUP_STEPS else self.ends
        return [b - a for a, b in itertools.pairwise(kept)]

    def samples_per_s(self) -> float:
        steps = self.timed()
        return self.samples_per_step * len(steps) / sum(steps)

    def median_iqr_ms(self) -> tuple[float, float]:
        steps = sorted(self.timed())
        quartiles = statistics.quantiles(steps, n=4) if len(steps) > 1 else [steps[0]] * 3
        return 1e3 * statistics.median(steps), 1e3 * (quartiles[2] - quartiles[0])


def run_vdep(args, shards, model: list[str], run_dir: Path, stage: str, vdep_on: bool, packed: bool,
             mode: str = "pad") -> dict:
    """One vdep run in its own process, stopped once its last step is logged: the end-of-stage checkpoint
    and final weights (tens of GB at 7B) are not what is measured, and the device's disk is small."""
    command = [sys.executable, "-m", "vdep", "train", "demo-tiny",
               *vdep_overrides(args, shards, model, run_dir, stage, vdep_on, packed, mode)]
    metrics_file = run_dir / stage / "metrics.jsonl"
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
                if lines and json.loads(lines[-1])["step"] >= args.steps:
                    break
                time.sleep(0.5)
        finally:  # also when this script is stopped (gpu_run.sh's timeout): the run is in a session of its own
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text(errors="replace")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    if not metrics or metrics[-1]["step"] < args.steps:
        raise RuntimeError(f"vdep run failed (exit {process.returncode}):\n{text[-4000:]}")
    attention = re.search(r"attention (\S+) \(", text)
    clock = StepClock([m["time"] for m in metrics], args.micro_batch_size)
    timed = metrics[WARMUP_STEPS:]
    row = {"attention": attention.group(1) if attention else "?", "samples_per_s": clock.samples_per_s(),
           "step_ms": clock.median_iqr_ms(), "step_times": clock.timed(),
           # per-step FLOPs and tokens from vdep's own counts (rate × the interval its line covers)
           "flops_per_sample": statistics.fmean(m["throughput/flops_per_s"] / m["throughput/samples_per_s"] for m in timed),
           "tokens_per_sample": statistics.fmean(m["throughput/tokens_per_s"] / m["throughput/samples_per_s"] for m in timed)}
    row["tokens_per_s"] = row["tokens_per_sample"] * row["samples_per_s"]
    if "memory/max_allocated_gib" in metrics[-1]:
        row["memory_gib"] = max(m["memory/max_allocated_gib"] for m in metrics)
    return row


# ---------------------------------------------------------------------------------------------- baseline
def baseline_worker(spec: dict) -> None:
    """Runs in its own process: HF Trainer + LlavaForConditionalGeneration on the vdep run's setup."""
    import torch
    import webdataset as wds
    from transformers import LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from vdep.config import load_config
    from vdep.conventions import IGNORE_INDEX
    from vdep.data.dataset import SamplePreprocessor
    from vdep.data.images import normalise_pixels
    from vdep.data.shards import discover_shards
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.build import load_image_processing
    from vdep.model.tokenizer import image_token_id, load_tokenizer
    from vdep.rundir import RunDir
    from vdep.train.deepspeed_config import fill_config, load_preset

    run_dir = Path(spec["run_dir"])  # the run that built the base weights: tokenizer and image processing
    config = load_config(spec["config"], [])  # a measured vdep run's config: the stage's settings
    stage = config.stages[spec["stage"]]
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    base = RunDir(run_dir).base_paths(load_config(str(run_dir / "config.yaml"), []).model)
    processing = load_image_processing(base, config.model.image_aspect_ratio == "pad")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(spec["export"], dtype=dtype)  # vdep's starting weights
    text_config = model.config.text_config
    model.model.vision_tower.requires_grad_(False)
    if spec["stage"] == "align":
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if spec.get("lora_r"):  # LLaVA's LoRA: every Linear of the LLM, the projector trained in full
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.05,
            target_modules=r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            modules_to_save=["model.multi_modal_projector"]))
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    encoder = TemplateTokenizer(tokenizer, image_token_id(tokenizer), spec["num_image_tokens"])
    preprocess = SamplePreprocessor(make_template(stage.template, tokenizer), encoder, processing, config.data.max_length)
    raw = [s for shard in discover_shards(stage.shards) for s in wds.tariterators.tarfile_samples([{"url": shard.path}])]
    table = processing.normalisation_table()

    class ShardSamples(torch.utils.data.Dataset):
        def __len__(self):
            return len(raw)

        def __getitem__(self, index):
            sample = preprocess(raw[index])
            pixels = normalise_pixels(sample.pixel_values, table) if sample.pixel_values is not None else None
            return {"input_ids": sample.input_ids, "labels": sample.labels, "pixel_values": pixels}

    def collate(items):
        length = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), length), tokenizer.pad_token_id)
        labels = torch.full((len(items), length), IGNORE_INDEX)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        images = [i["pixel_values"] for i in items if i["pixel_values"] is not None]
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if images:  # each sample's views (n, 3, H, W): one per image under pad, LlavaForConditionalGeneration's input
            batch["pixel_values"] = torch.cat(images).to(dtype)
        return batch

    step_ends: list[float] = []

    class StepTimer(TrainerCallback):
        """The end of every step, as vdep's metrics.jsonl records it (data loading included)."""

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.time())

    micro = spec["micro_batch_size"]
    deepspeed = None
    if cuda:
        preset, preset_path = load_preset(stage.zero)
        deepspeed = fill_config(preset, preset_path, micro_batch_size=micro, grad_accum_steps=1, world_size=1,
                                grad_clip=stage.grad_clip, precision="bf16", hidden_size=text_config.hidden_size)
    arguments = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=micro, gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=stage.lr, lr_scheduler_type="cosine",
        bf16=cuda, use_cpu=not cuda, logging_steps=1, report_to=[], save_strategy="no",
        dataloader_num_workers=spec["workers"], remove_unused_columns=False, deepspeed=deepspeed, seed=0,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=arguments, train_dataset=ShardSamples(), data_collator=collate,
            callbacks=[StepTimer()]).train()
    clock = StepClock(step_ends, micro)
    result = {"samples_per_s": clock.samples_per_s(), "step_ms": clock.median_iqr_ms(), "step_times": clock.timed(),
              "attention": model.get_base_model().model.language_model.config._attn_implementation
              if spec.get("lora_r") else model.model.language_model.config._attn_implementation}
    if cuda:
        result["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("BASELINE_RESULT " + json.dumps(result))


def run_baseline(args, run_dir: Path, config: Path, export: Path, stage: str, num_image_tokens: int, out: Path) -> dict:
    from vdep.train.distributed import free_port

    spec = {"run_dir": str(run_dir), "config": str(config), "export": str(export), "stage": stage, "steps": args.steps,
            "micro_batch_size": args.micro_batch_size, "workers": args.workers, "num_image_tokens": num_image_tokens,
            "out": str(out), "lora_r": args.lora_r if args.lora else None}
    # A world of one, named: without RANK and MASTER_ADDR, DeepSpeed's init goes into MPI discovery.
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, __file__, "--baseline-worker", json.dumps(spec)], cwd=ROOT,
                            capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BASELINE_RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"baseline run failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few steps")
    parser.add_argument("--llm", choices=sorted(LLMS), default="1b")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=None, help="synthetic samples (default: enough for the steps)")
    parser.add_argument("--max-length", type=int, help="data.max_length (default: 2048; 256 with --smoke)")
    parser.add_argument("--zero", default="zero2", choices=("zero2", "zero3"))
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per run")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flex_attention", "flash_attention_2"),
                        help="vdep's model.attn_implementation (auto: flex for packed rows on CUDA without flash-attn)")
    parser.add_argument("--lora", action="store_true", help="finetune only, with LoRA adapters (vdep and the baseline)")
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank with --lora (LLaVA: 128; --smoke: 8)")
    parser.add_argument("--configs", help="the vdep runs, e.g. finetune:on:padded,finetune:off:padded (default: all)")
    parser.add_argument("--no-baseline", action="store_true", help="vdep rows only")
    parser.add_argument("--peak-tflops", type=float, help="MFU against this rate (a measured bf16 matmul, TFLOP/s)")
    parser.add_argument("--image-aspect-ratio", default="pad",
                        help="image modes, each vdep run once per mode: pad, anyres, anyres_max_N (e.g. pad,anyres)")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per row here, as each row is measured")
    parser.add_argument("--part-name", default="training", help="the `part` of this script's JSON lines")
    parser.add_argument("--workdir", help="where the data and runs go (a temporary folder inside it; default: /tmp)")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(json.loads(args.baseline_worker))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that a running vdep run is stopped too
    if args.smoke:
        args.micro_batch_size, args.steps, args.workers = 4, 5, 0
        args.lora_r = min(args.lora_r, 8)
    args.max_length = args.max_length or (256 if args.smoke else 2048)
    modes = args.image_aspect_ratio.split(",")
    for mode in modes:
        if not re.fullmatch(r"pad|anyres|anyres_max_[1-9][0-9]*", mode):
            raise SystemExit(f"--image-aspect-ratio: {mode!r} is not pad, anyres or anyres_max_N")
    samples = args.samples or args.micro_batch_size * (args.steps + 2)
    vision = SMOKE_VISION if args.smoke else CLIP_L_336
    num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    configs = parse_configs(args.configs) if args.configs else default_configs(args)

    from vdep.config import load_config
    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer
    from vdep.export.hf import export_hf
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    jsonl = args.jsonl.open("a") if args.jsonl else None
    lora = f", LoRA r={args.lora_r}" if args.lora else ""
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        words = lexicon(800 if args.smoke else 60_000)
        raw = make_data(root / "raw", samples, vision["image_size"], words)
        shards = {}
        for stage in ("align", "finetune"):
            shards[stage] = root / "shards" / stage
            build_shards(BuildOptions([raw[stage]], root / "raw" / "images", shards[stage], samples_per_shard=64,
                                      workers=min(8, os.cpu_count() or 1), progress=False))
        tokenizer = make_tokenizer([str(shards["finetune"])], 400 if args.smoke else 32000, root / "tokenizer")
        # The base weights, built once (what `vdep train` writes before its first step) and exported: every
        # run, vdep's and the baseline's, starts from this folder.
        base_run, export = root / "base", root / "base-export"
        prepare_run_dir(load_config("demo-tiny", vdep_overrides(args, shards, model_overrides(args, tokenizer), base_run,
                                                                configs[0][0], True, False)), RunDir(base_run))
        export_hf(base_run, export, dtype="fp32" if args.smoke else "bf16")
        print(f"\n{'CPU smoke run (tiny shapes; the numbers mean nothing)' if args.smoke else 'LLM ' + args.llm}, "
              f"micro-batch {args.micro_batch_size}, {args.steps} steps (the first {WARMUP_STEPS} not timed), "
              f"{args.zero}; samples/s = samples over the time between step ends, the same clock for every row\n")
        print("| run | attention | samples/s | tokens/s | MFU | peak memory (GiB) | step ms, median (IQR) | vs baseline |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        baselines: dict[str, dict] = {}
        measured: dict[tuple[str, bool, bool, str], dict] = {}
        runs = [(config, mode) for config in configs for mode in modes]  # the modes of a configuration in turn
        for index, ((stage, vdep_on, packed), mode) in enumerate(runs):
            run_dir = root / "runs" / f"run{index}"
            label = f"{stage}{lora}, vdep, VDEP {'on' if vdep_on else 'off'}, {'packed' if packed else 'padded'}"
            label += "" if modes == ["pad"] else f", {mode}"
            try:
                row = run_vdep(args, shards, from_export(export), run_dir, stage, vdep_on, packed, mode)
                config = root / f"config-{stage}.yaml"
                shutil.copy(run_dir / "config.yaml", config)
            except RuntimeError as exc:
                emit(jsonl, label, {"error": str(exc)[-2000:]}, None, args)
                continue
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)  # read: its checkpoints would fill the device's disk
            measured[(stage, vdep_on, packed, mode)] = row
            if mode != "pad":  # LlavaForConditionalGeneration takes one view an image: no AnyRes baseline
                emit(jsonl, label, row, None, args)
                continue
            if stage not in baselines and not args.no_baseline:
                client = " + peft" if args.lora else ""
                name = f"{stage}{lora}, HF Trainer + LlavaForConditionalGeneration{client} (baseline)"
                try:
                    baseline = run_baseline(args, base_run, config, export, stage, num_image_tokens, root / f"hf-{stage}")
                except RuntimeError as exc:
                    baselines[stage] = {}
                    emit(jsonl, name, {"error": str(exc)[-2000:]}, None, args)
                else:
                    # The same useful work per sample as vdep's run: tokens and FLOPs from vdep's counts.
                    baseline["tokens_per_sample"] = row["tokens_per_sample"]
                    baseline["flops_per_sample"] = row["flops_per_sample"]
                    baseline["tokens_per_s"] = row["tokens_per_sample"] * baseline["samples_per_s"]
                    baselines[stage] = baseline
                    emit(jsonl, name, baseline, None, args)
            emit(jsonl, label, row, baselines.get(stage) or None, args)
        for (stage, vdep_on, packed, mode), on in measured.items():
            off = measured.get((stage, False, packed, mode))
            if vdep_on and off:
                overhead = vdep_overhead(on["step_times"], off["step_times"])
                where = f"{stage}" + ("" if modes == ["pad"] else f", {mode}")
                print(f"\nVDEP overhead, {where}, {'packed' if packed else 'padded'}: {overhead}", flush=True)
                if jsonl:
                    jsonl.write(json.dumps({"part": args.part_name, "row": f"VDEP overhead, {where}", "overhead": overhead})
                                + "\n")
                    jsonl.flush()


def default_configs(args) -> list[tuple[str, bool, bool]]:
    configs = [("finetune", True, False), ("finetune", True, True), ("finetune", False, False)]
    if args.lora:  # LoRA is a finetune recipe
        return configs + ([] if args.smoke else [("finetune", False, True)])
    return configs + ([("align", True, False)] if args.smoke else [("finetune", False, True), ("align", True, False),
                                                                    ("align", False, False)])


def parse_configs(text: str) -> list[tuple[str, bool, bool]]:
    """`finetune:on:padded,finetune:off:padded` → the runs, in that order."""
    configs = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("align", "finetune") or parts[1] not in ("on", "off") or \
                parts[2] not in ("padded", "packed"):
            raise SystemExit(f"--configs: {item!r} is not STAGE:VDEP:ROWS, e.g. finetune:on:padded")
        configs.append((parts[0], parts[1] == "on", parts[2] == "packed"))
    return configs


def vdep_overhead(on: list[float], off: list[float]) -> str:
    """VDEP's cost per step with its spread: the medians and IQRs of the two runs' step times."""
    def summary(times: list[float]) -> tuple[float, float]:
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        return statistics.median(times), quartiles[2] - quartiles[0]

    (on_median, on_iqr), (off_median, off_iqr) = summary(on), summary(off)
    return (f"{100 * (on_median / off_median - 1):+.1f}% of step time (median step {1e3 * on_median:.1f} ms, IQR "
            f"{1e3 * on_iqr:.1f}, on; {1e3 * off_median:.1f} ms, IQR {1e3 * off_iqr:.1f}, off; {len(on)} and {len(off)} steps)")


def emit(jsonl, label: str, row: dict, baseline: dict | None, args) -> None:
    """One table row, printed and flushed at once (a later failure loses only its own row), and as JSON."""
    if "error" in row:
        print(f"| {label} | failed: {row['error'].splitlines()[-1] if row['error'] else '?'} | | | | | | |", flush=True)
    else:
        mfu = row["flops_per_sample"] * row["samples_per_s"] / (args.peak_tflops * 1e12) if args.peak_tflops else None
        row["mfu_vs_measured_matmul"] = mfu
        memory = f"{row['memory_gib']:.1f}" if "memory_gib" in row else "-"
        ratio = f"{row['samples_per_s'] / baseline['samples_per_s']:.2f}x" if baseline else ""
        median, iqr = row["step_ms"]
        print(f"| {label} | {row['attention']} | {row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {memory} | {median:.1f} ({iqr:.1f}) | {ratio} |", flush=True)
    if jsonl:
        jsonl.write(json.dumps({"part": args.part_name, "row": label, **{k: v for k, v in row.items() if k != "step_times"}})
                    + "\n")
        jsonl.flush()


if __name__ == "__main__":
    main()
