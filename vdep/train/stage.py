"""One training stage under DeepSpeed: build, resume, loop, checkpoint, hand over.

A step of the loop:
1. take this rank's `grad_accum_steps` micro-batches;
2. plan the global batch with the other ranks (VDEP modes, N_text, N_img; see global_batch.py);
3. for each micro-batch: forward (vision tower → projector → LLM → named loss sums), backward of
   this micro-batch's share of L, `engine.step()` (DeepSpeed updates at the accumulation boundary).
DeepSpeed averages gradients over data-parallel ranks, so each rank's share is multiplied by the world
size: summed over micro-batches and averaged over ranks, the gradient is exactly that of L.
"""

from __future__ import annotations

import functools
import gc
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, PreTrainedTokenizerBase

from ..config import STAGE_NAMES, StageConfig, TrainConfig, check_batch_geometry, config_fingerprint
from ..data.batch import Batch
from ..data.dataset import SamplePreprocessor
from ..data.images import ImageProcessing
from ..data.loader import StageLoader
from ..data.shards import discover_shards
from ..data.templates import TemplateTokenizer, check_template_tokenizer, make_template
from ..errors import CheckpointError, DataError
from ..log import get_logger
from ..model.attention import choose_attention
from ..model.build import BasePaths, build_model, load_weights_file
from ..model.llava import MultimodalSpec, VdepLlava
from ..objectives.losses import LossSums, batch_loss
from .checkpoint import (
    FINAL_WEIGHTS,
    TrainState,
    latest_tag,
    load_checkpoint,
    read_summary,
    save_checkpoint,
    save_final_weights,
    stage_is_complete,
)
from .deepspeed_config import fill_config, load_preset, offloads_optimizer, zero_stage
from .distributed import LaunchEnv, all_reduce_sum, sum_counters
from .ds import import_deepspeed, load_op
from .freezing import apply_trainable, format_table, numel, param_groups, trainable_table
from .global_batch import StepPlan, plan_step
from .metrics import FlopModel, StageMetrics, peak_flops
from .schedule import lr_factor, warmup_steps

log = get_logger("train")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Skipped samples are named in the log this many times per stage; after that they are only counted.
MAX_SKIP_WARNINGS = 20


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

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


# ------------------------------------------------------------------------------------------------ setup
def starting_weights(ctx: RunContext, name: str, stage: StageConfig) -> list[Path]:
    """Trainable weights to load on top of the base model before this stage starts."""
    if stage.init_from == "none":
        return []
    if stage.init_from == "previous":
        files = []
        for earlier in STAGE_NAMES[: STAGE_NAMES.index(name)]:
            if getattr(ctx.config.stages, earlier) is None:
                continue
            stage_dir = ctx.run_dir / earlier
            if not stage_is_complete(stage_dir):
                raise CheckpointError(
                    f"stage {name} starts from the {earlier} stage's result, but {stage_dir / 'final'} has none; "
                    f"run stage={earlier} first, or set stages.{name}.init_from=none (or to another run's result)"
                )
            files.append(stage_dir / "final" / FINAL_WEIGHTS)
        return files
    path = Path(stage.init_from)
    for candidate in (path, path / FINAL_WEIGHTS, path / "final" / FINAL_WEIGHTS):
        if candidate.is_file():
            return [candidate]
    raise CheckpointError(
        f"stages.{name}.init_from={stage.init_from}: no {FINAL_WEIGHTS} there (give a stage folder, its final/ "
        "folder or the file itself)"
    )


def make_loader(ctx: RunContext, stage: StageConfig, spec: MultimodalSpec, grad_accum_steps: int) -> StageLoader:
    template = make_template(stage.template, ctx.tokenizer)
    encoder = TemplateTokenizer(ctx.tokenizer, spec.image_token_id, spec.num_image_tokens)
    check_template_tokenizer(template, encoder)
    data = ctx.config.data
    if data.max_length <= spec.num_image_tokens:
        raise DataError(
            f"data.max_length={data.max_length} leaves no room for text after {spec.num_image_tokens} image tokens"
        )
    return StageLoader.create(
        discover_shards(stage.shards),
        SamplePreprocessor(template, encoder, ctx.image_processing, data.max_length),
        rank=ctx.launch.rank,
        world_size=ctx.launch.world_size,
        num_workers=data.num_workers,
        micro_batch_size=stage.micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=ctx.config.run.seed,
        split=data.split,
        shuffle_buffer=data.shuffle_buffer,
        pad_token_id=ctx.tokenizer.pad_token_id,
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


def skip(batches: Iterator[Batch], count: int) -> Iterator[Batch]:
    """Fast-forward a fresh epoch iterator past the micro-batches a checkpoint already consumed."""
    for _ in range(count):
        next(batches, None)
    return batches


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line (device tensors: no host sync per step)."""

    device: torch.device
    sums: torch.Tensor = field(init=False)
    image_positions: int = 0
    text_targets: int = 0
    image_targets: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # text loss sum, vdep loss sum, ||h|| sum, ||e|| sum
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add_micro(self, sums: LossSums, image_positions: int) -> None:
        self.sums += torch.stack([sums.text.detach(), sums.vdep.detach(), sums.hidden_norm, sums.target_norm]).double()
        self.image_positions += image_positions

    def add_step(self, plan: StepPlan, flops: float) -> None:
        self.text_targets += plan.counts.text
        self.image_targets += plan.counts.image
        self.samples += plan.samples
        self.tokens += plan.tokens
        self.flops += flops
        self.steps += 1

    def scalars(self, alpha: float) -> dict[str, float]:
        """Collective (all ranks): global averages over the interval."""
        local = torch.cat([self.sums, torch.tensor([float(self.image_positions)], dtype=torch.float64, device=self.device)])
        text, vdep, hidden_norm, target_norm, positions = all_reduce_sum(local).tolist()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        loss_text = text / max(self.text_targets, 1)
        loss_vdep = vdep / max(self.image_targets, 1)
        return {
            "loss/text": loss_text,
            "loss/vdep": loss_vdep,
            "loss/total": loss_text + alpha * loss_vdep,
            "tokens/text": self.text_targets / self.steps,
            "tokens/image": self.image_targets / self.steps,
            "norm/hidden_at_image": hidden_norm / max(positions, 1),
            "norm/target_at_image": target_norm / max(positions, 1),
            "throughput/samples_per_s": self.samples / elapsed,
            "throughput/tokens_per_s": self.tokens / elapsed,
            "throughput/flops_per_s": self.flops / elapsed,
        }


def run_stage(ctx: RunContext, name: str, stage: StageConfig) -> dict:
    stage_dir = ctx.run_dir / name
    if stage_is_complete(stage_dir):
        log.info("stage %s: already complete in %s; skipping it", name, stage_dir / "final")
        return read_summary(stage_dir)
    deepspeed = import_deepspeed()
    world = ctx.launch.world_size
    grad_accum = check_batch_geometry(name, stage, world)
    preset, preset_path = load_preset(stage.zero)
    hidden_size = AutoConfig.from_pretrained(ctx.base.language_model).hidden_size
    ds_config = fill_config(
        preset,
        preset_path,
        micro_batch_size=stage.micro_batch_size,
        grad_accum_steps=grad_accum,
        world_size=world,
        grad_clip=stage.grad_clip,
        precision=ctx.precision,
        hidden_size=hidden_size,
    )
    zero = zero_stage(ds_config)
    attention = choose_attention(ctx.config.model.attn_implementation, ctx.device)
    dtype = DTYPES[ctx.precision]
    built = build_model(
        ctx.config.model, stage.vdep, ctx.tokenizer, ctx.base, attention, dtype, ctx.device,
        zero3_config=ds_config if zero == 3 else None,
    )
    model, spec = built.model, built.spec
    for path in starting_weights(ctx, name, stage):
        load_weights_file(model, path)
        log.info("stage %s: loaded starting weights from %s", name, path)
    apply_trainable(model, stage.trainable)

    loader = make_loader(ctx, stage, spec, grad_accum)
    total = loader.total_steps(stage.epochs, stage.max_steps)
    warmup = warmup_steps(total, stage.warmup_ratio)
    groups = param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay)
    base_lrs = {g["name"]: g["lr"] for g in groups}
    schedule = functools.partial(lr_factor, warmup=warmup, total=total)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(groups, ds_config, ctx.device),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule),
        config=ds_config,
    )
    log.info(
        "stage %s: ZeRO-%d, %s, attention %s (%s), VDEP kernel %s, %d rank(s) × micro-batch %d × %d accumulation "
        "= global batch %d; %d steps (%d warmup), template %s\n%s",
        name, zero, ctx.precision, attention.implementation, attention.reason, built.kernel, world,
        stage.micro_batch_size, grad_accum, stage.global_batch_size, total, warmup, stage.template,
        format_table(trainable_table(model)),
    )

    checkpoints = stage_dir / "checkpoints"
    fingerprint = config_fingerprint(ctx.config)
    state = TrainState(name, 0, 0, 0, world, fingerprint)
    tag = latest_tag(checkpoints)
    if tag is not None:
        state = load_checkpoint(engine, checkpoints, tag)
        if state.config_fingerprint != fingerprint:
            raise CheckpointError(
                f"{checkpoints / tag} was written with a different model or data config; use a new run.name"
            )
        if state.world_size != world:
            raise CheckpointError(
                f"{checkpoints / tag} was written by {state.world_size} rank(s); this run has {world}. "
                "Resume with the same number of processes"
            )
        log.info("stage %s: resumed from %s (step %d of %d)", name, checkpoints / tag, state.step, total)

    metrics = StageMetrics(ctx.run_dir, name, total, state.step, enabled=ctx.is_main)
    flops = flop_model(model, spec, llm_trainable="language_model" in stage.trainable)
    peak = peak_flops(ctx.device, ctx.precision)
    skipped = Counter(state.skipped_samples)
    warnings_left = MAX_SKIP_WARNINGS
    batches = skip(iter(loader.micro_batches(state.epoch)), state.micro_batches_in_epoch)
    interval = IntervalStats(ctx.device)
    last_scalars: dict[str, float] = {}
    slots = stage.micro_batch_size * grad_accum
    while state.step < total:
        micro_batches = take(batches, grad_accum)
        plan = plan_step(
            micro_batches, step=state.step, seed=ctx.config.run.seed, slots_per_rank=slots,
            vdep=stage.vdep, spec=spec, device=ctx.device,
        )
        if plan is None:
            if state.micro_batches_in_epoch == 0:
                raise DataError(f"stage {name}: epoch {state.epoch} produced no complete step; see the skipped samples")
            state.epoch += 1
            state.micro_batches_in_epoch = 0
            batches = iter(loader.micro_batches(state.epoch))
            continue
        for batch in micro_batches:  # type: ignore[union-attr]
            skipped.update(batch.skipped)
            for message in batch.skip_messages:
                if warnings_left > 0:
                    log.warning("skipped sample %s", message)
                    warnings_left -= 1
                    if warnings_left == 0:
                        log.warning("further skipped samples are counted, not named (see data/skipped in TensorBoard)")
        for inputs in plan.inputs:
            sums = engine(inputs.to(ctx.device, dtype))
            engine.backward(batch_loss(sums, plan.counts, stage.vdep.alpha) * world, scale_wrt_gas=False)
            engine.step()
            interval.add_micro(sums, int(inputs.image_positions.sum()))
        step_flops = flops.step_flops(plan.tokens, plan.squared_lengths, plan.image_samples)
        interval.add_step(plan, step_flops)
        state.step += 1
        state.micro_batches_in_epoch += grad_accum
        if state.step % ctx.config.run.log_every == 0 or state.step == total:
            scalars = interval.scalars(stage.vdep.alpha)
            scalars["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
            for group, lr in base_lrs.items():
                scalars[f"lr/{group}"] = lr * schedule(state.step - 1)
            if peak is not None:
                scalars["perf/mfu"] = scalars["throughput/flops_per_s"] / (peak * world)
            if ctx.device.type == "cuda":
                scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            for reason, count in sum_counters(skipped).items():
                scalars[f"data/skipped/{reason}"] = float(count)
            metrics.log(state.step, scalars)
            last_scalars = scalars
            interval = IntervalStats(ctx.device)
        if stage.save_every and state.step % stage.save_every == 0 and state.step < total:
            state.skipped_samples = dict(skipped)
            save_checkpoint(engine, checkpoints, state, ctx.config.run.keep_last)
    state.skipped_samples = dict(skipped)
    save_checkpoint(engine, checkpoints, state, ctx.config.run.keep_last)
    total_skipped = sum_counters(skipped)
    if total_skipped:
        log.warning("stage %s: skipped %d sample(s): %s", name, sum(total_skipped.values()), total_skipped)
    summary = {
        "stage": name,
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "final": {k: v for k, v in last_scalars.items() if k.startswith(("loss/", "norm/", "tokens/"))},
        "skipped_samples": total_skipped,
        "vdep": stage.vdep.__dict__,
    }
    save_final_weights(engine.module, stage_dir / "final", summary)
    metrics.close()
    log.info("stage %s: done after %d steps; weights in %s", name, state.step, stage_dir / "final")
    _release(engine)
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
