"""One training stage under DeepSpeed: build, resume, loop, checkpoint, hand over.

A step of the loop:
1. take this rank's `grad_accum_steps` micro-batches;
2. plan the global batch with the other ranks (VDEP modes, N_text, N_img; see global_batch.py);
3. for each micro-batch: forward (vision tower → projector → LLM → named loss sums), backward of
   this micro-batch's share of L, `engine.step()` (DeepSpeed updates at the accumulation boundary);
4. if DeepSpeed found the global gradient norm non-finite (any non-finite loss makes it so), the
   update was skipped on every rank: count it, and stop after `run.max_nonfinite_steps` in a row;
5. all ranks agree whether a stop signal arrived (preemption.py); if so, checkpoint and exit.
DeepSpeed averages gradients over data-parallel ranks, so each rank's share is multiplied by the world
size: summed over micro-batches and averaged over ranks, the gradient is exactly that of L.
"""

from __future__ import annotations

import functools
import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, PreTrainedTokenizerBase

from ..config import StageConfig, TrainConfig, check_batch_geometry, config_fingerprint
from ..data.batch import Batch
from ..data.dataset import Batching, SamplePreprocessor
from ..data.images import ImageProcessing
from ..data.loader import DataPosition, StageLoader
from ..data.shards import discover_shards, image_fraction
from ..data.templates import TemplateTokenizer, check_template_tokenizer, make_template
from ..errors import CheckpointError, DataError, TrainingHalted, TrainingPreempted
from ..log import get_logger
from ..model.attention import choose_attention, packed_attention
from ..model.build import BasePaths, build_model, load_weights_file
from ..model.llava import MultimodalSpec, VdepLlava
from ..objectives.losses import batch_loss
from .checkpoint import (
    TrainState,
    checkpoint_tag,
    latest_tag,
    load_checkpoint,
    read_data_position,
    read_summary,
    save_checkpoint,
    save_final_weights,
    stage_is_complete,
    starting_weights,
)
from .deepspeed_config import fill_config, load_preset, offloads_optimizer, zero_stage
from .distributed import LaunchEnv, sum_counters
from .faults import Faults
from .ds import import_deepspeed, load_op
from .freezing import apply_trainable, format_table, numel, param_groups, trainable_table
from .global_batch import plan_step
from .metrics import FlopModel, IntervalStats, SkipReport, StageMetrics, peak_flops
from .preemption import StopRequest
from .schedule import lr_factor, warmup_steps

log = get_logger("train")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RunContext:
    config: TrainConfig
    launch: LaunchEnv
    device: torch.device
    run_dir: Path
    tokenizer: PreTrainedTokenizerBase
    base: BasePaths
    image_processing: ImageProcessing
    precision: str
    stop: StopRequest
    faults: Faults

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


# ------------------------------------------------------------------------------------------------ setup
def make_loader(ctx: RunContext, stage: StageConfig, spec: MultimodalSpec, grad_accum_steps: int) -> StageLoader:
    template = make_template(stage.template, ctx.tokenizer)
    encoder = TemplateTokenizer(ctx.tokenizer, spec.image_token_id, spec.num_image_tokens)
    check_template_tokenizer(template, encoder)
    data = ctx.config.data
    if data.max_length <= spec.num_image_tokens:
        raise DataError(
            f"data.max_length={data.max_length} leaves no room for text after {spec.num_image_tokens} image tokens"
        )
    shards = discover_shards(stage.shards)
    batching = Batching(
        micro_batch_size=stage.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        image_size=ctx.image_processing.output_size,
        pixel_table=ctx.image_processing.normalisation_table(),
        packing=data.packing,
        pack_capacity=data.max_length,
        group_by_modality_length=data.group_by_modality_length,
        group_window=data.group_window,
        image_fraction=image_fraction(shards) if data.group_by_modality_length else 0.5,
    )
    return StageLoader.create(
        shards,
        SamplePreprocessor(template, encoder, ctx.image_processing, data.max_length),
        batching,
        rank=ctx.launch.rank,
        world_size=ctx.launch.world_size,
        num_workers=data.num_workers,
        grad_accum_steps=grad_accum_steps,
        seed=ctx.config.run.seed,
        split=data.split,
        shuffle_buffer=data.shuffle_buffer,
        pin_memory=ctx.device.type == "cuda",
    )


def make_optimizer(groups: list[dict], ds_config: dict, device: torch.device) -> torch.optim.Optimizer:
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        load_op(CPUAdamBuilder())  # compiled on first use; serialised across ranks
        return DeepSpeedCPUAdam(groups, adamw_mode=True, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def flop_model(model: VdepLlava, spec: MultimodalSpec, llm_trainable: bool) -> FlopModel:
    embeddings = numel(model.language_model.get_input_embeddings().weight)
    llm = sum(numel(p) for p in model.language_model.parameters()) - embeddings
    llm += sum(numel(p) for p in model.lm_head.parameters())
    config = model.language_model.config
    return FlopModel(
        llm_params=llm,
        llm_layers=config.num_hidden_layers,
        llm_hidden=config.hidden_size,
        vision_params=sum(numel(p) for p in model.vision_tower.parameters()),
        vision_tokens_per_image=spec.num_image_tokens,
        projector_params=sum(numel(p) for p in model.multi_modal_projector.parameters()),
        llm_trainable=llm_trainable,
    )


# --------------------------------------------------------------------------------------------- stepping
def take(batches: Iterator[Batch], count: int) -> list[Batch] | None:
    group = list(itertools.islice(batches, count))
    return group if len(group) == count else None


def resume_data(loader: StageLoader, state: TrainState, checkpoints: Path) -> tuple[DataPosition, Iterator[Batch]]:
    """This rank's micro-batches from where the checkpoint of `state` left them.

    A checkpoint records each rank's loader position (DataPosition): the loader replays only the raw
    bytes before it. A checkpoint without one (written before vdep recorded positions) is resumed by
    drawing and discarding the consumed micro-batches, which decodes them again but gives the same batches.
    """
    recorded = read_data_position(checkpoints / checkpoint_tag(state.step)) if state.step else None
    if recorded is not None:
        position = DataPosition.from_json(recorded)
        if (position.epoch, position.micro_batches) == (state.epoch, state.micro_batches_in_epoch):
            return position, iter(loader.micro_batches(state.epoch, position))
    position = DataPosition(state.epoch)
    batches = iter(loader.micro_batches(state.epoch))
    for _ in range(state.micro_batches_in_epoch):
        batch = next(batches, None)
        if batch is not None:
            position.advance(batch, loader.workers)
    return position, batches


@dataclass
class StageEngine:
    """Everything a stage's loop needs, built once."""

    engine: Any  # deepspeed.DeepSpeedEngine wrapping the VdepLlava
    spec: MultimodalSpec
    loader: StageLoader
    total_steps: int
    schedule: Callable[[int], float]  # LR multiplier by step
    base_lrs: dict[str, float]  # peak LR by parameter group
    grad_accum: int
    flops: FlopModel


def build_stage(ctx: RunContext, name: str, stage: StageConfig) -> StageEngine:
    """Model with its starting weights, data, optimizer, schedule and DeepSpeed engine; logs the setup."""
    deepspeed = import_deepspeed()
    world = ctx.launch.world_size
    grad_accum = check_batch_geometry(name, stage, world)
    preset, preset_path = load_preset(stage.zero)
    ds_config = fill_config(
        preset,
        preset_path,
        micro_batch_size=stage.micro_batch_size,
        grad_accum_steps=grad_accum,
        world_size=world,
        grad_clip=stage.grad_clip,
        precision=ctx.precision,
        hidden_size=AutoConfig.from_pretrained(ctx.base.language_model).hidden_size,
    )
    zero = zero_stage(ds_config)
    attention = choose_attention(ctx.config.model.attn_implementation, ctx.device, ctx.config.data.packing)
    built = build_model(
        ctx.config.model, stage.vdep, ctx.tokenizer, ctx.base, attention, DTYPES[ctx.precision], ctx.device,
        zero3_config=ds_config if zero == 3 else None,
    )
    model, spec = built.model, built.spec
    for path in starting_weights(ctx.config, ctx.run_dir, name):
        skipped = load_weights_file(model, path)
        log.info("stage %s: loaded starting weights from %s", name, path)
        if skipped:
            log.info(
                "stage %s: the VDEP head in %s (%s) does not match this stage's vdep.head=%s; it starts afresh",
                name, path, ", ".join(skipped), stage.vdep.head,
            )
    apply_trainable(model, stage.trainable)

    loader = make_loader(ctx, stage, spec, grad_accum)
    total = loader.total_steps(stage.epochs, stage.max_steps)
    warmup = warmup_steps(total, stage.warmup_ratio)
    schedule = functools.partial(lr_factor, warmup=warmup, total=total)
    groups = param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay)
    base_lrs = {group["name"]: group["lr"] for group in groups}  # before LambdaLR rescales the groups
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(groups, ds_config, ctx.device),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule),
        config=ds_config,
    )
    log.info(
        "stage %s: ZeRO-%d, %s, attention %s (%s)%s, VDEP kernel %s, %d rank(s) × micro-batch %d × %d accumulation "
        "= global batch %d; %d steps (%d warmup), template %s\n%s",
        name, zero, ctx.precision, attention.implementation, attention.reason,
        f"; packed rows: {packed_attention(attention)}" if ctx.config.data.packing else "", built.kernel, world,
        stage.micro_batch_size, grad_accum, stage.global_batch_size, total, warmup, stage.template,
        format_table(trainable_table(model)),
    )
    return StageEngine(
        engine=engine,
        spec=spec,
        loader=loader,
        total_steps=total,
        schedule=schedule,
        base_lrs=base_lrs,
        grad_accum=grad_accum,
        flops=flop_model(model, spec, llm_trainable="language_model" in stage.trainable),
    )


def restore_state(ctx: RunContext, name: str, stage: StageEngine, checkpoints: Path) -> TrainState:
    """The state to start from: the latest checkpoint of this stage, or step 0."""
    world = ctx.launch.world_size
    fingerprint = config_fingerprint(ctx.config)
    tag = latest_tag(checkpoints)
    if tag is None:
        return TrainState(name, 0, 0, 0, world, fingerprint)
    state = load_checkpoint(stage.engine, checkpoints, tag)
    if state.config_fingerprint != fingerprint:
        raise CheckpointError(f"{checkpoints / tag} was written with a different model or data config; use a new run.name")
    if state.world_size != world:
        raise CheckpointError(
            f"{checkpoints / tag} was written by {state.world_size} rank(s); this run has {world}. "
            "Resume with the same number of processes"
        )
    log.info("stage %s: resumed from %s (step %d of %d)", name, checkpoints / tag, state.step, stage.total_steps)
    return state


def step_scalars(ctx: RunContext, stage: StageEngine, interval: IntervalStats, skips: SkipReport, step: int,
                 alpha: float) -> dict[str, float]:
    """Collective: the scalars logged after `step` (losses and counts over the interval, rates, LR)."""
    scalars = interval.scalars(alpha)
    scalars["grad_norm"] = float(stage.engine.get_global_grad_norm() or 0.0)
    # The LR of the latest update: DeepSpeed does not advance the schedule on a skipped step.
    scheduler_steps = stage.engine.lr_scheduler.last_epoch
    for group, lr in stage.base_lrs.items():
        scalars[f"lr/{group}"] = lr * stage.schedule(max(0, scheduler_steps - 1))
    peak = peak_flops(ctx.device, ctx.precision)
    if peak is not None:
        scalars["perf/mfu"] = scalars["throughput/flops_per_s"] / (peak * ctx.launch.world_size)
    if ctx.device.type == "cuda":
        scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    for reason, count in sum_counters(skips.counts).items():
        scalars[f"data/skipped/{reason}"] = float(count)
    return scalars


def train_steps(ctx: RunContext, name: str, config: StageConfig, stage: StageEngine, state: TrainState,
                checkpoints: Path) -> dict[str, float]:
    """Run optimizer steps until the stage's total; returns the last logged scalars."""
    engine, world = stage.engine, ctx.launch.world_size
    dtype = DTYPES[ctx.precision]
    metrics = StageMetrics(ctx.run_dir, name, stage.total_steps, state.step, enabled=ctx.is_main)
    skips = SkipReport(state.skipped_samples)
    position, batches = resume_data(stage.loader, state, checkpoints)
    interval = IntervalStats(ctx.device)
    last_scalars: dict[str, float] = {}
    nonfinite_in_a_row = 0

    def save() -> None:
        state.skipped_samples = dict(skips.counts)
        save_checkpoint(engine, checkpoints, state, ctx.config.run.keep_last, ctx.faults, position.to_json())

    while state.step < stage.total_steps:
        micro_batches = take(batches, stage.grad_accum)
        plan = plan_step(
            micro_batches, step=state.step, seed=ctx.config.run.seed,
            slots_per_rank=config.micro_batch_size * stage.grad_accum, vdep=config.vdep, spec=stage.spec,
            device=ctx.device,
        )
        if plan is None:  # some rank has no full share left: every rank starts the next epoch
            if state.micro_batches_in_epoch == 0:
                raise DataError(f"stage {name}: epoch {state.epoch} produced no complete step; see the skipped samples")
            state.epoch += 1
            state.micro_batches_in_epoch = 0
            position = DataPosition(state.epoch)
            batches = iter(stage.loader.micro_batches(state.epoch))
            continue
        skips.add(micro_batches)  # type: ignore[arg-type]
        for batch in micro_batches:  # type: ignore[union-attr]
            position.advance(batch, stage.loader.workers)
        poison = ctx.faults.nan_loss(state.step + 1)
        for inputs in plan.inputs:
            sums = engine(inputs.to(ctx.device, dtype))
            loss = batch_loss(sums, plan.counts, config.vdep.alpha) * world
            engine.backward(loss * float("nan") if poison else loss, scale_wrt_gas=False)
            engine.step()
            interval.add_micro(sums, int(inputs.image_positions.sum()))
        interval.add_step(plan, stage.flops.step_flops(plan.tokens, plan.squared_lengths, plan.image_samples))
        state.step += 1
        state.micro_batches_in_epoch += stage.grad_accum
        nonfinite_in_a_row = 0 if engine.was_step_applied() else nonfinite_in_a_row + 1
        if nonfinite_in_a_row:
            state.nonfinite_steps += 1
            log.warning(
                "stage %s: step %d had a non-finite loss or gradient norm; its update was skipped (%d in a row, "
                "%d in this stage)", name, state.step, nonfinite_in_a_row, state.nonfinite_steps,
            )
        if state.step % ctx.config.run.log_every == 0 or state.step == stage.total_steps:
            last_scalars = step_scalars(ctx, stage, interval, skips, state.step, config.vdep.alpha)
            last_scalars["train/nonfinite_steps"] = float(state.nonfinite_steps)
            metrics.log(state.step, last_scalars)
            interval = IntervalStats(ctx.device)
        saved = bool(config.save_every) and state.step % config.save_every == 0 and state.step < stage.total_steps
        if saved:
            save()
        halt = nonfinite_halt(ctx, name, state, checkpoints, nonfinite_in_a_row)
        if halt is not None:
            if not saved:
                save()
            raise halt
        if ctx.stop.agreed(ctx.device):  # after a periodic save, so a signal during it still stops this step
            if not saved:
                save()
            metrics.close()
            message = (
                f"stage {name}: stopped by {ctx.stop.signal_name or 'a signal to another rank'} after step "
                f"{state.step}; checkpoint {checkpoints / checkpoint_tag(state.step)}. Run the same command to continue"
            )
            log.warning(message)
            raise TrainingPreempted(message)
    state.skipped_samples = dict(skips.counts)
    metrics.close()
    return last_scalars


def nonfinite_halt(ctx: RunContext, name: str, state: TrainState, checkpoints: Path, in_a_row: int) -> TrainingHalted | None:
    """The error that stops the run after too many non-finite steps in a row (None: go on).

    The checkpoint saved before raising it holds the weights from before the first of them: skipped
    steps change no weight.
    """
    if in_a_row < ctx.config.run.max_nonfinite_steps:
        return None
    first = state.step - in_a_row + 1
    return TrainingHalted(
        f"stage {name}: steps {first}-{state.step} all had a non-finite loss or gradient norm "
        f"(run.max_nonfinite_steps={ctx.config.run.max_nonfinite_steps}); stopped. "
        f"{checkpoints / checkpoint_tag(state.step)} holds the weights and optimizer state from before step {first}, "
        "with the data position after the skipped batches. Lower the learning rate or inspect the data of those "
        "steps, then run the same command to continue from there"
    )


def run_stage(ctx: RunContext, name: str, config: StageConfig) -> dict:
    """Train one stage (or find it complete); returns its summary."""
    stage_dir = ctx.run_dir / name
    if stage_is_complete(stage_dir):
        log.info("stage %s: already complete in %s; skipping it", name, stage_dir / "final")
        return read_summary(stage_dir)
    stage = build_stage(ctx, name, config)
    checkpoints = stage_dir / "checkpoints"
    state = restore_state(ctx, name, stage, checkpoints)
    last_scalars = train_steps(ctx, name, config, stage, state, checkpoints)
    save_checkpoint(stage.engine, checkpoints, state, ctx.config.run.keep_last, ctx.faults)
    skipped = sum_counters(state.skipped_samples)
    if skipped:
        log.warning("stage %s: skipped %d sample(s): %s", name, sum(skipped.values()), skipped)
    summary = {
        "stage": name,
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "final": {k: v for k, v in last_scalars.items() if k.startswith(("loss/", "norm/", "tokens/"))},
        "skipped_samples": skipped,
        "vdep": asdict(config.vdep),
    }
    save_final_weights(stage.engine.module, stage_dir / "final", summary)
    log.info("stage %s: done after %d steps; weights in %s", name, state.step, stage_dir / "final")
    _release(stage.engine)
    return summary


def _release(engine) -> None:
    """Free the engine before the next stage builds its own (and ZeRO-3's hooks with it)."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
