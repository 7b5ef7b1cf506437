"""Does VDEP help? A multi-seed ablation on the demo data, in the demo's regime and the paper's.

    python benchmarks/vdep_ablation.py                              # every variant, both regimes, seeds 0,1,2
    python benchmarks/vdep_ablation.py --regimes demo --variants off,recipe,aux --seeds 0,1,2
    python benchmarks/vdep_ablation.py --scale 2 --epochs 2         # more data and steps, when seeds disagree
    python benchmarks/vdep_ablation.py --set stages.finetune.epochs=2   # any override, for every run
    python benchmarks/vdep_ablation.py --smoke                      # tiny sizes, 2 steps a stage (the tests)

Each run is `vdep train` of the regime's recipe (`demo-tiny`, or `demo-tiny-paper`: the LLM trained on
text first, then frozen in align) on one fixed data set (`--data-seed`), with `run.seed` = the seed
(initialisation, data order, VDEP modes), then the held-out questions answered by greedy decoding, as
`vdep demo` does. The variants:

    off     VDEP off
    spec    the specification's defaults (α 1, mode_ratio 0.5, no detach_input, no target norm, VDEP-mode
            samples without their text loss)
    no-aux  the recipe's settings at mode_ratio 0.5 with text_loss_in_vdep_mode off: VDEP-mode samples give
            up their text loss (demo-tiny's settings until 2026-12-02)
    aux     the recipe's settings at mode_ratio 0.5 with text_loss_in_vdep_mode: every sample keeps its
            text loss, so the text supervision equals VDEP off's and VDEP is a true auxiliary loss
            (demo-tiny's settings since 2026-12-02)
    recipe  the regime recipe's own VDEP settings (demo-tiny: detach_input, layernorm targets,
            text_loss_in_vdep_mode, mode_ratio 0.5, i.e. aux; demo-tiny-paper: the specification's, i.e. spec)
    alpha0  VDEP modes without the text loss in VDEP mode, and α = 0: the image term counts for nothing,
            so this is VDEP off minus the text supervision VDEP mode takes away (no-aux against alpha0
            is the image term's own effect; alpha0 against off the lost supervision's)
    aux-detach  detach_input, layernorm targets, the text loss kept, mode_ratio 0.5, in any regime (demo:
            the same runs as aux; paper: the demo's fix for the specification's defaults)
    aux-detach-ft  aux-detach with VDEP off in align: VDEP in finetune only (detach_input also cuts the
            text loss of VDEP-mode samples from the projector, which in a projector-only align is all
            they could train)
    aux-alpha0.25, aux-alpha4, aux-ratio0.25, aux-ratio1    aux-detach at two other α and mode_ratio values

A variant whose settings, in a regime, equal an earlier variant's is not run twice; it says which
(demo: recipe = aux-detach = aux; paper: no-aux = recipe = spec).

Runs already in `--out` are reused (delete a run's folder to redo it), so the ablation can be stopped
and continued. Prints a markdown table, mean ± std over the seeds (sample std, n-1), and writes every
run's figures to OUT/results.jsonl, and draws `vdep attention-map`'s figure of VDEP off against the best
variant (OUT/attention-REGIME-off-vs-VARIANT.png, seed of the first run, first held-out image). One folder
holds one setting of --scale, --epochs, --set and --nproc (a mismatch is refused). A run takes 4–10 minutes
on 2 CPU cores at --scale 1: run on purpose, never in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdep.demo import REGIMES, SIZES, DemoSizes, prepare_data, prepare_text_data, train_and_evaluate

SPEC_DEFAULTS = ["vdep.alpha=1.0", "vdep.mode_ratio=0.5", "vdep.detach_input=false", "vdep.target_norm=none",
                 "vdep.text_loss_in_vdep_mode=false", "vdep.head=identity"]
# The variants name their mode_ratio, so that a change of a recipe's own value cannot change what an earlier
# table's variant meant.
AUX = ["vdep.text_loss_in_vdep_mode=true", "vdep.mode_ratio=0.5"]
NO_AUX = ["vdep.text_loss_in_vdep_mode=false", "vdep.mode_ratio=0.5"]
DEMO_VDEP = ["vdep.detach_input=true", "vdep.target_norm=layernorm", *AUX]  # the aux settings, in any regime
VARIANTS: dict[str, tuple[bool, list[str]]] = {  # name → (VDEP on, overrides of the recipe)
    "off": (False, []),
    "spec": (True, SPEC_DEFAULTS),
    "no-aux": (True, NO_AUX),
    "aux": (True, AUX),
    "recipe": (True, []),
    "aux-detach": (True, DEMO_VDEP),
    "aux-detach-ft": (True, [*DEMO_VDEP, "stages.align.vdep.enabled=false"]),
    "alpha0": (True, [*NO_AUX, "vdep.alpha=0.0"]),
    "aux-alpha0.25": (True, [*DEMO_VDEP, "vdep.alpha=0.25"]),
    "aux-alpha4": (True, [*DEMO_VDEP, "vdep.alpha=4.0"]),
    "aux-ratio0.25": (True, [*DEMO_VDEP, "vdep.mode_ratio=0.25"]),
    "aux-ratio1": (True, [*DEMO_VDEP, "vdep.mode_ratio=1.0"]),
}
SMOKE_SIZES = DemoSizes(align=64, finetune=64, held_out=12, samples_per_shard=32, vocab_size=300, text=64)
SMOKE_OVERRIDES = [
    "model.vision_tower.tiny.hidden_size=32", "model.vision_tower.tiny.num_layers=2", "model.vision_tower.tiny.num_heads=2",
    "model.vision_tower.tiny.intermediate_size=64", "model.vision_tower.tiny.image_size=32",
    "model.language_model.tiny.hidden_size=64", "model.language_model.tiny.num_layers=2",
    "model.language_model.tiny.intermediate_size=128", "data.max_length=256",
]


@dataclass(frozen=True)
class RunFigures:
    regime: str
    variant: str
    seed: int
    accuracy: float
    by_kind: dict[str, float]
    text_loss: float  # the last stage's final logged text loss
    vdep_loss: float
    minutes: float


def run_one(args, paths: dict, regime: str, variant: str, seed: int) -> RunFigures:
    enabled, overrides = VARIANTS[variant]
    stages = ("text", "align", "finetune") if regime == "paper" else ("align", "finetune")
    scale = [f"stages.{name}.epochs={args.epochs}" for name in stages] if args.epochs is not None else []
    if args.smoke:
        scale = [*SMOKE_OVERRIDES, *(f"stages.{name}.max_steps=2" for name in stages)]
    run_name = f"{regime}-{variant}-seed{seed}"
    started = time.monotonic()
    demo = train_and_evaluate(paths, args.out, run_name, args.nproc, args.data_seed, enabled,
                              [*overrides, *scale, *args.set, f"run.seed={seed}", "run.log_every=50"], regime)
    result, final = demo.result, demo.final_losses(stages[-1])
    return RunFigures(
        regime, variant, seed, result.accuracy, {k: c / n for k, (c, n) in sorted(result.by_kind.items())},
        final.get("loss/text", float("nan")), final.get("loss/vdep", float("nan")), (time.monotonic() - started) / 60,
    )


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(figures: list[RunFigures]) -> str:
    lines = [
        "| regime | variant | seeds | held-out accuracy % | colour % | position % | shape % | final text loss | final VDEP loss | per-seed accuracy % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[RunFigures]] = {}
    for run in figures:
        groups.setdefault((run.regime, run.variant), []).append(run)
    for (regime, variant), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.seed)
        kinds = [mean_std([r.by_kind.get(kind, float("nan")) for r in runs], 100, 0) for kind in ("colour", "position", "shape")]
        lines.append(
            f"| {regime} | {variant} | {len(runs)} | {mean_std([r.accuracy for r in runs], 100)} | {' | '.join(kinds)} | "
            f"{mean_std([r.text_loss for r in runs], 1, 4)} | {mean_std([r.vdep_loss for r in runs], 1, 4)} | "
            f"{' / '.join(f'{100 * r.accuracy:.1f}' for r in runs)} |"
        )
    return "\n".join(lines)


def vdep_settings(regime: str, variant: str):
    """The VDEP settings a variant trains with in a regime (every stage's), from the recipe itself."""
    from vdep.config import load_config

    enabled, overrides = VARIANTS[variant]
    config = load_config(REGIMES[regime][0], [f"vdep.enabled={str(enabled).lower()}", *overrides], files=False)
    return [(name, stage.vdep) for name, stage in config.stages.items()]


def twins(regime: str) -> dict[str, str]:
    """Each variant that trains with the same VDEP settings as one listed before it in this regime → the
    first such variant."""
    first: dict[str, str] = {}  # repr of the settings → the first variant with them
    found = {}
    for variant in VARIANTS:
        key = repr(vdep_settings(regime, variant))
        if key in first:
            found[variant] = first[key]
        else:
            first[key] = variant
    return found


def check_same_settings(args, sizes: DemoSizes) -> None:
    """Finished runs are reused by (regime, variant, seed): refuse an --out whose runs had other sizes or
    overrides, rather than put them in one table."""
    settings = {"data_seed": args.data_seed, "sizes": asdict(sizes), "epochs": args.epochs, "set": args.set, "nproc": args.nproc}
    check_out_settings(args.out, settings)


def check_out_settings(out: Path, settings: dict) -> None:
    """A benchmark folder's runs are reused by their names: the first call stamps `settings` into it, later calls
    with other settings are refused rather than mixed into one table."""
    stamp = out / "settings.json"
    if stamp.is_file():
        before = json.loads(stamp.read_text())
        if before != settings:
            raise SystemExit(f"error: {out} holds runs made with other settings ({before}, now {settings}); "
                             "choose another --out, or delete that folder to start again")
    else:
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(settings, indent=1) + "\n")


def load_results(path: Path) -> dict[tuple[str, str, int], RunFigures]:
    if not path.is_file():
        return {}
    runs = [RunFigures(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {(r.regime, r.variant, r.seed): r for r in runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("vdep-ablation"), help="runs, data and results.jsonl (default: ./vdep-ablation)")
    parser.add_argument("--regimes", default="demo,paper", help="demo, paper or both (default: demo,paper)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds (default: 0,1,2)")
    parser.add_argument("--data-seed", type=int, default=0, help="the one data set every run trains on (default: 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="data sizes × this (default: 1, the demo's)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs of every stage (default: the recipe's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the variant's (repeatable), e.g. stages.finetune.epochs=2")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks per run (default: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and model, 2 steps a stage: checks that it runs")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    unknown += [r for r in args.regimes.split(",") if r not in REGIMES]
    if unknown:
        parser.error(f"unknown variant or regime: {', '.join(unknown)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else replace(
        SIZES, **{k: max(1, round(getattr(SIZES, k) * args.scale)) for k in ("align", "finetune", "text")})
    check_same_settings(args, sizes)  # before the data: other sizes would rebuild it under the old runs
    paths = prepare_data(args.out / "data", args.data_seed, sizes)
    regimes = args.regimes.split(",")
    if "paper" in regimes:
        prepare_text_data(args.out / "data", args.data_seed, sizes)
    results_file = args.out / "results.jsonl"
    done = load_results(results_file)
    figures = []
    for regime in regimes:
        regime_twins = twins(regime)
        for variant in args.variants.split(","):
            twin = regime_twins.get(variant)
            if twin is not None:
                print(f"{regime}: {variant} has the settings of {twin} in this regime's recipe; not run twice")
                continue
            for seed in (int(s) for s in args.seeds.split(",")):
                key = (regime, variant, seed)
                if key not in done:
                    done[key] = run_one(args, paths, regime, variant, seed)
                    with results_file.open("a") as out:
                        out.write(json.dumps(asdict(done[key])) + "\n")
                figures.append(done[key])
    print()
    print(f"VDEP ablation: data seed {args.data_seed}, sizes {asdict(sizes)}, epochs {args.epochs or 'as the recipe'}, "
          f"overrides {' '.join(args.set) or 'none'}, "
          f"{args.nproc} rank(s){', smoke' if args.smoke else ''}; mean ± std over seeds")
    print(table(figures))
    for regime in regimes:
        figure = attention_figure(args, paths, regime, figures)
        if figure is not None:
            print(f"attention maps, {regime}: {figure}")
    return 0


def attention_figure(args, paths: dict, regime: str, figures: list[RunFigures]) -> Path | None:
    """VDEP off against the variant with the best mean accuracy, seed of the first run, on the first
    held-out question's image (vdep attention-map's figure; needs matplotlib, the `viz` extra)."""
    accuracies: dict[str, list[float]] = {}
    for run in figures:
        if run.regime == regime:
            accuracies.setdefault(run.variant, []).append(run.accuracy)
    best = max((v for v in accuracies if v != "off"), key=lambda v: statistics.fmean(accuracies[v]), default=None)
    if "off" not in accuracies or best is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("attention maps: matplotlib is not installed (pip install 'vdep[viz]'); skipped")
        return None
    from vdep.attention_map import AttentionRequest, draw_attention_maps

    seed = min(run.seed for run in figures if run.regime == regime)
    record = json.loads(paths["held_out"].read_text())[0]
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    models = [args.out / f"{regime}-{variant}-seed{seed}" for variant in ("off", best)]
    out = args.out / f"attention-{regime}-off-vs-{best}.png"
    draw_attention_maps(AttentionRequest(models, paths["images"] / record["image"], question), out)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
