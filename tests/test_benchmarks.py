"""Benchmark scripts run in their smoke mode (CI-sized); their numbers are for docs/benchmarks.md, not asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke_table(script: str, rows: list[str], *options: str) -> str:
    """Runs `script --smoke [options]` and checks that its table has these rows; returns the output."""
    result = subprocess.run([sys.executable, script, "--smoke", *options], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in rows:
        assert f"| {row} |" in result.stdout, result.stdout
    return result.stdout


def test_the_data_throughput_benchmark_runs_in_smoke_mode():
    table = smoke_table("benchmarks/data_throughput.py", [
        "build-shards, 1 worker(s)", "naive (JSON list + PIL + CLIPImageProcessor)",
        "vdep (shards → collated batch, uint8 pixels)", "vdep, also normalising pixels on this core",
        "speed-up (vdep / naive)",
    ])
    assert "64 samples" in table


def test_the_remote_data_benchmark_runs_in_smoke_mode():
    table = smoke_table("benchmarks/data_throughput.py", [
        "local disk, 0 worker(s)", "remote, 0 worker(s)", "local disk, 2 worker(s)", "remote, 2 worker(s)",
    ], "--remote", "--workers", "0,2", "--rate-mb", "50", "--latency-ms", "5")
    assert "from a local HTTP server, 50 MB/s per connection, 5 ms per request" in table


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_training_throughput_benchmark_runs_in_smoke_mode():
    """vdep (DeepSpeed, every configuration) and the HF Trainer baseline, tiny shapes on CPU."""
    table = smoke_table("benchmarks/train_throughput.py", [
        "finetune, HF Trainer + LlavaForConditionalGeneration (baseline)", "finetune, vdep, VDEP on, padded",
        "finetune, vdep, VDEP on, packed", "finetune, vdep, VDEP off, padded", "align, vdep, VDEP on, padded",
    ])
    rows = [line for line in table.splitlines() if line.startswith(("| finetune", "| align"))]
    assert rows and all(line.split(" | ")[1] == "sdpa" for line in rows), table  # each run names its attention


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_training_throughput_benchmark_runs_in_lora_mode():
    """Finetune with LoRA adapters on both sides (vdep's stages.finetune.lora; peft's get_peft_model)."""
    table = smoke_table("benchmarks/train_throughput.py", [
        "finetune, LoRA r=8, HF Trainer + LlavaForConditionalGeneration + peft (baseline)",
        "finetune, LoRA r=8, vdep, VDEP on, padded", "finetune, LoRA r=8, vdep, VDEP on, packed",
        "finetune, LoRA r=8, vdep, VDEP off, padded",
    ], "--lora")
    assert "| align" not in table


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_vdep_ablation_runs_in_smoke_mode(tmp_path):
    """Two variants, two seeds (mean ± std), and a second call reuses every run. (The paper regime's three
    stages run in tests/test_demo.py.)"""
    options = ["--out", str(tmp_path), "--regimes", "demo", "--variants", "off,aux", "--seeds", "0,1", "--nproc", "1"]
    table = smoke_table("benchmarks/vdep_ablation.py", [], *options)
    rows = [line for line in table.splitlines() if line.startswith(("| demo |", "| paper |"))]
    assert [row.split(" | ")[:3] for row in rows] == [["| demo", "off", "2"], ["| demo", "aux", "2"]], table
    assert all(" ± " in row.split(" | ")[3] for row in rows), table
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    again = smoke_table("benchmarks/vdep_ablation.py", [], *options)
    assert "[2/3] training" not in again and "| demo | aux | 2 |" in again
    assert (tmp_path / "attention-demo-off-vs-aux.png").is_file() and (tmp_path / "attention-demo-off-vs-aux.npz").is_file()
    # The attention-on-object table reads those runs: a row per variant and layer, shares in 0-100%.
    on_object = subprocess.run([sys.executable, "benchmarks/attention_on_object.py", "--ablation", str(tmp_path),
                                "--variants", "off,aux", "--seeds", "0,1", "--images", "6"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert on_object.returncode == 0, on_object.stderr[-3000:]
    rows = [line.split(" | ") for line in on_object.stdout.splitlines() if line.startswith("| demo |")]
    assert [row[1:4] for row in rows] == [[v, layer, "2"] for v in ("off", "aux") for layer in ("0", "1", "mean")], on_object.stdout
    assert all(0 <= float(row[cell].split(" ± ")[0]) <= 100 for row in rows for cell in (4, 5, 6)), on_object.stdout
    missing = subprocess.run([sys.executable, "benchmarks/attention_on_object.py", "--ablation", str(tmp_path),
                              "--variants", "spec", "--seeds", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "demo-spec-seed0 does not exist" in missing.stderr, missing.stderr[-2000:]
    # Runs are reused by (regime, variant, seed): other overrides into the same folder are refused, not mixed.
    other = subprocess.run([sys.executable, "benchmarks/vdep_ablation.py", "--smoke", *options, "--set", "stages.finetune.epochs=2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "holds runs made with other settings" in other.stderr, other.stderr[-2000:]
