"""AnyRes training on 2 gloo ranks under ZeRO-3 (slow; run serially): ranks whose micro-batches hold different
numbers of tiles (none, one, nine) at random steps complete every step, and a run with tiled, multi-image and
video samples and VDEP on, killed after a checkpoint, resumes with the same losses."""

from __future__ import annotations

import json
import random
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import anyres_overrides, read_metrics
from vdep.data.anyres import TILED
from vdep.train.launch import launch_local, start_local_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


def tiles(batch) -> int:
    """Tiles of a micro-batch's images (their views beyond each tiled image's base view)."""
    return sum(views - 1 for kind, views, *_ in batch.image_layout.tolist() if kind == TILED)


@pytest.fixture(scope="module")
def tile_shards(tmp_path_factory):
    """Samples of 0 tiles (text), 1 tile (a 20-pixel image: the 64×64 grid) and 9 tiles (two 70-pixel images on
    the 128×128 grid, 4 tiles each, and a small one), in a random order."""
    from vdep.data_tools.build_shards import BuildOptions, build_shards

    folder = tmp_path_factory.mktemp("tiles")
    images = folder / "images"
    images.mkdir()
    rng = np.random.RandomState(1)
    for name, side in (("small.png", 20), ("big.png", 70)):
        Image.fromarray((rng.rand(side, side, 3) * 255).astype(np.uint8)).save(images / name)
    turns = [{"from": "human", "value": "<image> and <image> and <image>: which is red?"}, {"from": "gpt", "value": "red"}]
    records = ([{"id": f"nine{i}", "image": ["big.png", "big.png", "small.png"], "conversations": turns} for i in range(8)]
               + [{"id": f"one{i}", "image": "small.png", "conversations": [
                   {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "blue"}]}
                  for i in range(8)]
               + [{"id": f"text{i}", "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]}
                  for i in range(8)])
    random.Random(0).shuffle(records)
    (folder / "tiles.json").write_text(json.dumps(records))
    build_shards(BuildOptions([folder / "tiles.json"], images, folder / "shards", samples_per_shard=6, progress=False))
    return folder / "shards"


def test_zero3_ranks_holding_0_1_and_9_tiles_in_the_same_step_complete(small_data, tokenizer, tile_shards, tmp_path):
    """ZeRO-3 hang rules under AnyRes: every rank runs the tower, the projector and image_newline at every
    micro-step, whatever the number of tiles it holds (none: a zero image; the newline as a zero-length slice)."""
    from tests.helpers import anyres_loader

    steps = 12
    run_dir = tmp_path / "run"
    overrides = anyres_overrides(small_data, tile_shards, run_dir)
    held = [[tiles(b) for b, _ in zip(anyres_loader(tile_shards, tokenizer, rank, 2, seed=3).micro_batches(0), range(steps))]
            for rank in range(2)]
    pairs = {tuple(sorted(pair)) for pair in zip(*held)}
    assert {(0, 9), (1, 9), (0, 1)} <= pairs, held  # at random steps, both ways round
    code = launch_local(2, ["train", "demo-tiny", *overrides, "stage=finetune", "stages.finetune.init_from=none",
                            "stages.finetune.zero=zero3", "stages.finetune.global_batch_size=2",
                            "stages.finetune.micro_batch_size=1", f"stages.finetune.max_steps={steps}", "run.log_every=1",
                            "vdep.mode_ratio=1.0", "data.split=samples", "data.shuffle_buffer=4", "run.seed=3"])
    assert code == 0
    metrics = read_metrics(run_dir, "finetune")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor([m["loss/total"], m["grad_norm"]])).all() for m in metrics)
    assert sum(m["tokens/image"] > 0 for m in metrics) >= sum(a + b > 0 for a, b in zip(*held))


STEPS = 6
STAGE = ["stage=finetune", "stages.finetune.init_from=none", "stages.finetune.zero=zero3",
         f"stages.finetune.max_steps={STEPS}", "stages.finetune.save_every=2", "stages.finetune.global_batch_size=4",
         "stages.finetune.micro_batch_size=2", "run.log_every=1", "run.keep_last=5", "vdep.mode_ratio=0.5",
         "data.packing=true"]


def losses_by_step(run_dir) -> dict[int, tuple[float, float, int]]:
    return {m["step"]: (m["loss/text"], m["loss/vdep"], m["tokens/image"]) for m in read_metrics(run_dir, "finetune")}


def test_a_tiled_multi_image_vdep_run_killed_after_a_checkpoint_resumes_with_the_same_losses(
        small_data, anyres_shards, tmp_path):
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    argv = ["train", "demo-tiny", *anyres_overrides(small_data, anyres_shards, reference_dir), *STAGE]
    assert launch_local(2, argv) == 0
    reference = losses_by_step(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1)) and all(vdep > 0 for _, vdep, _ in reference.values())
    log = (reference_dir / "logs" / "train.log").read_text()
    assert "image_newline" in log  # the trainable table lists it, with the projector
    argv = ["train", "demo-tiny", *anyres_overrides(small_data, anyres_shards, killed_dir), *STAGE]
    ranks = start_local_ranks(2, argv)
    pointer = killed_dir / "finetune" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (pointer.is_file() and pointer.read_text().strip() != ""):  # `latest` moves once a save is complete
        assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), "no checkpoint before the end"
        time.sleep(0.02)
    for process in ranks:
        process.send_signal(signal.SIGKILL)
    assert all(process.wait() == -signal.SIGKILL for process in ranks)
    assert not (killed_dir / "finetune" / "final").exists()
    assert launch_local(2, argv) == 0
    assert "resumed from" in (killed_dir / "logs" / "train.log").read_text()
    resumed = losses_by_step(killed_dir)
    assert sorted(resumed) == sorted(reference)
    for step, values in reference.items():
        assert resumed[step] == pytest.approx(values, rel=1e-6, abs=1e-6), f"step {step}"
    # image_newline trained with the projector, saved with the stage, loaded back by evaluation
    from safetensors.torch import load_file

    from vdep.evaluate import load_trained_model

    final = load_file(str(killed_dir / "finetune" / "final" / "trainable.safetensors"))
    start = load_file(str(killed_dir / "base" / "image_newline_init.safetensors"))["image_newline"]
    assert not torch.equal(final["image_newline"], start)
    assert torch.equal(load_trained_model(killed_dir).model.image_newline.detach(), final["image_newline"])
