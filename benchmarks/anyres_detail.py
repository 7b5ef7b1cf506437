"""Does AnyRes see what one fixed low-resolution view cannot? A multi-seed benchmark on procedural detail data.

    python benchmarks/anyres_detail.py                        # pad and anyres, VDEP off and on, seeds 0,1,2
    python benchmarks/anyres_detail.py --variants anyres-off,pad-off --seeds 0
    python benchmarks/anyres_detail.py --smoke                # tiny sizes, 2 steps a stage (the tests)

Each image is a canvas of 48-64 pixels a side of pale noise, with one small mark (12 pixels across) in one of
its quadrants. The mark's texture is one of four: vertical or horizontal black-and-white stripes of one pixel,
a checkerboard, or plain grey. All four average to the same grey. Captions name the mark's pattern and place;
the questions ask for its pattern (the detail) or its quadrant (the control, visible at any resolution). The
tower sees 32×32 pixels a view (patch 8, 16 tokens):

    pad     one view: the canvas padded to a square and resized to 32×32, where the mark is a grey blob of
            six pixels whatever its pattern
    anyres  LLaVA-NeXT's AnyRes on the grid "(1x1),...,(2x2)" (32-64 pixels a side): the base view above plus
            the canvas's 32×32 tiles at full resolution, spatial_unpad with the learned image_newline

Everything else is the demo's (`demo-tiny`: align then finetune, projector and LLM trained, the tower a frozen
random-init CLIP, ZeRO-3 on `--nproc` CPU ranks), at the same steps for both: the number of samples and
epochs fix the steps, and the image setting changes only how many image tokens a sample has. VDEP on is the
demo recipe's setting (detach_input, layernorm targets, text loss kept, mode_ratio 0.5) on every image token
but the newlines. Each run is `vdep train` with `run.seed` = the seed (initialisation, data order, VDEP
modes) on one data set (`--data-seed`), then the held-out questions answered by greedy decoding, as
`vdep demo` does.

Runs already in `--out` are reused (delete a run's folder to redo it): the benchmark can be stopped and
continued, and two invocations with other `--variants` can share one `--out` side by side once the first has
made the data (as docs/benchmarks.md ran it: one rank each, OMP_NUM_THREADS=1, on 2 cores). Prints a markdown
table (mean ± sample std over the seeds, and each seed) and what one fixed answer per kind would score, and
writes every run's figures to OUT/results.jsonl. A run takes about 12 minutes (anyres) or 6 (pad) on one rank
beside another: run on purpose, never in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.vdep_ablation import check_out_settings, mean_std
from vdep.demo import train_and_evaluate
from vdep.demo_data import POSITIONS

MARK_SIZE = 12  # pixels across: six in the 32×32 view of a 64-pixel canvas
CANVASES = ((64, 64), (64, 48), (48, 64))  # (width, height)
NOISE = (200, 256)  # the background: pale noise, as the demo's
# Black-and-white textures of one-pixel period, and plain grey: every one averages to the same grey, so a
# view that has to shrink the canvas 2 times shows the same grey blob for all four (a symmetric resampling
# kernel centred between two pixels weighs a black and a white one alike), while a tile at full resolution
# shows the texture itself.
PATTERNS = ("vertical", "horizontal", "checkered", "plain")
QUESTIONS = {"pattern": "What pattern does the mark have?", "position": "Where is the mark?"}
CAPTIONS = ("a {pattern} mark in the {position}.", "The picture has a small {pattern} mark at the {position}.")
ALIGN_PROMPT = "<image>\nDescribe the image briefly."

# The image settings compared: overrides of demo-tiny, on top of the shared tower size below.
IMAGE_SETTINGS = {
    "pad": ["model.image_aspect_ratio=pad"],
    "anyres": ["model.image_aspect_ratio=anyres", "model.image_grid_pinpoints=(1x1),...,(2x2)",
               "model.mm_patch_merge_type=spatial_unpad"],
}
SHARED = ["model.vision_tower.tiny.image_size=32", "data.max_length=384"]
VARIANTS = {f"{image}-{vdep}": (image, vdep == "vdep") for image in IMAGE_SETTINGS for vdep in ("off", "vdep")}
# VDEP's settings are named here, not taken from the recipe, so that a change of demo-tiny cannot change what
# an earlier table's rows meant (the demo recipe's values on 2026-12-03).
VDEP_SETTINGS = ["vdep.detach_input=true", "vdep.target_norm=layernorm", "vdep.text_loss_in_vdep_mode=true",
                 "vdep.mode_ratio=0.5", "vdep.alpha=1.0"]


@dataclass(frozen=True)
class DetailSizes:
    align: int = 4096
    finetune: int = 6144
    held_out: int = 300
    align_epochs: int = 1
    finetune_epochs: int = 2
    samples_per_shard: int = 512
    vocab_size: int = 400


SMOKE_SIZES = DetailSizes(align=32, finetune=32, held_out=8, samples_per_shard=16, vocab_size=300)


@dataclass(frozen=True)
class Mark:
    pattern: str
    position: str

    def answer(self, kind: str) -> str:
        return self.pattern if kind == "pattern" else self.position


def pattern_pixels(pattern: str) -> np.ndarray:
    """(MARK_SIZE, MARK_SIZE, 3) uint8: the mark's texture."""
    y, x = np.mgrid[0:MARK_SIZE, 0:MARK_SIZE]
    on = {"vertical": x % 2 == 0, "horizontal": y % 2 == 0, "checkered": (x + y) % 2 == 0}.get(pattern)
    grey = np.full((MARK_SIZE, MARK_SIZE), 128, dtype=np.uint8) if on is None else np.where(on, 255, 0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def draw_mark(mark: Mark, rng: random.Random) -> Image.Image:
    width, height = rng.choice(CANVASES)
    picture = np.random.default_rng(rng.getrandbits(64)).integers(*NOISE, (height, width, 3), dtype=np.uint8)
    right, bottom = mark.position.endswith("right"), mark.position.startswith("bottom")
    margin = 2
    x0 = rng.randint(width // 2 + margin, width - MARK_SIZE - margin) if right else rng.randint(margin, width // 2 - MARK_SIZE - margin)
    y0 = rng.randint(height // 2 + margin, height - MARK_SIZE - margin) if bottom else rng.randint(margin, height // 2 - MARK_SIZE - margin)
    picture[y0:y0 + MARK_SIZE, x0:x0 + MARK_SIZE] = pattern_pixels(mark.pattern)
    return Image.fromarray(picture, "RGB")


def random_mark(rng: random.Random) -> Mark:
    return Mark(rng.choice(PATTERNS), rng.choice(POSITIONS))


def write_detail_data(out: Path, seed: int, sizes: DetailSizes) -> dict[str, Path]:
    """Images (PNG: JPEG would smear the texture) and LLaVA JSON for align, finetune and the held-out questions."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: dict[str, list[dict]] = {"align": [], "finetune": [], "eval": []}
    for index in range(sizes.align):
        mark = random_mark(rng)
        draw_mark(mark, rng).save(images / f"align_{index:06d}.png")
        records["align"].append({"id": f"align-{index}", "image": f"align_{index:06d}.png", "conversations": [
            {"from": "human", "value": ALIGN_PROMPT},
            {"from": "gpt", "value": rng.choice(CAPTIONS).format(pattern=mark.pattern, position=mark.position)}]})
    for index in range(sizes.finetune):
        mark = random_mark(rng)
        draw_mark(mark, rng).save(images / f"finetune_{index:06d}.png")
        conversation = []
        for turn, kind in enumerate(rng.sample(list(QUESTIONS), k=rng.randint(1, 2))):
            question = f"<image>\n{QUESTIONS[kind]}" if turn == 0 else QUESTIONS[kind]
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": mark.answer(kind)}]
        records["finetune"].append({"id": f"finetune-{index}", "image": f"finetune_{index:06d}.png", "conversations": conversation})
    eval_rng = random.Random(seed + 1_000_003)
    for index in range(sizes.held_out):
        mark = random_mark(eval_rng)
        draw_mark(mark, eval_rng).save(images / f"eval_{index:06d}.png")
        kind = list(QUESTIONS)[index % len(QUESTIONS)]
        records["eval"].append({"id": f"eval-{index}", "image": f"eval_{index:06d}.png", "kind": kind, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"}, {"from": "gpt", "value": mark.answer(kind)}]})
    paths = {}
    for name, items in records.items():
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(items, indent=0))
    return paths


def prepare_detail_data(data: Path, seed: int, sizes: DetailSizes) -> dict[str, Path]:
    """Raw data, shards and tokenizer under `data`, in the layout train_and_evaluate reads; reused when made
    with this seed and these sizes."""
    from vdep.data_tools.build_shards import BuildOptions, build_shards
    from vdep.data_tools.make_tokenizer import make_tokenizer

    paths = {"align": data / "shards" / "align", "finetune": data / "shards" / "finetune",
             "tokenizer": data / "tokenizer", "held_out": data / "raw" / "eval.json", "images": data / "raw" / "images"}
    stamp = data / "detail-data.json"
    wanted = {"seed": seed, **asdict(sizes)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return paths
    if data.exists() and any(data.iterdir()):
        raise SystemExit(f"error: {data} holds other data; remove it or choose another --out")
    raw = write_detail_data(data / "raw", seed, sizes)
    for stage in ("align", "finetune"):
        report = build_shards(BuildOptions([raw[stage]], paths["images"], paths[stage], sizes.samples_per_shard, progress=False))
        print(f"  {stage} shards: {report.summary()}")
    make_tokenizer([str(paths["align"]), str(paths["finetune"])], sizes.vocab_size, paths["tokenizer"])
    stamp.write_text(json.dumps(wanted))
    return paths


@dataclass(frozen=True)
class RunFigures:
    variant: str
    seed: int
    accuracy: float
    by_kind: dict[str, float]
    image_tokens: float  # mean image tokens per held-out question's image
    steps: int  # optimizer steps, both stages
    text_loss: float  # finetune's final logged text loss
    minutes: float


SMOKE_MODEL = ["model.vision_tower.tiny.hidden_size=32", "model.vision_tower.tiny.num_layers=2",
               "model.vision_tower.tiny.num_heads=2", "model.vision_tower.tiny.intermediate_size=64",
               "model.language_model.tiny.hidden_size=64", "model.language_model.tiny.num_layers=2",
               "model.language_model.tiny.intermediate_size=128",
               "stages.align.max_steps=2", "stages.finetune.max_steps=2"]


def run_overrides(args, variant: str, seed: int) -> list[str]:
    image, vdep_on = VARIANTS[variant]
    sizes = SMOKE_SIZES if args.smoke else DetailSizes()
    return [*SHARED, *IMAGE_SETTINGS[image], *(VDEP_SETTINGS if vdep_on else []),
            f"stages.align.epochs={sizes.align_epochs}", f"stages.finetune.epochs={sizes.finetune_epochs}",
            *(SMOKE_MODEL if args.smoke else []), f"run.seed={seed}", "run.log_every=50"]


def image_tokens_per_question(run_dir: Path, paths: dict[str, Path]) -> float:
    """Mean image tokens of the held-out images in this run's image setting, by the rule training uses."""
    from types import SimpleNamespace

    from vdep.model.build import image_geometry
    from vdep.rundir import RunDir

    model = RunDir(run_dir).read_config().model
    tower = model.vision_tower.tiny
    geometry = image_geometry(model, SimpleNamespace(image_size=tower.image_size, patch_size=tower.patch_size),
                              (tower.image_size // tower.patch_size) ** 2)  # feature_select default: no CLS token
    counts = []
    for record in json.loads(paths["held_out"].read_text()):
        with Image.open(paths["images"] / record["image"]) as picture:
            width, height = picture.size
        layout = geometry.tiled(height, width) if geometry.anyres else geometry.single(height, width)
        counts.append(layout.tokens)
    return sum(counts) / len(counts)


def run_one(args, paths: dict[str, Path], variant: str, seed: int) -> RunFigures:
    _, vdep_on = VARIANTS[variant]
    started = time.monotonic()
    demo = train_and_evaluate(paths, args.out, f"{variant}-seed{seed}", args.nproc, seed, vdep_on,
                              run_overrides(args, variant, seed))
    final = demo.final_losses("finetune")
    return RunFigures(
        variant, seed, demo.result.accuracy, {k: c / n for k, (c, n) in sorted(demo.result.by_kind.items())},
        image_tokens_per_question(demo.run_dir, paths), sum(s.get("steps", 0) for s in demo.summaries.values()),
        final.get("loss/text", float("nan")), (time.monotonic() - started) / 60,
    )


def table(figures: list[RunFigures]) -> str:
    lines = [("| variant | image tokens / image | steps | seeds | held-out accuracy % | pattern % | position % | "
              "final text loss | minutes / run | per-seed accuracy % |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[str, list[RunFigures]] = {}
    for run in figures:
        groups.setdefault(run.variant, []).append(run)
    for variant, runs in groups.items():
        runs = sorted(runs, key=lambda r: r.seed)
        kinds = [mean_std([r.by_kind.get(kind, float("nan")) for r in runs], 100, 0) for kind in QUESTIONS]
        lines.append(
            f"| {variant} | {runs[0].image_tokens:.0f} | {runs[0].steps} | {len(runs)} | {mean_std([r.accuracy for r in runs], 100)} | "
            f"{' | '.join(kinds)} | {mean_std([r.text_loss for r in runs], 1, 3)} | {mean_std([r.minutes for r in runs], 1, 1)} | "
            f"{' / '.join(f'{100 * r.accuracy:.1f}' for r in runs)} |")
    return "\n".join(lines)


def majority_answer_share(paths: dict[str, Path]) -> dict[str, float]:
    """Per question kind, the share of held-out questions whose answer is that kind's most frequent one: what
    a model that answers without looking at the image can reach."""
    answers: dict[str, list[str]] = {}
    for record in json.loads(paths["held_out"].read_text()):
        answers.setdefault(record["kind"], []).append(record["conversations"][1]["value"])
    return {kind: max(map(values.count, set(values))) / len(values) for kind, values in answers.items()}


def load_results(path: Path) -> dict[tuple[str, int], RunFigures]:
    if not path.is_file():
        return {}
    runs = [RunFigures(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {(r.variant, r.seed): r for r in runs}


def check_same_settings(args) -> None:
    """Finished runs are reused by (variant, seed): refuse an --out whose runs were made otherwise."""
    check_out_settings(args.out, {"data_seed": args.data_seed, "smoke": args.smoke, "nproc": args.nproc,
                                  "sizes": asdict(DetailSizes())})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("anyres-detail"), help="runs, data and results.jsonl (default: ./anyres-detail)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds (default: 0,1,2)")
    parser.add_argument("--data-seed", type=int, default=0, help="the one data set every run trains on (default: 0)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks per run (default: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 steps a stage: checks that it runs")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_same_settings(args)
    paths = prepare_detail_data(args.out / "data", args.data_seed, SMOKE_SIZES if args.smoke else DetailSizes())
    results_file = args.out / "results.jsonl"
    done = load_results(results_file)
    figures = []
    # Seed-major: a stopped benchmark has every variant at the seeds it reached.
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            if (variant, seed) not in done:
                done[variant, seed] = run_one(args, paths, variant, seed)
                with results_file.open("a") as out:
                    out.write(json.dumps(asdict(done[variant, seed])) + "\n")
            figures.append(done[variant, seed])
    figures.sort(key=lambda r: (list(VARIANTS).index(r.variant), r.seed))
    print()
    print(f"AnyRes detail benchmark: data seed {args.data_seed}, {args.nproc} rank(s){', smoke' if args.smoke else ''}; "
          f"mean ± std over seeds")
    print(table(figures))
    print("one answer for every question of a kind scores at most: "
          + ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in majority_answer_share(paths).items())
          + " (the held-out questions' most frequent answer; four answers each, 25% by chance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
