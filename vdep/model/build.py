"""Building the multimodal model from a run's base weights.

A run starts from *base weights* (train/base_weights.py writes what a run needs into RUN_DIR/base):
the vision tower and the LLM folders and the projector's initial weights. Every stage, rank and world
size loads the very same tensors from disk, which is what makes single-process, ZeRO-2 and ZeRO-3 runs
comparable and resumes exact. The trained weights on top of them are weight layers
(`vdep.rundir.resolve_model` and `stage_weights` name them) that `loading.load_layers` copies in.

Building runs one way: `model_spec` reads the facts the data path and the objective need (placeholder
id, tokens per image, hidden sizes) from the tokenizer and the base folders' configs, before any weight
is loaded; `build_model` then loads the weights. Under ZeRO-3 the large towers are loaded straight into
partitioned parameters (transformers does this while an `HfDeepSpeedConfig` is alive); the small
projector and VDEP head are built whole and partitioned by the DeepSpeed engine.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from ..config import LoraConfig, ModelConfig, grid_pinpoints, is_anyres
from ..data.anyres import ImageGeometry
from ..data.images import ImageProcessing
from ..errors import ConfigError
from ..objectives.losses import reference_vdep_sum
from ..objectives.objective import VdepObjective, VdepTerm
from ..rundir import BasePaths
from ..weight_layers import SafetensorsLayer
from .attention import AttentionChoice
from .llava import MultimodalSpec, VdepLlava
from .loading import gathered, load_layer
from .lora import keep_4bit_numerics, quantization_config
from .projector import MultiModalProjector
from .tokenizer import image_token_id, padded_vocab_size
from .vision import (
    check_feature_layer,
    config_hidden_size,
    num_image_tokens,
    resolve_feature_select,
    tower_classes,
    tower_family,
)


def model_spec(config: ModelConfig, paths: BasePaths, tokenizer: PreTrainedTokenizerBase) -> MultimodalSpec:
    """What the data path, the objective and DeepSpeed's config need to know of the model, read from
    the tokenizer and the base folders' configs alone (no weights)."""
    family = tower_family(paths.vision_tower)
    vision_config = AutoConfig.from_pretrained(str(paths.vision_tower))
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    check_feature_layer(vision_config, config.vision_tower.feature_layer)
    feature_select = resolve_feature_select(config.vision_tower, family)
    tokens = num_image_tokens(vision_config, family, feature_select)
    return MultimodalSpec(
        image_token_id=image_token_id(tokenizer),
        num_image_tokens=tokens,
        feature_layer=config.vision_tower.feature_layer,
        feature_select=feature_select,
        family=family,
        vision_hidden_size=vision_config.hidden_size,
        text_hidden_size=config_hidden_size(AutoConfig.from_pretrained(str(paths.language_model))),
        geometry=image_geometry(config, vision_config, tokens),
    )


def image_geometry(config: ModelConfig, vision_config: PretrainedConfig, tokens_per_view: int) -> ImageGeometry:
    """The model's image settings against its tower: AnyRes tiles must be whole views of the tower's size, and
    a tile's features a square grid (no CLS token: feature_select `full` on a CLIP tower keeps it)."""
    tile, grid = vision_config.image_size, vision_config.image_size // vision_config.patch_size
    aspect = config.image_aspect_ratio or "pad"
    if not is_anyres(aspect):
        return ImageGeometry(aspect, tile, grid, tokens_per_view)
    if tokens_per_view != grid * grid:
        raise ConfigError(
            f"model.image_aspect_ratio={aspect} lays each tile's {grid}x{grid} patch features out as the image, but "
            f"the tower gives {tokens_per_view} features per view (a CLS token kept by feature_select=full); use "
            "model.vision_tower.feature_select=default or auto"
        )
    pinpoints = grid_pinpoints(config.image_grid_pinpoints, tile)  # type: ignore[arg-type]
    ragged = [p for p in pinpoints if p[0] % tile or p[1] % tile]
    if ragged:
        raise ConfigError(
            f"model.image_grid_pinpoints: {ragged} are not whole tiles of the vision tower's {tile}-pixel views; use "
            f"multiples of {tile}"
        )
    return ImageGeometry(aspect, tile, grid, tokens_per_view, tuple(tuple(p) for p in pinpoints),
                         config.mm_patch_merge_type)


def load_image_processing(paths: BasePaths, pad_to_square: bool) -> ImageProcessing:
    try:
        return ImageProcessing.from_folder(paths.vision_tower, pad_to_square)
    except FileNotFoundError:
        raise ConfigError(
            f"{paths.vision_tower} has no preprocessor_config.json; vdep reproduces the tower's image "
            "processor from it (copy it from the model's Hugging Face repository)"
        ) from None


def resize_embeddings(language_model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the vocabulary to hold the added tokens, padded to a multiple of 64.

    New rows start at the mean of the existing ones (as LLaVA does), deterministically: every rank
    and every stage computes the same values.
    """
    old_rows = language_model.config.vocab_size
    if old_rows >= len(tokenizer):
        return
    language_model.resize_token_embeddings(padded_vocab_size(tokenizer), mean_resizing=False)
    weights = {id(w): w for w in (language_model.get_input_embeddings().weight, language_model.get_output_embeddings().weight)}
    for weight in weights.values():
        with gathered([weight], modifier_rank=0), torch.no_grad():
            weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------- building
# The precisions a model is built in: `run.precision` (training) and `export-hf --dtype`.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(
    config: ModelConfig,
    spec: MultimodalSpec,
    tokenizer: PreTrainedTokenizerBase,
    paths: BasePaths,
    attention: AttentionChoice,
    dtype: torch.dtype,
    objective: VdepObjective | None = None,
    zero3_config: dict | None = None,
    lora: LoraConfig | None = None,
) -> VdepLlava:
    """The model with base weights, on CPU (DeepSpeed moves it); ZeRO-3 loads the towers partitioned.

    `objective` gives the VDEP head and the image term's implementation; without one (inference,
    export) the head is the identity and the term the reference. With a QLoRA stage's `lora` the LLM's
    Linear weights load in 4 bits; adapters are added later, on top of the starting weights
    (`lora.add_adapters`).
    """
    tower_class, _ = tower_classes(spec.family)
    keep_alive = _zero3_context(zero3_config)
    try:
        vision_tower = tower_class.from_pretrained(
            str(paths.vision_tower), dtype=dtype, attn_implementation=attention.vision_implementation
        )
        quantization = quantization_config(lora, dtype)
        causal_lm = AutoModelForCausalLM.from_pretrained(
            str(paths.language_model), dtype=dtype, attn_implementation=attention.implementation,
            **({"quantization_config": quantization} if quantization is not None else {}),
        )
        if quantization is not None:  # what peft reads to wrap 4-bit layers (transformers sets it on the CausalLM only)
            causal_lm.get_decoder().is_loaded_in_4bit = True
            keep_4bit_numerics(causal_lm)
        resize_embeddings(causal_lm, tokenizer)
    finally:
        del keep_alive  # transformers checks ZeRO-3 through this object's lifetime
    projector = MultiModalProjector(spec.vision_hidden_size, spec.text_hidden_size, config.projector)
    load_layer(projector, SafetensorsLayer(paths.projector_init))
    head = objective.make_head(spec.text_hidden_size) if objective is not None else nn.Identity()
    image_newline = None
    if spec.geometry.unpad:
        image_newline = load_file(str(paths.image_newline_init))["image_newline"].to(dtype)
    model = VdepLlava(
        vision_tower=vision_tower,
        multi_modal_projector=projector.to(dtype),
        language_model=causal_lm.get_decoder(),
        lm_head=causal_lm.get_output_embeddings(),
        vdep_head=head.to(dtype),
        spec=spec,
        vdep_term=objective.term if objective is not None else VdepTerm(reference_vdep_sum),
        image_newline=image_newline,
    )
    vision_tower.requires_grad_(False)
    if config.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _zero3_context(zero3_config: dict | None) -> object | None:
    if zero3_config is None:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(zero3_config)
