"""`vdep demo`: the whole system on a laptop CPU, on data it generates itself.

1. Generate the procedural shapes data (demo_data.py), build shards, train a tokenizer on them.
2. Train `align` then `finetune` with VDEP on a tiny model: `nproc` CPU ranks under ZeRO-3, through the
   same `vdep train` a cluster user runs (the shipped `demo-tiny` recipe plus path overrides).
3. Answer held-out questions by greedy decoding and report accuracy against chance.
Re-running reuses the data and, like any `vdep train`, the completed stages.

`--regime paper` runs the paper's regime instead (recipe `demo-tiny-paper`): the tiny LLM first learns
from a text corpus alone, then align trains the projector only, as LLaVA-1.5 does with a pretrained LLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .demo_data import chance_accuracy, write_demo_data
from .errors import VdepError


@dataclass(frozen=True)
class DemoSizes:
    align: int = 4096
    finetune: int = 9216
    held_out: int = 300
    samples_per_shard: int = 512
    vocab_size: int = 1000
    text: int = 8192  # text-only conversations for the paper regime's first stage


# A regime is a recipe and the name of its run (one per regime and VDEP setting, side by side in --out).
REGIMES = {"demo": ("demo-tiny", ""), "paper": ("demo-tiny-paper", "paper-")}


SIZES = DemoSizes()


def demo_paths(data: Path) -> dict[str, Path]:
    """Where the demo's data lives under `data` (`--out`/data)."""
    return {
        "align": data / "shards" / "align",
        "finetune": data / "shards" / "finetune",
        "text": data / "shards" / "text",
        "tokenizer": data / "tokenizer",
        "held_out": data / "raw" / "eval.json",
        "images": data / "raw" / "images",
    }


def prepare_data(data: Path, seed: int, sizes: DemoSizes = SIZES) -> dict[str, Path]:
    """Raw data, shards and tokenizer under `data`; reused when a previous run made them with this seed."""
    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer

    stamp = data / "demo-data.json"
    wanted = {"seed": seed, **{key: value for key, value in sizes.__dict__.items() if key != "text"}}
    raw = data / "raw"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"[1/3] data: reusing the shapes images, shards and tokenizer in {data} (made by an earlier vdep demo "
              f"with seed {seed})", flush=True)
        return demo_paths(data)
    if data.exists() and any(data.iterdir()):
        raise VdepError(f"{data} holds other data; remove it or choose another --out")
    print(f"[1/3] data: generating shapes images, shards and a tokenizer in {data}", flush=True)
    write_demo_data(raw, seed, sizes.align, sizes.finetune, sizes.held_out)
    for stage in ("align", "finetune"):
        report = build_shards(BuildOptions([raw / f"{stage}.json"], raw / "images", data / "shards" / stage, sizes.samples_per_shard, progress=False))
        print(f"  {stage} shards: {report.summary()}")
    make_tokenizer([str(data / "shards" / s) for s in ("align", "finetune")], sizes.vocab_size, data / "tokenizer")
    stamp.write_text(json.dumps(wanted))
    return demo_paths(data)


def prepare_text_data(data: Path, seed: int, sizes: DemoSizes = SIZES) -> Path:
    """The paper regime's text corpus, as shards beside the image data (its own stamp: the image data and
    tokenizer stay those of the demo, so both regimes share them)."""
    from vdep.data_tools.build_shards import BuildOptions, build_shards

    from .demo_data import write_text_corpus

    stamp = data / "text-data.json"
    wanted = {"seed": seed, "text": sizes.text, "samples_per_shard": sizes.samples_per_shard}
    shards = data / "shards" / "text"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return shards
    if shards.exists():
        raise VdepError(f"{shards} holds other data; remove it or choose another --out")
    corpus = write_text_corpus(data / "raw", seed, sizes.text)
    report = build_shards(BuildOptions([corpus], data / "raw" / "images", shards, sizes.samples_per_shard, progress=False))
    print(f"  text shards: {report.summary()}")
    stamp.write_text(json.dumps(wanted))
    return shards


def as_recipe_path(path: Path) -> str:
    """`path` written as the demo-tiny recipe writes its paths: relative to the working directory when it
    lies inside it (`vdep-demo/data/tokenizer` for the default --out). The run's config.yaml and its
    checkpoints' fingerprints are then those of `vdep train demo-tiny`, which continues the demo's run."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def train_arguments(
    paths: dict[str, Path], out: Path, run_name: str, seed: int, vdep_enabled: bool, overrides: list[str],
    regime: str = "demo",
) -> list[str]:
    recipe, _ = REGIMES[regime]
    text = [f"stages.text.shards=[{as_recipe_path(paths['text'])}]"] if regime == "paper" else []
    return [
        "train", recipe,
        f"model.tokenizer={as_recipe_path(paths['tokenizer'])}",
        *text,
        f"stages.align.shards=[{as_recipe_path(paths['align'])}]",
        f"stages.finetune.shards=[{as_recipe_path(paths['finetune'])}]",
        f"run.output_dir={as_recipe_path(out)}",
        f"run.name={run_name}",
        f"run.seed={seed}",
        f"vdep.enabled={'true' if vdep_enabled else 'false'}",
        *overrides,
    ]


@dataclass
class DemoRun:
    """One trained and evaluated demo run."""

    run_dir: Path
    result: object  # eval.held_out.QAResult: accuracy, by_kind, answers
    summaries: dict[str, dict]  # per stage, its final/summary.json

    def final_losses(self, stage: str) -> dict[str, float]:
        return self.summaries.get(stage, {}).get("final", {})


def train_and_evaluate(
    paths: dict[str, Path], out: Path, run_name: str, nproc: int, seed: int, vdep_enabled: bool,
    overrides: list[str], regime: str = "demo",
) -> DemoRun:
    """Train the regime's recipe on the demo data (`vdep train`, nproc local ranks), then answer the
    held-out questions; a completed run is reused, as `vdep train` reuses completed stages."""
    from .config import load_config
    from .eval.held_out import answer_questions, write_answers
    from .evaluate import load_trained_model
    from .rundir import RunDir
    from .train.launch import launch_local

    arguments = train_arguments(paths, out, run_name, seed, vdep_enabled, overrides, regime)
    config = load_config(arguments[1], arguments[2:])
    run_dir = config.run.directory.resolve()  # overrides may rename the run
    stages = " then ".join(name for name, _ in config.stages_to_run())
    print(f"[2/3] training {stages} on {nproc} CPU rank(s) under ZeRO-3:\n      vdep {' '.join(arguments)}", flush=True)
    code = launch_local(nproc, arguments)
    if code != 0:
        raise VdepError(f"training failed with exit code {code}; see the messages above and {run_dir / 'logs' / 'train.log'}")
    print("[3/3] evaluating held-out questions by greedy decoding", flush=True)
    trained = load_trained_model(run_dir)
    records = json.loads(paths["held_out"].read_text())
    result = answer_questions(trained, records, paths["images"], "vicuna_v1")
    write_answers(result, run_dir / "held_out_answers.json")
    run = RunDir(run_dir)
    summaries = {name: run.stage(name).read_summary() for name in run.read_config().stages if run.stage(name).is_complete}
    return DemoRun(run_dir, result, summaries)


def run_demo(
    out: Path, nproc: int, vdep_enabled: bool, seed: int, overrides: list[str] | None = None, regime: str = "demo"
) -> int:
    started = time.monotonic()
    out = out.resolve()
    paths = prepare_data(out / "data", seed)
    if regime == "paper":
        prepare_text_data(out / "data", seed)
    run_name = REGIMES[regime][1] + ("vdep" if vdep_enabled else "no-vdep")
    demo = train_and_evaluate(paths, out, run_name, nproc, seed, vdep_enabled, list(overrides or []), regime)
    result, run_dir = demo.result, demo.run_dir
    elapsed = time.monotonic() - started
    print()
    print(f"held-out accuracy: {100 * result.accuracy:.1f}% (chance: {100 * chance_accuracy():.1f}%)")
    kinds = ", ".join(f"{k} {100 * c / n:.0f}%" for k, (c, n) in sorted(result.by_kind.items()))
    print(f"  by question ({result.total} questions): {kinds}")
    for name, summary in demo.summaries.items():
        final = summary["final"]
        if final:  # empty only for a stage resumed from its very last checkpoint
            print(f"final losses, {name}: text {final['loss/text']:.4f}, vdep {final['loss/vdep']:.4f} ({summary['steps']} steps)")
    print(f"VDEP: {'on' if vdep_enabled else 'off'}; answers in {run_dir / 'held_out_answers.json'}")
    print(f"TensorBoard logs: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoints: {run_dir}/{{{','.join(demo.summaries)}}}/checkpoints, final weights in {run_dir}/*/final")
    print(f"time: {elapsed / 60:.1f} min")
    return 0
