"""Where the question's attention lands in the image, averaged over held-out images, per VDEP variant.

The paper's Fig. 1 and 4 (and `vdep attention-map`) show one image. This script measures the same cell
(the question tokens' attention to the image tokens, mean over heads, one layer) over many held-out
images of the demo's data, where the object is known: the shape is painted in a saturated colour on pale
noise (`vdep.demo_data.object_mask`). For each model, layer and image:
- image share: the attention mass on the image tokens (the figure's cell title);
- object share: the part of that mass on the object, each patch weighted by the share of its pixels the
  object covers;
- lift: object share / object area (the covered share of the patch grid): 1 is attention spread evenly
  over the picture, above 1 attention that seeks the object.
Each seed's figure is its mean over the images; the table gives mean ± std over seeds.

It reads the runs `benchmarks/vdep_ablation.py` left in its --out folder (`REGIME-VARIANT-seedN`) and that
folder's held-out data; nothing is trained. A few seconds per model and hundred images on 2 cores.

    python benchmarks/attention_on_object.py --ablation /work/ablation/ft2 --regime demo --variants off,aux
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.vdep_ablation import mean_std
from vdep.attention_map import (
    load_vdep_attention_model,
    loaded_vdep_forward,
    patch_coverage,
    reduce_attention,
    to_grid,
)
from vdep.conventions import IMAGE_MARKER
from vdep.data.images import decode_image
from vdep.demo import demo_paths
from vdep.demo_data import object_mask
from vdep.errors import VdepError


@dataclass(frozen=True)
class LayerFigures:
    """One model's figures for one layer, averaged over the images."""

    image_share: float
    object_share: float  # of the attention on the image
    object_area: float
    lift: float


def measure(run: Path, records: list[dict], images: Path) -> list[LayerFigures]:
    loaded = load_vdep_attention_model(run)
    per_layer: list[list[tuple[float, float, float]]] = []
    for record in records:
        question = record["conversations"][0]["value"].replace(IMAGE_MARKER, "").strip()
        image = decode_image((images / record["image"]).read_bytes(), record["image"]).convert("RGB")
        forward = loaded_vdep_forward(loaded, image, question, max_new_tokens=0, want_answer=False)
        side = to_grid(forward.image_positions).shape[0]  # the patch grid, checked square
        coverage = patch_coverage(object_mask(forward.picture), side).reshape(-1)
        if coverage.sum() == 0:
            raise VdepError(f"{record['image']}: no object pixels found; is this the demo's data?")
        if not per_layer:
            per_layer = [[] for _ in forward.attentions]
        for layer, attention in enumerate(forward.attentions):
            values = reduce_attention(attention, forward.question_positions, forward.image_positions, "mean").numpy()
            on_image = float(values.sum())
            per_layer[layer].append((on_image, float((values * coverage).sum()) / on_image, float(coverage.mean())))
    figures = []
    for rows in per_layer:
        image_share, object_share, area = (np.array(column) for column in zip(*rows))
        figures.append(LayerFigures(float(image_share.mean()), float(object_share.mean()), float(area.mean()),
                                    float((object_share / area).mean())))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ablation", type=Path, required=True, help="the --out folder of benchmarks/vdep_ablation.py")
    parser.add_argument("--regime", default="demo", choices=("demo", "paper"))
    parser.add_argument("--variants", default="off,aux")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=300, help="the first N held-out questions (default 300)")
    args = parser.parse_args(argv)
    paths = demo_paths(args.ablation / "data")
    if not paths["held_out"].is_file():
        raise SystemExit(f"error: {paths['held_out']} does not exist: --ablation is the --out folder of a "
                         "finished benchmarks/vdep_ablation.py run")
    records = json.loads(paths["held_out"].read_text())[: args.images]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results: dict[str, list[list[LayerFigures]]] = {}
    for variant in args.variants.split(","):
        for seed in seeds:
            run = args.ablation / f"{args.regime}-{variant}-seed{seed}"
            if not run.is_dir():
                raise SystemExit(f"error: {run} does not exist: run benchmarks/vdep_ablation.py --out {args.ablation} "
                                 f"--regimes {args.regime} --variants {variant} --seeds {seed} first")
            try:
                results.setdefault(variant, []).append(measure(run, records, paths["images"]))
            except VdepError as error:
                raise SystemExit(f"error: {run}: {error}") from None
    print(f"Attention of the question to the image, mean over heads, over {len(records)} held-out images of "
          f"{args.ablation}; mean ± std over seeds {args.seeds}")
    print("| regime | variant | layer | seeds | image share % | object share of it % | object area % | lift "
          "| per-seed lift |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, per_seed in results.items():
        layers = len(per_seed[0])
        # "mean": each seed's figures averaged over its layers first, then mean ± std over seeds.
        averaged = [LayerFigures(*(statistics.fmean(getattr(f, name) for f in figures) for name in
                                   ("image_share", "object_share", "object_area", "lift"))) for figures in per_seed]
        for layer in [*range(layers), "mean"]:
            rows = averaged if layer == "mean" else [figures[layer] for figures in per_seed]
            print(f"| {args.regime} | {variant} | {layer} | {len(rows)} "
                  f"| {mean_std([r.image_share for r in rows], 100, 1)} "
                  f"| {mean_std([r.object_share for r in rows], 100, 1)} "
                  f"| {mean_std([r.object_area for r in rows], 100, 1)} "
                  f"| {mean_std([r.lift for r in rows], 1, 2)} "
                  f"| {' / '.join(f'{r.lift:.2f}' for r in rows)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
