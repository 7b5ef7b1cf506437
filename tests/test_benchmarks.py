"""Benchmark scripts run in their smoke mode (CI-sized); their numbers are for docs/benchmarks.md, not asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke_table(script: str, rows: list[str], *options: str) -> str:
    """Runs `script --smoke [options]` and checks that its table has these rows; returns the output."""
    result = subprocess.run([sys.executable, script, "--smoke", *options], cwd=ROOT, check=False, capture_output=True, text=True,
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
                               cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert on_object.returncode == 0, on_object.stderr[-3000:]
    rows = [line.split(" | ") for line in on_object.stdout.splitlines() if line.startswith("| demo |")]
    assert [row[1:4] for row in rows] == [[v, layer, "2"] for v in ("off", "aux") for layer in ("0", "1", "mean")], on_object.stdout
    assert all(0 <= float(row[cell].split(" ± ")[0]) <= 100 for row in rows for cell in (4, 5, 6)), on_object.stdout
    missing = subprocess.run([sys.executable, "benchmarks/attention_on_object.py", "--ablation", str(tmp_path),
                              "--variants", "spec", "--seeds", "0"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "demo-spec-seed0 does not exist" in missing.stderr, missing.stderr[-2000:]
    # Runs are reused by (regime, variant, seed): other overrides into the same folder are refused, not mixed.
    other = subprocess.run([sys.executable, "benchmarks/vdep_ablation.py", "--smoke", *options, "--set", "stages.finetune.epochs=2"],
                           cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "holds runs made with other settings" in other.stderr, other.stderr[-2000:]


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_anyres_cost_benchmark_runs_in_smoke_mode():
    """pad, anyres and anyres_max_4 trained in turn on the same data: a row each, with the image tokens that the
    mode gives this data (pad: one 64-token view; anyres: tiles of up to 3×3; anyres_max_4: pooled beyond 4)."""
    table = smoke_table("benchmarks/anyres_cost.py", ["pad", "anyres", "anyres_max_4"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table.splitlines()
            if line.startswith(("| pad ", "| anyres"))}

    def mean_max(cell: str) -> tuple[int, int]:
        mean, peak = cell.rstrip(")").split(" (")
        return int(mean), int(peak)

    image_tokens = {mode: mean_max(cells[0]) for mode, cells in rows.items()}
    assert image_tokens["pad"] == (64, 64), table
    assert image_tokens["anyres"][1] > image_tokens["anyres_max_4"][1] > 64, table
    assert all(float(cells[2]) > 0 and float(cells[4].rstrip(" |")) > 0 for cells in rows.values()), table  # samples/s, RSS


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_gpu_run_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_run.sh --smoke: every part of the GPU session on CPU (kernels in Triton's interpreter),
    each row as a JSON line, each part ending ok."""
    result = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--smoke", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    statuses = {row["part"]: row["status"] for row in rows if "status" in row}
    assert statuses == dict.fromkeys(("ceilings", "kernel", "attention", "training", "anyres"), "ok"), statuses
    by_part = {part: [row for row in rows if row["part"] == part and "status" not in row] for part in statuses}
    assert [row["row"] for row in by_part["ceilings"]] == ["device-to-device copy", "float32 matmul 256³"]
    assert by_part["ceilings"][0]["gb_s"] > 0 and by_part["ceilings"][1]["tflops"] > 0
    kernel = {row["row"] for row in by_part["kernel"]}
    assert {"copy", "eager reference", "+ fused pass-through (Triton)"} <= kernel, kernel
    assert [row["row"].split(",")[0] for row in by_part["attention"]] == ["padded", "packed"]
    assert all(row["implementation"] == "sdpa" and row["kernels_ms"] for row in by_part["attention"])
    training = {row["row"]: row for row in by_part["training"]}
    assert set(training) == {"finetune, HF Trainer + LlavaForConditionalGeneration (baseline)",
                             "finetune, vdep, VDEP on, padded", "finetune, vdep, VDEP off, padded",
                             "VDEP overhead, finetune"}, set(training)
    assert all(row["samples_per_s"] > 0 for name, row in training.items() if "overhead" not in name)
    assert "% of step time (median step" in training["VDEP overhead, finetune"]["overhead"]
    assert "== training" in result.stdout and "| finetune, vdep, VDEP on, padded | sdpa |" in result.stdout
    # AnyRes against pad: the same runs, one per mode, VDEP on; the tiles make longer samples.
    anyres = {row["row"]: row for row in by_part["anyres"]}
    assert set(anyres) == {"finetune, vdep, VDEP on, padded, pad", "finetune, vdep, VDEP on, padded, anyres"}, set(anyres)
    assert all(row["samples_per_s"] > 0 for row in anyres.values())
    tokens = {name.rsplit(", ", 1)[1]: row["tokens_per_sample"] for name, row in anyres.items()}
    assert tokens["anyres"] > tokens["pad"], tokens


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_peers_benchmark_runs_vdep_in_smoke_mode(tmp_path):
    """benchmarks/peers.py --smoke --tools vdep --vdep off: vdep from the shared export, on 2 ranks, timed
    between step ends (metrics.jsonl's `time`), with both ranks' memory and a held-out accuracy."""
    result = subprocess.run([sys.executable, "benchmarks/peers.py", "--smoke", "--tools", "vdep", "--vdep", "off",
                             "--packing", "off", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(row["tool"], row["variant"], row["status"]) for row in rows] == [("vdep", "VDEP off", "ok")]
    for row in rows:
        assert row["steps"] == 4 and row["global_batch_logged"] == 8, row
        assert row["samples_per_s"] > 0 and row["startup_s"] > 0 and len(row["peak_rss_mib"]) == 2, row
        low, median, high = row["step_ms_quartiles"]  # of the 3 intervals between the 4 step ends
        assert 0 < low <= median <= high, row
        assert all(100 < mib < 20_000 for mib in row["peak_rss_mib"]), row
        assert 0.0 <= row["accuracy"] <= 1.0 and set(row["by_kind"]) == {"colour", "position", "shape"}, row
    assert "| vdep | VDEP off | off |" in result.stdout


def test_the_peers_token_check_names_the_first_difference(tmp_path):
    """A peer's first batch is compared, row by row, with vdep's encodings of the same samples: equal rows
    count, and a row that differs is reported with the tokens where it parts from its nearest vdep sample."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    work = peers.Work(steps=1, global_batch=2, micro_batch=1, nproc=2, lr=1e-3, warmup_ratio=0.0, max_length=384,
                      zero=3, finetune_samples=16, held_out=3)
    prepared = peers.prepare(tmp_path, work)
    assert json.loads(prepared.ds_config.read_text())["zero_optimization"]["stage"] == 3  # what the peers are given
    encodings = list(peers.vdep_encodings(prepared, work).items())
    assert 10 <= len(encodings) <= 16  # samples with the same conversation (no image) share one entry
    (ids, labels), (other_ids, other_labels) = encodings[0], encodings[1]
    changed = list(other_ids)
    changed[-2] += 1  # a text token near the end
    record = tmp_path / "record"
    record.mkdir()
    # Right-padded rows with an attention mask, as a Trainer's collator gives them; rank 0's labels cut to the
    # positions from its first supervised token on, as ms-swift passes them (with logits_to_keep).
    width = max(len(ids), len(changed)) + 3
    padded_labels = list(labels) + [-100] * (width - len(ids))
    first_supervised = next(i for i, label in enumerate(labels) if label != -100)
    rows = {0: (ids, padded_labels[first_supervised:]), 1: (changed, list(other_labels) + [-100] * (width - len(changed)))}
    for rank, (row_ids, row_labels) in rows.items():
        pad = width - len(row_ids)
        (record / f"first_batch_rank{rank}.json").write_text(json.dumps({
            "input_ids": [list(row_ids) + [0] * pad], "labels": [row_labels],
            "attention_mask": [[1] * len(row_ids) + [0] * pad]}))
    verdict = peers.compare_first_batches(record, prepared, work, packing=False)
    assert verdict.startswith("1/2 rows equal to vdep's ids and labels; first difference: first_batch_rank1.json row 0: "
                              f"ids part at token {len(changed) - 2}"), verdict


def test_the_peers_template_writes_vdeps_system_text():
    """benchmarks/peer_side.py runs in the peers' venvs, without vdep: its copy of the vicuna_v1 system text
    must stay vdep's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer_side

    from vdep.data.templates import VICUNA_SYSTEM

    assert peer_side.VICUNA_SYSTEM == VICUNA_SYSTEM


def test_the_peers_seed_summary_gives_each_run_its_mean_and_spread_over_seeds():
    """--summary: rows of the same work and run over their seeds; a seed's latest row counts, failed rows and
    other work (another step count) do not mix in."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    def row(seed: int, samples_per_s: float, accuracy: float | None, status: str = "ok", steps: int = 288) -> dict:
        return {"work": {"steps": steps, "seed": seed}, "tool": "vdep", "variant": "VDEP off", "packing": False,
                "status": status, "samples_per_s": samples_per_s, "step_ms_quartiles": [600.0, 640.0, 700.0],
                "peak_rss_mib": [777.0, 775.0], "final_loss": 0.25, "accuracy": accuracy}

    rows = [row(0, 40.0, 0.70), row(0, 47.0, 0.77),  # seed 0 run again: the later row counts
            row(1, 49.0, 0.81), row(2, 0.0, None, status="failed: timeout"), row(2, 45.0, 0.79),
            row(3, 10.0, 0.10, steps=4)]  # other work: its own line
    lines = peers.seed_summary(rows).splitlines()
    assert lines[2] == "| vdep | VDEP off | off | 0,1,2 | 47.0 ± 2.0 | 640 ± 0 | 777 ± 0 | 0.2500 ± 0.0000 | 79.0 ± 2.0 | 77.0 / 81.0 / 79.0 |"
    assert lines[3] == "| vdep | VDEP off | off | 3 | 10.0 | 640 | 777 | 0.2500 | 10.0 | 10.0 |"
    assert len(lines) == 4


def test_the_anyres_detail_patterns_differ_in_tiles_and_barely_in_the_padded_view():
    """The detail benchmark's premise, through training's own preprocessing: one canvas drawn with each of the four
    mark patterns gives padded 32×32 views that differ only where the resampling kernel straddles the mark's border
    (at most 41 levels of 255 over 40 canvases) while AnyRes tiles hold the texture itself (black and white
    against the plain mark's grey: 127 levels apart)."""
    import random

    from benchmarks.anyres_detail import PATTERNS, Mark, draw_mark
    from vdep.config import grid_pinpoints
    from vdep.data.anyres import ImageGeometry, MediaProcessor
    from vdep.data.images import ImageProcessing

    processing = ImageProcessing.tiny("clip", 32)
    pinpoints = tuple(tuple(p) for p in grid_pinpoints("(1x1),...,(3x3)", 32))
    pad = MediaProcessor(ImageGeometry("pad", 32, 4, 16), processing)
    anyres = MediaProcessor(ImageGeometry("anyres", 32, 4, 16, pinpoints, "spatial_unpad"), processing)
    for seed in range(4):
        canvases = {pattern: draw_mark(Mark(pattern, "top right"), random.Random(seed)) for pattern in PATTERNS}
        padded = {pattern: pad([image]).pixels.int() for pattern, image in canvases.items()}
        tiled = {pattern: anyres([image]).pixels.int() for pattern, image in canvases.items()}
        for pattern in PATTERNS[:-1]:
            assert (padded[pattern] - padded["plain"]).abs().max() <= 48, (seed, pattern)
            assert (tiled[pattern][1:] - tiled["plain"][1:]).abs().max() >= 127, (seed, pattern)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_anyres_detail_benchmark_runs_in_smoke_mode(tmp_path):
    """Pad and AnyRes rows with their image tokens per image; a second call reuses the runs."""
    options = ["--out", str(tmp_path), "--variants", "pad-off,anyres-vdep", "--seeds", "0", "--nproc", "1"]
    table = smoke_table("benchmarks/anyres_detail.py", [], *options)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith(("| pad-", "| anyres-"))}
    assert set(rows) == {"pad-off", "anyres-vdep"}, table
    assert rows["pad-off"][1] == "16" and int(rows["anyres-vdep"][1]) > 16 * 4, table  # a base view and at least 4 tiles
    assert rows["pad-off"][2] == rows["anyres-vdep"][2] == "4", table  # the same steps: 2 a stage
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    again = smoke_table("benchmarks/anyres_detail.py", [], *options)
    assert "[2/3] training" not in again and "| anyres-vdep |" in again
