"""Training throughput: vdep against transformers' Trainer with LlavaForConditionalGeneration, side by side.

    python benchmarks/train_throughput.py                   # one GPU: CLIP ViT-L/14-336 + a 1.1B Llama shape, bf16
    python benchmarks/train_throughput.py --llm 7b --micro-batch-size 4
    python benchmarks/train_throughput.py --smoke           # CPU: tiny shapes, a few steps (checks that it runs)
    python benchmarks/train_throughput.py --lora            # finetune with LoRA (r 128; --lora-r), both sides

Both sides get the same random-init weights (vdep writes them into its run directory; the baseline
builds `LlavaForConditionalGeneration` from the same configs), the same shards (synthetic JPEGs and
conversations, built here with `vdep build-shards`), the same preprocessing (vdep's, so data
preparation is not what is compared), the same micro-batch, the same DeepSpeed config (vdep's preset,
filled) and the same frozen parts (align: projector only; finetune: projector and LLM). vdep runs in
every configuration: both stages, VDEP on and off, padded and packed. Each run is its own process.
With `--lora` only finetune runs, with LoRA adapters on every Linear of the LLM and the projector
trained in full: vdep's `stages.finetune.lora`, and for the baseline peft's `get_peft_model` with the
same adapters and the projector as `modules_to_save`.

Reported per run: samples/s and tokens/s (mean over the steps after the warm-up), MFU (vdep's FLOP
model, against `--peak-tflops`; for the baseline the same useful FLOPs per sample at its rate) and the
peak GPU memory. On CPU (`--smoke`) the baseline runs without DeepSpeed in fp32 and the figures only
show that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CLIP_L_336 = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, image_size=336, patch_size=14)
LLMS = {
    "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),  # TinyLlama-1.1B
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008),  # Vicuna-7B
}
SMOKE_VISION = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32, patch_size=8)
SMOKE_LLM = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
WARMUP_STEPS = 3


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
        name = f"{index:06d}.jpg"
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


def vdep_overrides(args, shards: dict[str, Path], tokenizer: Path, run_dir: Path, stage: str, vdep_on: bool,
                   packed: bool) -> list[str]:
    vision = SMOKE_VISION if args.smoke else CLIP_L_336
    llm = SMOKE_LLM if args.smoke else LLMS[args.llm]
    trainable = "[projector]" if stage == "align" else "[projector, language_model]"
    lora = [f"stages.{stage}.lora={{r: {args.lora_r}, alpha: {2 * args.lora_r}, dropout: 0.05}}"] if args.lora else []
    return [
        *lora,
        *(f"model.vision_tower.tiny.{k}={v}" for k, v in vision.items()),
        *(f"model.language_model.tiny.{k}={v}" for k, v in llm.items()),
        f"model.language_model.tiny.max_position_embeddings={max(args.max_length, 512)}",
        f"model.tokenizer={tokenizer}", f"model.attn_implementation={args.attn}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"stage={stage}", f"stages.{stage}.init_from=none", f"stages.{stage}.shards=[{shards[stage]}]",
        f"stages.{stage}.trainable={trainable}", f"stages.{stage}.max_steps={args.steps}",
        f"stages.{stage}.global_batch_size={args.micro_batch_size}", f"stages.{stage}.micro_batch_size={args.micro_batch_size}",
        f"stages.{stage}.zero={args.zero}", f"stages.{stage}.save_every=0",
        f"data.max_length={args.max_length}", f"data.num_workers={args.workers}", f"data.packing={str(packed).lower()}",
        f"vdep.enabled={str(vdep_on).lower()}", "vdep.detach_input=false", "vdep.target_norm=none",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.log_every=1",
    ]


def steady_mean(values: list[float]) -> float:
    kept = values[WARMUP_STEPS:] or values
    return statistics.fmean(kept)


def run_vdep(args, shards, tokenizer, run_dir: Path, stage: str, vdep_on: bool, packed: bool) -> dict:
    command = [sys.executable, "-m", "vdep", "train", "demo-tiny",
               *vdep_overrides(args, shards, tokenizer, run_dir, stage, vdep_on, packed)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"vdep run failed:\n{result.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    attention = re.search(r"attention (\S+) \(", result.stdout + result.stderr)
    row = {
        "attention": attention.group(1) if attention else "?",
        "samples_per_s": steady_mean([m["throughput/samples_per_s"] for m in metrics]),
        "tokens_per_s": steady_mean([m["throughput/tokens_per_s"] for m in metrics]),
    }
    if "perf/mfu" in metrics[-1]:
        row["mfu"] = steady_mean([m["perf/mfu"] for m in metrics])
    if "memory/max_allocated_gib" in metrics[-1]:
        row["memory_gib"] = max(m["memory/max_allocated_gib"] for m in metrics)
    return row


# ---------------------------------------------------------------------------------------------- baseline
def baseline_worker(spec: dict) -> None:
    """Runs in its own process: HF Trainer + LlavaForConditionalGeneration on the vdep run's setup."""
    import torch
    import webdataset as wds
    from transformers import (
        AutoConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from vdep.config import load_config
    from vdep.conventions import IGNORE_INDEX
    from vdep.data.dataset import SamplePreprocessor
    from vdep.data.images import normalise_pixels
    from vdep.data.shards import discover_shards
    from vdep.data.templates import TemplateTokenizer, make_template
    from vdep.model.build import load_image_processing
    from vdep.model.tokenizer import image_token_id, load_tokenizer, padded_vocab_size
    from vdep.rundir import RunDir
    from vdep.train.deepspeed_config import fill_config, load_preset

    run_dir = Path(spec["run_dir"])
    config = load_config(str(run_dir / "config.yaml"), [])
    stage = config.stages[spec["stage"]]
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    base = RunDir(run_dir).base_paths(config.model)
    processing = load_image_processing(base, config.data.pad_to_square)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    text_config = AutoConfig.from_pretrained(base.language_model)
    text_config.vocab_size = padded_vocab_size(tokenizer)
    llava_config = LlavaConfig(
        vision_config=AutoConfig.from_pretrained(base.vision_tower), text_config=text_config,
        image_token_id=image_token_id(tokenizer), vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(llava_config).to(dtype)
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
        if images:
            batch["pixel_values"] = torch.stack(images).to(dtype)
        return batch

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

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
    result = {"samples_per_s": micro / steady_mean(step_times),
              "attention": model.get_base_model().model.language_model.config._attn_implementation
              if spec.get("lora_r") else model.model.language_model.config._attn_implementation}
    if cuda:
        result["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("BASELINE_RESULT " + json.dumps(result))


def run_baseline(args, run_dir: Path, stage: str, num_image_tokens: int, out: Path) -> dict:
    spec = {"run_dir": str(run_dir), "stage": stage, "steps": args.steps, "micro_batch_size": args.micro_batch_size,
            "workers": args.workers, "num_image_tokens": num_image_tokens, "out": str(out),
            "lora_r": args.lora_r if args.lora else None}
    result = subprocess.run([sys.executable, __file__, "--baseline-worker", json.dumps(spec)], cwd=ROOT,
                            capture_output=True, text=True)
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
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--zero", default="zero2", choices=("zero2", "zero3"))
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per run")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="auto", choices=("auto", "sdpa", "flex_attention", "flash_attention_2"),
                        help="vdep's model.attn_implementation (auto: flex for packed rows on CUDA without flash-attn)")
    parser.add_argument("--lora", action="store_true", help="finetune only, with LoRA adapters (vdep and the baseline)")
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank with --lora (LLaVA: 128; --smoke: 8)")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(json.loads(args.baseline_worker))
        return
    if args.smoke:
        args.micro_batch_size, args.steps, args.max_length, args.workers = 4, 5, 256, 0
        args.lora_r = min(args.lora_r, 8)
    samples = args.samples or args.micro_batch_size * (args.steps + 2)
    vision = SMOKE_VISION if args.smoke else CLIP_L_336
    num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2

    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = lexicon(800 if args.smoke else 60_000)
        raw = make_data(root / "raw", samples, vision["image_size"], words)
        shards = {}
        for stage in ("align", "finetune"):
            shards[stage] = root / "shards" / stage
            build_shards(BuildOptions([raw[stage]], root / "raw" / "images", shards[stage], samples_per_shard=64,
                                      workers=min(8, os.cpu_count() or 1), progress=False))
        tokenizer = make_tokenizer([str(shards["finetune"])], 400 if args.smoke else 32000, root / "tokenizer")
        configs = [("finetune", True, False), ("finetune", True, True), ("finetune", False, False)]
        if args.lora:  # LoRA is a finetune recipe
            configs += [] if args.smoke else [("finetune", False, True)]
        else:
            configs += [("align", True, False)] if args.smoke else [("finetune", False, True), ("align", True, False),
                                                                    ("align", False, False)]
        lora = f", LoRA r={args.lora_r}" if args.lora else ""
        rows = []
        baselines: dict[str, dict] = {}
        for index, (stage, vdep_on, packed) in enumerate(configs):
            run_dir = root / "runs" / f"run{index}"
            measured = run_vdep(args, shards, tokenizer, run_dir, stage, vdep_on, packed)
            if stage not in baselines:
                baseline = run_baseline(args, run_dir, stage, num_image_tokens, root / f"hf-{stage}")
                baseline["tokens_per_s"] = measured["tokens_per_s"] / measured["samples_per_s"] * baseline["samples_per_s"]
                if "mfu" in measured:
                    baseline["mfu"] = measured["mfu"] / measured["samples_per_s"] * baseline["samples_per_s"]
                baselines[stage] = baseline
                client = " + peft" if args.lora else ""
                rows.append((f"{stage}{lora}, HF Trainer + LlavaForConditionalGeneration{client} (baseline)", baseline, None))
            label = f"{stage}{lora}, vdep, VDEP {'on' if vdep_on else 'off'}, {'packed' if packed else 'padded'}"
            rows.append((label, measured, baselines[stage]))
    print(f"\n{'CPU smoke run (tiny shapes; the numbers mean nothing)' if args.smoke else 'LLM ' + args.llm}, "
          f"micro-batch {args.micro_batch_size}, {args.steps} steps (first {WARMUP_STEPS} excluded), {args.zero}\n")
    print("| run | attention | samples/s | tokens/s | MFU | peak memory (GiB) | vs baseline |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for label, row, baseline in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        memory = f"{row['memory_gib']:.1f}" if "memory_gib" in row else "-"
        ratio = f"{row['samples_per_s'] / baseline['samples_per_s']:.2f}x" if baseline else ""
        print(f"| {label} | {row['attention']} | {row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} | {mfu} | {memory} | {ratio} |")


if __name__ == "__main__":
    main()
