"""Real multi-process training: gloo ranks running DeepSpeed through `vdep train` (slow; run serially).

Each run uses a short collective timeout (deepspeed.timeout_minutes=2 in the fixtures' overrides), so a
hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics
from vdep.train.launch import launch_local

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def train(nproc: int, small_data, run_dir, *overrides: str) -> None:
    code = launch_local(nproc, ["train", "demo-tiny", *small_data.overrides(run_dir), *overrides])
    assert code == 0, f"vdep train on {nproc} rank(s) failed with exit code {code}"


def losses(run_dir, stage: str) -> list[float]:
    """Text and VDEP loss of every logged step, flattened: [text_1, vdep_1, text_2, ...]."""
    return [value for m in read_metrics(run_dir, stage) for value in (m["loss/text"], m["loss/vdep"])]


@pytest.fixture(scope="module")
def mixed_shards(small_data, tmp_path_factory):
    """Half text-only, half image samples in random order: ranks get different modalities at random steps."""
    from vdep.data_tools.build_shards import BuildOptions, build_shards

    records = json.loads((small_data.raw / "finetune.json").read_text())
    images = [r for r in records if "image" in r][:24]
    texts = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
             for i, w in enumerate(["red", "blue", "green", "yellow"] * 6)]
    mixed = images + texts
    random.Random(0).shuffle(mixed)
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "mixed.json").write_text(json.dumps(mixed))
    build_shards(BuildOptions([folder / "mixed.json"], small_data.raw / "images", folder / "shards", samples_per_shard=8, progress=False))
    return folder / "shards"


def test_zero3_ranks_with_and_without_images_in_the_same_step_complete(small_data, mixed_shards, tmp_path, tokenizer):
    """ZeRO-3 hang rules: a rank whose micro-batch is text-only runs the same modules as one with images."""
    from tests.helpers import make_loader

    steps = 12
    settings = ["data.split=samples", "data.shuffle_buffer=4", "run.seed=3"]
    # Replay the data plan to know which rank has an image at each step (micro-batch of one sample).
    pattern = []
    for rank in range(2):
        loader = make_loader(small_data, tokenizer, rank, 2, "samples", micro=1, seed=3, shard_dir=mixed_shards, shuffle_buffer=4)
        pattern.append([bool(b.has_image[0]) for b, _ in zip(loader.micro_batches(0), range(steps))])
    mixed_steps = [(a, b) for a, b in zip(*pattern) if a != b]
    assert (True, False) in mixed_steps and (False, True) in mixed_steps, pattern  # both ways round, at random steps

    run_dir = tmp_path / "run"
    train(2, small_data, run_dir, "stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero3",
          f"stages.finetune.shards=[{mixed_shards}]", "stages.finetune.global_batch_size=2",
          "stages.finetune.micro_batch_size=1", f"stages.finetune.max_steps={steps}", "run.log_every=1",
          "vdep.mode_ratio=1.0", *settings)
    metrics = read_metrics(run_dir, "finetune")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor([m["loss/total"], m["grad_norm"]])).all() for m in metrics)
    # Steps where only one rank had an image supervised its image positions (VDEP mode on every image).
    assert sum(1 for m in metrics if m["tokens/image"] > 0) >= len(mixed_steps)


def test_single_process_zero2_zero3_and_accumulation_give_the_same_losses_and_gradients(small_data, tmp_path):
    """Same global batches (no shuffle, sample-level split) → the same losses and gradient norms at every step,
    packed or not, whatever the layout: half the image samples in VDEP mode (the modes follow the samples, not
    their rank, micro-batch or slot). Adam normalises the update by the gradient's own scale, so a loss could
    match while the gradient were off by a factor: the norms are compared too."""
    common = ["stage=align", "stages.align.max_steps=3", "stages.align.global_batch_size=8", "run.log_every=1",
              "data.split=samples", "data.shuffle_buffer=0", "vdep.mode_ratio=0.5", "vdep.text_loss_in_vdep_mode=true"]
    runs = {
        "1 rank, ZeRO-2, micro 8": (1, ["stages.align.zero=zero2", "stages.align.micro_batch_size=8"]),
        "1 rank, ZeRO-2, micro 4 × 2 accumulation": (1, ["stages.align.zero=zero2", "stages.align.micro_batch_size=4"]),
        "2 ranks, ZeRO-2, micro 4": (2, ["stages.align.zero=zero2", "stages.align.micro_batch_size=4"]),
        "2 ranks, ZeRO-3, micro 4": (2, ["stages.align.zero=zero3", "stages.align.micro_batch_size=4"]),
        "2 ranks, ZeRO-3, micro 2 × 2 accumulation": (2, ["stages.align.zero=zero3", "stages.align.micro_batch_size=2"]),
        # The same samples per micro-batch, several per row: the same losses (attention stays per sample).
        "2 ranks, ZeRO-3, micro 4, packed": (2, ["stages.align.zero=zero3", "stages.align.micro_batch_size=4",
                                                 "data.packing=true"]),
    }
    results = {}
    for index, (name, (nproc, extra)) in enumerate(runs.items()):
        run_dir = tmp_path / f"run{index}"
        train(nproc, small_data, run_dir, *common, *extra)
        results[name] = (losses(run_dir, "align"), [m["grad_norm"] for m in read_metrics(run_dir, "align")])
    packed_log = (tmp_path / f"run{len(runs) - 1}" / "logs" / "train.log").read_text()
    assert "packed rows: a block-diagonal causal mask built from the position ids (sdpa)" in packed_log
    reference_losses, reference_norms = results["1 rank, ZeRO-2, micro 8"]
    assert len(reference_losses) == 6 and all(value > 0 for value in reference_losses)
    assert all(0 < norm < 1e3 for norm in reference_norms), reference_norms
    vdep_steps = [vdep for vdep in reference_losses[1::2] if vdep > 0]
    assert vdep_steps, "VDEP mode was never drawn: the test would not see where the modes go"
    for name, (values, norms) in results.items():
        assert values == pytest.approx(reference_losses, rel=1e-4), name
        assert norms == pytest.approx(reference_norms, rel=1e-4), name


def test_optimizer_offload_matches_zero3(small_data, tmp_path):
    """zero3_offload (parameters and optimizer on the CPU, DeepSpeed's CPU Adam) trains like zero3."""
    common = ["stage=align", "stages.align.max_steps=3", "run.log_every=1", "data.shuffle_buffer=0"]
    train(2, small_data, tmp_path / "zero3", *common, "stages.align.zero=zero3")
    train(2, small_data, tmp_path / "offload", *common, "stages.align.zero=zero3_offload")
    assert losses(tmp_path / "offload", "align") == pytest.approx(losses(tmp_path / "zero3", "align"), rel=1e-4)


def test_two_stages_end_to_end_with_logs_checkpoints_and_rerun(small_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vdep.eval.held_out import answer_questions
    from vdep.evaluate import load_trained_model

    run_dir = tmp_path / "run"
    steps = ["stages.align.max_steps=3", "stages.finetune.max_steps=3", "run.log_every=1"]
    train(2, small_data, run_dir, *steps)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer").is_dir()
    log = (run_dir / "logs" / "train.log").read_text()
    assert "stage align: ZeRO-3" in log and "trainable" in log and "multi_modal_projector" in log
    for stage in ("align", "finetune"):
        assert (run_dir / stage / "checkpoints" / "latest").read_text().strip() == "step_00000003"
        assert (run_dir / stage / "final" / "trainable.safetensors").is_file()
        events = EventAccumulator(str(run_dir / "tensorboard" / stage))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        for tag in ("loss/text", "loss/vdep", "loss/total", "grad_norm", "tokens/text", "tokens/image",
                    "norm/hidden_at_image", "norm/target_at_image", "throughput/samples_per_s", "throughput/tokens_per_s"):
            assert tag in tags, (stage, tag)
        assert any(tag.startswith("lr/") for tag in tags)
        assert [e.step for e in events.Scalars("loss/vdep")] == [1, 2, 3]
    # The logged LR is the one each step used: peak × warmup/cosine factor (demo-tiny: warmup of 1 step).
    from vdep.train.schedule import lr_factor

    for stage, peak in (("align", 2e-3), ("finetune", 1e-3)):
        logged = [m["lr/projector"] for m in read_metrics(run_dir, stage)]
        assert logged == pytest.approx([peak * lr_factor(step, 1, 3) for step in range(3)]), stage
    trained = load_trained_model(run_dir)
    assert trained.stage == "finetune"
    assert [layer.path for layer in trained.source.layers] == [run_dir / s / "final" / "trainable.safetensors"
                                                               for s in ("align", "finetune")]
    records = json.loads((small_data.raw / "eval.json").read_text())
    result = answer_questions(trained, records, small_data.raw / "images", "vicuna_v1")
    assert result.total == len(records)
    # A rerun finds both stages complete and trains nothing more.
    train(1, small_data, run_dir, *steps)
    assert len(read_metrics(run_dir, "finetune")) == 3
    assert "already complete" in (run_dir / "logs" / "train.log").read_text()


def test_resume_from_the_latest_checkpoint_repeats_the_uninterrupted_losses(small_data, tmp_path):
    common = ["stage=align", "stages.align.max_steps=4", "stages.align.save_every=2", "run.log_every=1",
              "run.keep_last=3", "stages.align.zero=zero2"]
    full = tmp_path / "full"
    train(1, small_data, full, *common)
    # Simulate a job that died after its step-2 checkpoint: drop everything written after it.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "align" / "final")
    shutil.rmtree(interrupted / "align" / "checkpoints" / "step_00000004")
    (interrupted / "align" / "checkpoints" / "latest").write_text("step_00000002")
    metrics = interrupted / "align" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:2]))
    train(1, small_data, interrupted, *common)
    assert "resumed from" in (interrupted / "logs" / "train.log").read_text()
    assert losses(interrupted, "align") == pytest.approx(losses(full, "align"), rel=1e-5)


def test_torchrun_and_deepspeed_launchers(small_data, tmp_path):
    from vdep.train.ds import prebuild_ops

    prebuild_ops()
    quick = ["stage=align", "stages.align.max_steps=1", "stages.align.global_batch_size=8", "stages.align.micro_batch_size=4"]
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vdep"],
        # the launcher script installed beside this interpreter (the virtualenv need not be activated)
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--module", "vdep"],
    }
    for name, command in launchers.items():
        run_dir = tmp_path / name
        result = subprocess.run([*command, "train", "demo-tiny", *small_data.overrides(run_dir), *quick],
                                check=False, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"2 rank(s) via {name}" in (run_dir / "logs" / "train.log").read_text()


def test_a_setup_failure_on_rank_zero_stops_every_rank(small_data, tmp_path):
    not_a_tokenizer = tmp_path / "empty-folder"
    not_a_tokenizer.mkdir()
    code = launch_local(2, ["train", "demo-tiny", *small_data.overrides(tmp_path / "run"), f"model.tokenizer={not_a_tokenizer}"])
    assert code == 2  # the ConfigError's exit status, not a hang or a timeout


@pytest.mark.parametrize("head", ["linear", "identity"])
def test_the_fused_kernel_trains_like_the_reference_under_zero3(small_data, tmp_path, head):
    """linear: the head's fixed number of chunks keeps ZeRO-3's parameter gathers in step across ranks;
    identity: the pass-through form, whose backward adds into the text loss's gradient (finetune, so
    the LLM trains on both terms). Triton's interpreter runs the kernel (TRITON_INTERPRET=1 from conftest)."""
    stage = "align" if head == "linear" else "finetune"
    common = [f"stage={stage}", f"stages.{stage}.max_steps=3", "run.log_every=1", "data.shuffle_buffer=0",
              f"stages.{stage}.zero=zero3", f"vdep.head={head}", "vdep.mode_ratio=1.0"]
    if stage == "finetune":
        common.append("stages.finetune.init_from=none")
    train(2, small_data, tmp_path / "reference", *common, "vdep.kernel=reference")
    train(2, small_data, tmp_path / "fused", *common, "vdep.kernel=fused")
    log = (tmp_path / "fused" / "logs" / "train.log").read_text()
    assert "VDEP kernel fused (Triton)" in log
    assert ("added into the text loss's" in log) == (head == "identity")
    assert losses(tmp_path / "fused", stage) == pytest.approx(losses(tmp_path / "reference", stage), rel=1e-4)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_final_weights_are_the_fp32_masters_the_last_checkpoint_holds(small_data, tmp_path, zero):
    """In bf16 the module's weights are the optimizer's fp32 masters rounded to bf16; the final weights are the
    masters, so exporting a stage's final weights and exporting its last checkpoint give the same model."""
    from safetensors.torch import load_file

    from vdep.weight_layers import ZeroCheckpointLayer

    run_dir = tmp_path / "run"
    train(2, small_data, run_dir, "stage=finetune", "stages.finetune.init_from=none", f"stages.finetune.zero={zero}",
          "stages.finetune.max_steps=3", "stages.finetune.global_batch_size=8", "stages.finetune.micro_batch_size=4",
          "deepspeed.precision=bf16")
    final = load_file(str(run_dir / "finetune" / "final" / "trainable.safetensors"))
    with ZeroCheckpointLayer(run_dir / "finetune" / "checkpoints", "step_00000003").open() as reader:
        masters = {name: reader.read(name) for name in reader.names()}
    assert sorted(final) == sorted(masters)
    rounded = 0
    for name, master in masters.items():
        assert final[name].dtype == torch.float32
        assert torch.equal(final[name], master), name
        rounded += not torch.equal(master.to(torch.bfloat16).float(), master)
    assert rounded == len(masters)  # the bf16 module weights differ from the masters: saving them would show
