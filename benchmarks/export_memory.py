"""Peak memory of `vdep export-hf` for a 1B-class model, against the size of the exported weights.

Builds a run directory around random-init base weights of a LLaVA-shaped model (a CLIP ViT-L/14-336
tower and a 22-layer, 2048-wide Llama: about 1.3B parameters with a 1k vocabulary), then runs the
exporter in a fresh process per dtype and reports that process's peak resident memory. Nothing is
trained: the exporter's work (rebuild the model in the output dtype, write shards) is the same.

    python benchmarks/export_memory.py [--out /tmp/export-bench] [--dtypes bf16 fp32]

Needs ~8 GB of disk and ~12 GB of RAM; takes a few minutes on a CPU machine.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

MODEL_OVERRIDES = [
    # CLIP ViT-L/14-336 (LLaVA-1.5's tower)
    "model.vision_tower.tiny.hidden_size=1024", "model.vision_tower.tiny.num_layers=24",
    "model.vision_tower.tiny.num_heads=16", "model.vision_tower.tiny.intermediate_size=4096",
    "model.vision_tower.tiny.image_size=336", "model.vision_tower.tiny.patch_size=14",
    # a TinyLlama-1.1B-shaped decoder
    "model.language_model.tiny.hidden_size=2048", "model.language_model.tiny.num_layers=22",
    "model.language_model.tiny.num_heads=32", "model.language_model.tiny.num_kv_heads=4",
    "model.language_model.tiny.intermediate_size=5632", "model.language_model.tiny.max_position_embeddings=2048",
]

# Runs the exporter and reports two peaks: resident memory (VmHWM: includes file pages the loader
# maps, which the kernel can drop) and anonymous memory (RssAnon, sampled every 20 ms: what the process
# itself allocated; the number that decides an out-of-memory kill).
PEAK_SNIPPET = """
import re, resource, sys, threading, time
peak = [0]
def sample():
    while True:
        status = open('/proc/self/status').read()
        peak[0] = max(peak[0], int(re.search(r'RssAnon:\\s+(\\d+)', status).group(1)))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from vdep.cli import main
code = main(sys.argv[1:])
time.sleep(0.05)
print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'PEAK_ANON_KB', peak[0])
sys.exit(code)
"""


def build_run(root: Path) -> Path:
    from vdep.config import load_config
    from vdep.demo import DemoSizes, prepare_data
    from vdep.rundir import RunDir
    from vdep.train.prepare import prepare_run_dir

    data = prepare_data(root / "data", seed=0, sizes=DemoSizes(align=64, finetune=64, held_out=8, samples_per_shard=64))
    run_dir = root / "run"
    config = load_config("demo-tiny", [
        f"model.tokenizer={data['tokenizer']}", f"stages.align.shards=[{data['align']}]",
        f"stages.finetune.shards=[{data['finetune']}]", f"run.output_dir={root}", "run.name=run", *MODEL_OVERRIDES,
    ])
    if not (run_dir / "base" / "projector_init.safetensors").is_file():
        prepare_run_dir(config, RunDir(run_dir))
    return run_dir


def parameter_count(run_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in (run_dir / "base").rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    args = parser.parse_args()
    started = time.monotonic()
    run_dir = build_run(args.out)
    params = parameter_count(run_dir)
    print(f"run directory built in {time.monotonic() - started:.0f} s: {params / 1e9:.2f}B parameters (base weights, fp32 on disk)")
    print()
    print("| dtype | exported weights | peak anonymous memory | peak anonymous / weights | peak RSS (incl. mapped files) | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes:
        out = args.out / f"export-{dtype}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", PEAK_SNIPPET, "export-hf", "--checkpoint", str(run_dir), "--out", str(out), "--dtype", dtype],
            capture_output=True, text=True, check=True,
        )
        seconds = time.monotonic() - began
        words = result.stdout.split()
        rss_gb = int(words[words.index("PEAK_RSS_KB") + 1]) * 1024 / 1e9
        anon_gb = int(words[words.index("PEAK_ANON_KB") + 1]) * 1024 / 1e9
        size_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
        print(f"| {dtype} | {size_gb:.2f} GB | {anon_gb:.2f} GB | {anon_gb / size_gb:.2f} | {rss_gb:.2f} GB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
