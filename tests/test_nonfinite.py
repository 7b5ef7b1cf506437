"""Counting non-finite steps: fp16's loss-scale search is not a divergence, overflows at its minimum are.

A DeepSpeed fp16 engine does not run on CPU (its CPU accelerator has no fp16), so the engine here is the two
things `NonfiniteSteps` reads of one: its optimizer's loss scaler, made by DeepSpeed's own factory from the
fp16 section vdep's config fill gives DeepSpeed (its defaults: 2^16, hysteresis 2, minimum 1), and whether the
step applied its update, which for fp16 is exactly "the scaler saw no overflow".
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vdep.train.checkpoint import TrainState
from vdep.train.deepspeed_config import fill_config, load_preset
from vdep.train.distributed import free_port
from vdep.train.nonfinite import NonfiniteSteps


@pytest.fixture
def one_rank(monkeypatch):
    """DeepSpeed's loss scaler asks the process group for its rank: a group of one."""
    import deepspeed
    import torch.distributed as dist

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    yield
    dist.destroy_process_group()


class Fp16Engine:
    def __init__(self):
        from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
        from deepspeed.runtime.precision_config import get_float16_config

        config = fill_config(*load_preset("zero3"), micro_batch_size=1, grad_accum_steps=1, world_size=1, grad_clip=1.0,
                             precision="fp16", hidden_size=64)
        fp16 = get_float16_config(config)
        self.optimizer = SimpleNamespace(loss_scaler=CreateLossScaler(
            dtype=torch.half, static_loss_scale=fp16.loss_scale, dynamic_scaling=fp16.loss_scale == 0,
            dynamic_loss_args=fp16.dynamic_loss_scale_args()))
        self.applied = True

    def step(self, gradients_overflow_above: float | None) -> None:
        """One step whose gradients overflow when scaled above this (None: at any scale)."""
        scaler = self.optimizer.loss_scaler
        overflow = gradients_overflow_above is None or scaler.cur_scale > gradients_overflow_above
        scaler.update_scale(overflow)
        self.applied = not overflow

    def was_step_applied(self) -> bool:
        return self.applied


def test_a_fresh_fp16_run_searching_its_loss_scale_does_not_halt_but_a_diverged_one_does(one_rank):
    engine = Fp16Engine()
    state = TrainState("finetune", 0, 0, 0, 1, "x")
    counter = NonfiniteSteps(engine, state)
    assert counter.scaler is engine.optimizer.loss_scaler and counter.loss_scale() == 2**16

    def run(steps: int, overflow_above: float | None) -> list[bool]:
        skipped = []
        for _ in range(steps):
            scale = counter.loss_scale()
            engine.step(overflow_above)
            state.step += 1
            counter.count("finetune", scale)
            skipped.append(not engine.was_step_applied())
        return skipped

    # Gradients that fit below a scale of 512: the scaler halves from 2^16 to 512, once per overflow after the
    # first (hysteresis 2): 8 skipped updates in a row, more than run.max_nonfinite_steps' 5.
    search = run(20, overflow_above=512)
    assert sum(search) == 8 and search[:8] == [True] * 8
    assert (state.nonfinite_steps, state.nonfinite_in_a_row) == (0, 0)  # none of them counted
    assert counter.loss_scale() == 512

    # A diverged run: every step overflows at any scale. The scaler goes down to its minimum (1), and from
    # there every skipped step counts; DeepSpeed itself would have raised a bare exception at the minimum.
    run(20, overflow_above=None)
    assert counter.loss_scale() == 1 and engine.optimizer.loss_scaler.raise_error_at_min_scale is False
    assert state.nonfinite_in_a_row >= 5  # run.max_nonfinite_steps (5) stops the run with a checkpoint
    assert state.nonfinite_steps == state.nonfinite_in_a_row


def test_without_loss_scaling_every_skipped_step_counts():
    engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=None), was_step_applied=lambda: False)
    state = TrainState("align", 3, 0, 0, 1, "x")
    counter = NonfiniteSteps(engine, state)
    counter.count("align", counter.loss_scale())
    counter.count("align", counter.loss_scale())
    assert (state.nonfinite_steps, state.nonfinite_in_a_row) == (2, 2)
