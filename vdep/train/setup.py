"""Building one stage, always in the same order: spec → objective → loader → model → engine.

The spec (placeholder id, tokens per image, hidden sizes) comes from the tokenizer and the base
folders' configs; the VDEP objective from the stage's settings and the spec; the loader from the
spec and the batch geometry; the model from all of them, with the stage's starting weights; the
DeepSpeed engine last, around the model, the optimizer and the LR schedule.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase

from ..config import StageConfig, TrainConfig, check_batch_geometry, stage_fingerprint
from ..data.anyres import MediaProcessor
from ..data.dataset import Batching, SamplePreprocessor
from ..data.images import ImageProcessing
from ..data.loader import StageLength, StageLoader
from ..data.shards import discover_shards, image_fraction
from ..data.templates import TemplateTokenizer, check_template_tokenizer, make_template
from ..errors import DataError
from ..log import get_logger
from ..model.attention import AttentionChoice, choose_attention, packed_attention
from ..model.build import DTYPES, build_model, model_spec
from ..model.llava import MultimodalSpec, VdepLlava
from ..model.loading import load_layers
from ..model.lora import add_adapters, check_quantization
from ..objectives.objective import VdepObjective
from ..rundir import BasePaths, RunDir, stage_weights
from ..weight_layers import SafetensorsLayer
from .checkpoint import ResumePoint, find_resume_point
from .deepspeed_config import fill_config, load_preset, offloads_optimizer, zero_stage
from .distributed import LaunchEnv
from .ds import import_deepspeed, load_op
from .elastic import ElasticGeometry, elastic_geometry
from .faults import Faults
from .freezing import apply_trainable, format_table, numel, param_groups, trainable_table
from .metrics import FlopModel
from .preemption import StopRequest
from .schedule import lr_factor, warmup_steps
from .together import together

log = get_logger("train")


@dataclass
class RunContext:
    """What every stage of a run shares."""

    config: TrainConfig
    launch: LaunchEnv
    device: torch.device
    run: RunDir
    tokenizer: PreTrainedTokenizerBase
    base: BasePaths
    image_processing: ImageProcessing
    precision: str
    stop: StopRequest
    faults: Faults

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


@dataclass
class StageParts:
    """Everything a stage's trainer works with, built once."""

    engine: Any  # deepspeed.DeepSpeedEngine wrapping the VdepLlava
    objective: VdepObjective
    loader: StageLoader
    length: StageLength
    schedule: Callable[[int], float]  # LR multiplier by step
    base_lrs: dict[str, float]  # peak LR by parameter group
    grad_accum: int
    flops: FlopModel
    fingerprint: str  # of the settings a checkpoint of this stage must have been written with
    resume: ResumePoint | None = None  # the checkpoint the stage continues from (checked complete)
    elastic: ElasticGeometry | None = None  # set when that checkpoint was written on another number of ranks


def build_stage(ctx: RunContext, name: str, stage: StageConfig) -> StageParts:
    """Model with its starting weights, data, optimizer, schedule and DeepSpeed engine; logs the setup."""
    resume = find_resume_point(ctx.run.stage(name).checkpoints, ctx.device)
    # What each rank reads alone (the tokenizer's and towers' configs, sizes.json, maybe over the network):
    # a rank that fails here stops every rank with its error, before the collectives below.
    with together(ctx.device):
        spec = model_spec(ctx.config.model, ctx.base, ctx.tokenizer)
        objective = VdepObjective(
            stage.vdep, image_token_id=spec.image_token_id, num_image_tokens=spec.num_image_tokens,
            seed=ctx.config.run.seed, device=ctx.device,
        )
        elastic = None
        if resume is not None and resume.on_other_ranks(ctx.launch.world_size):
            elastic = elastic_geometry(resume, name, stage, ctx.launch.world_size)
        grad_accum = check_batch_geometry(name, stage, ctx.launch.world_size)
        loader = make_loader(ctx, stage, spec, grad_accum)
    # An elastic resume keeps the length (and so the LR schedule) that the checkpoint's run planned.
    geometry = elastic.geometry(ctx.config.data.split, len(loader.stream.shards), loader.num_workers) if elastic else None
    length = loader.stage_length(stage.epochs, stage.max_steps, geometry)
    ds_config = fill_config(
        *load_preset(stage.zero), micro_batch_size=stage.micro_batch_size, grad_accum_steps=grad_accum,
        world_size=ctx.launch.world_size, grad_clip=stage.grad_clip, precision=ctx.precision,
        hidden_size=spec.text_hidden_size,
    )
    if elastic is not None:  # DeepSpeed decides how to load when the engine is built
        ds_config["checkpoint"] = {"load_universal": True}
    attention = choose_attention(ctx.config.model.attn_implementation, ctx.device, ctx.config.data.packing)
    model = build_stage_model(ctx, name, stage, spec, objective, attention, ds_config)
    warmup = warmup_steps(length.planned_steps, stage.warmup_ratio)
    schedule = functools.partial(lr_factor, warmup=warmup, total=length.planned_steps)
    groups = param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay)
    base_lrs = {group["name"]: group["lr"] for group in groups}  # before LambdaLR rescales the groups
    engine, _, _, _ = import_deepspeed().initialize(
        model=model,
        optimizer=make_optimizer(groups, ds_config, ctx.device),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule),
        config=ds_config,
    )
    seed_torch(ctx.config.run.seed, name, ctx.launch.rank)
    log.info(
        "stage %s: ZeRO-%d, %s, attention %s (%s)%s, VDEP kernel %s, %d rank(s) × micro-batch %d × %d accumulation "
        "= global batch %d; %s (%d warmup), template %s\n%s",
        name, zero_stage(ds_config), ctx.precision, attention.implementation, attention.reason,
        f"; packed rows: {packed_attention(attention)}" if ctx.config.data.packing else "", objective.term.description,
        ctx.launch.world_size, stage.micro_batch_size, grad_accum, stage.global_batch_size, length.describe(), warmup,
        stage.template, format_table(trainable_table(model)),
    )
    return StageParts(
        engine=engine, objective=objective, loader=loader, length=length, schedule=schedule, base_lrs=base_lrs,
        grad_accum=grad_accum,
        # LoRA: the LLM's backward computes input gradients only (the adapters' own are negligible)
        flops=flop_model(model, spec, llm_trainable="language_model" in stage.trainable and stage.lora is None),
        fingerprint=stage_fingerprint(ctx.config, name), resume=resume, elastic=elastic,
    )


def seed_torch(seed: int, stage: str, rank: int) -> None:
    """torch's RNG (what dropout, e.g. LoRA's, draws from) from the run's seed, the stage and the rank, so a
    stage started twice computes the same; a resumed stage then continues its checkpoint's RNG state."""
    torch.manual_seed(int(hashlib.sha256(f"{seed}:{stage}:{rank}".encode()).hexdigest()[:15], 16))


def build_stage_model(ctx: RunContext, name: str, stage: StageConfig, spec: MultimodalSpec, objective: VdepObjective,
                      attention: AttentionChoice, ds_config: dict) -> VdepLlava:
    """Base weights, the stage's starting weights, its adapters (a LoRA stage), then what trains."""
    where = f"stages.{name}.lora"
    check_quantization(stage.lora, zero_stage(ds_config), ctx.device, where)
    model = build_model(
        ctx.config.model, spec, ctx.tokenizer, ctx.base, attention, DTYPES[ctx.precision], objective,
        zero3_config=ds_config if zero_stage(ds_config) == 3 else None, lora=stage.lora,
    )
    load_starting_weights(ctx, name, stage, model)
    if stage.lora is not None:  # on top of the starting weights, as evaluation and export add them
        adapted = add_adapters(model, stage.lora, ctx.config.model.init_seed, where)
        lora = stage.lora
        log.info("stage %s: LoRA r=%d, alpha=%g, dropout=%g on %d LLM layers (%s)%s", name, lora.r, lora.alpha, lora.dropout,
                 len(adapted), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapted})),
                 f"; the LLM's Linear weights in 4 bits ({lora.quantize})" if lora.quantize != "none" else "")
    apply_trainable(model, stage.trainable, stage.lora, where)
    return model


def make_loader(ctx: RunContext, stage: StageConfig, spec: MultimodalSpec, grad_accum_steps: int,
                shards: list[str] | None = None, validation: bool = False) -> StageLoader:
    """The stage's training loader; with `validation`, one over `shards` that reads every sample once, in
    order, one consumer per rank (validation.py)."""
    template = make_template(stage.template, ctx.tokenizer)
    encoder = TemplateTokenizer(ctx.tokenizer, spec.image_token_id, spec.num_image_tokens)
    check_template_tokenizer(template, encoder)
    data = ctx.config.data
    if data.max_length <= spec.num_image_tokens:
        raise DataError(
            f"data.max_length={data.max_length} leaves no room for text after {spec.num_image_tokens} image tokens"
        )
    remote = data.remote
    found = discover_shards(shards or stage.shards, remote)
    batching = Batching(
        micro_batch_size=stage.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        image_size=ctx.image_processing.output_size,
        pixel_table=ctx.image_processing.normalisation_table(),
        packing=data.packing,
        pack_capacity=data.max_length,
        group_by_modality_length=data.group_by_modality_length and not validation,
        group_window=data.group_window,
        image_fraction=image_fraction(found, remote) if data.group_by_modality_length and not validation else 0.5,
        keep_partial=validation,
    )
    return StageLoader.create(
        found,
        SamplePreprocessor(template, encoder, MediaProcessor(spec.geometry, ctx.image_processing), data.max_length),
        batching,
        rank=ctx.launch.rank,
        world_size=ctx.launch.world_size,
        num_workers=0 if validation else data.num_workers,
        grad_accum_steps=grad_accum_steps,
        seed=ctx.config.run.seed,
        split="samples" if validation else data.split,
        shuffle_buffer=0 if validation else data.shuffle_buffer,
        remote=remote,
        pin_memory=ctx.device.type == "cuda",
    )


def load_starting_weights(ctx: RunContext, name: str, stage: StageConfig, model: VdepLlava) -> None:
    """The trained weights the stage starts from (`stages.<name>.init_from`), on top of the base weights,
    through the loader evaluation and export use (model/loading.py); the adapters of a LoRA stage come
    after them (`build_stage_model`), as the loader adds them before a stage's own layer."""
    layers = [SafetensorsLayer(path) for path in stage_weights(ctx.run, ctx.config, name, final=False)]
    loaded = load_layers(model, layers)
    for layer in layers:
        log.info("stage %s: loaded starting weights from %s", name, layer.description)
    for where, skipped in loaded.skipped.items():
        log.info(
            "stage %s: the VDEP head in %s (%s) does not match this stage's vdep.head=%s; it starts afresh",
            name, where, ", ".join(skipped), stage.vdep.head,
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
        vision_tokens_per_view=spec.num_image_tokens,
        projector_params=sum(numel(p) for p in model.multi_modal_projector.parameters()),
        llm_trainable=llm_trainable,
    )
