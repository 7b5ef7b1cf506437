"""Building the multimodal model from local Hugging Face folders.

A run starts from *base weights*: the vision tower and the LLM (local folders, or tiny random-init
models that `materialize_base` writes once into RUN_DIR/base) and the projector's initial weights (also
written once, seeded). Every stage, rank and world size then loads the very same tensors from disk,
which is what makes single-process, ZeRO-2 and ZeRO-3 runs comparable and resumes exact. A stage then
loads the trainable weights of the stages before it (`load_weights`).

Under ZeRO-3 the large towers are loaded straight into partitioned parameters (transformers does this
while an `HfDeepSpeedConfig` is alive); the small projector and VDEP head are built whole and
partitioned by the DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from ..config import ModelConfig, VdepConfig
from ..data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessing
from ..errors import CheckpointError, ConfigError
from ..kernels import pass_through_for, select_vdep_sum
from .attention import AttentionChoice
from .llava import MultimodalSpec, VdepLlava
from .projector import MultiModalProjector, make_vdep_head
from .tokenizer import image_token_id, padded_vocab_size
from .vision import (
    check_feature_layer,
    num_image_tokens,
    resolve_feature_select,
    tiny_tower_config,
    tower_classes,
    tower_family,
)

PROJECTOR_INIT_FILE = "projector_init.safetensors"


@dataclass(frozen=True)
class BasePaths:
    vision_tower: Path
    language_model: Path
    projector_init: Path

    @classmethod
    def for_run(cls, config: ModelConfig, run_dir: Path) -> BasePaths:
        base = run_dir / "base"
        return cls(
            vision_tower=Path(config.vision_tower.path) if config.vision_tower.path else base / "vision_tower",
            language_model=Path(config.language_model.path) if config.language_model.path else base / "language_model",
            projector_init=base / PROJECTOR_INIT_FILE,
        )


# ------------------------------------------------------------------------------------------ base weights
@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Write a folder under a temporary name and rename it into place when complete."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    os.replace(tmp, target)


def materialize_base(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> BasePaths:
    """Write the run's random-init weights once (rank 0 only): tiny towers and the projector init."""
    paths = BasePaths.for_run(config, run_dir)
    if config.init_from is not None:
        from ..export.importer import import_llava_folder, write_projector_init

        source = Path(config.init_from)
        if config.imports_llava_folder():
            if not (paths.vision_tower.is_dir() and paths.language_model.is_dir() and paths.projector_init.is_file()):
                import_llava_folder(source, paths.vision_tower, paths.language_model, paths.projector_init)
        elif not paths.projector_init.is_file():
            write_projector_init(source, config.projector, paths.projector_init)
    with torch.random.fork_rng(devices=[]):
        if config.vision_tower.tiny is not None and not paths.vision_tower.is_dir():
            tiny = config.vision_tower.tiny
            torch.manual_seed(config.init_seed)
            model_class, _ = tower_classes(tiny.architecture)
            tower = model_class(tiny_tower_config(tiny))
            with atomic_folder(paths.vision_tower) as folder:
                tower.save_pretrained(folder)
                processing = tiny_image_processing(tiny.architecture, tiny.image_size)
                (folder / "preprocessor_config.json").write_text(
                    json.dumps(processing.to_hf_dict(_processor_type(tiny.architecture)), indent=2)
                )
        if config.language_model.tiny is not None and not paths.language_model.is_dir():
            tiny = config.language_model.tiny
            torch.manual_seed(config.init_seed + 1)
            lm_config = AutoConfig.for_model(
                tiny.architecture,
                vocab_size=padded_vocab_size(tokenizer),
                hidden_size=tiny.hidden_size,
                intermediate_size=tiny.intermediate_size,
                num_hidden_layers=tiny.num_layers,
                num_attention_heads=tiny.num_heads,
                num_key_value_heads=tiny.num_kv_heads,
                max_position_embeddings=tiny.max_position_embeddings,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            )
            language_model = AutoModelForCausalLM.from_config(lm_config)
            with atomic_folder(paths.language_model) as folder:
                language_model.save_pretrained(folder)
        if not paths.projector_init.is_file():
            torch.manual_seed(config.init_seed + 2)
            vision_hidden = _hidden_size(AutoConfig.from_pretrained(paths.vision_tower))
            text_hidden = _hidden_size(AutoConfig.from_pretrained(paths.language_model))
            projector = MultiModalProjector(vision_hidden, text_hidden, config.projector)
            paths.projector_init.parent.mkdir(parents=True, exist_ok=True)
            tmp = paths.projector_init.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(tmp))
            os.replace(tmp, paths.projector_init)
    return paths


def _processor_type(family: str) -> str:
    return "SiglipImageProcessor" if family == "siglip" else "CLIPImageProcessor"


def tiny_image_processing(family: str, image_size: int) -> ImageProcessing:
    if family == "siglip":
        return ImageProcessing(None, (image_size, image_size), None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return ImageProcessing(image_size, None, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _hidden_size(config) -> int:
    # A full CLIP/SigLIP config nests the vision part; a vision-only or text config does not.
    vision = getattr(config, "vision_config", None)
    return (vision or config).hidden_size


def load_image_processing(paths: BasePaths, pad_to_square: bool) -> ImageProcessing:
    try:
        return ImageProcessing.from_folder(paths.vision_tower, pad_to_square)
    except FileNotFoundError:
        raise ConfigError(
            f"{paths.vision_tower} has no preprocessor_config.json; vdep reproduces the tower's image "
            "processor from it (copy it from the model's Hugging Face repository)"
        ) from None


# ----------------------------------------------------------------------------------------- partitioning
def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Full parameters inside the block under ZeRO-3 (writes from `modifier_rank` are kept); no-op otherwise."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


# The VDEP head belongs to a stage's objective, not to the multimodal model: a later stage (or an
# evaluation) that has no head, or a different kind, starts without it rather than failing.
OBJECTIVE_ONLY_PREFIXES = ("vdep_head.",)


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy named tensors into the model's parameters (partitioned ones one at a time).

    Returns the names of objective-only weights (a VDEP head) that this model has no place for and
    that were therefore not loaded; any other unknown name is an error.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    own_head = {name for name in params if name.startswith(OBJECTIVE_ONLY_PREFIXES)}
    head_in_file = {name for name in tensors if name.startswith(OBJECTIVE_ONLY_PREFIXES)}
    skipped = []
    if head_in_file and not head_in_file <= own_head:  # another head kind, or none: all of it stays behind
        skipped = sorted(head_in_file)
        tensors = {name: value for name, value in tensors.items() if name not in head_in_file}
        unknown = [name for name in unknown if name not in head_in_file]
    if unknown:
        raise CheckpointError(f"{source} holds weights this model does not have: {unknown[:5]}")
    for name, value in tensors.items():
        param = params[name]
        with gathered([param], modifier_rank=0):
            if tuple(param.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: '{name}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}; "
                    "was it trained with a different model config?"
                )
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
    return skipped


def load_weights_file(model: nn.Module, path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return load_weights(model, load_file(str(path)), str(path))


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
@dataclass
class BuiltModel:
    model: VdepLlava
    spec: MultimodalSpec
    family: str
    kernel: str


def build_model(
    config: ModelConfig,
    vdep: VdepConfig,
    tokenizer: PreTrainedTokenizerBase,
    paths: BasePaths,
    attention: AttentionChoice,
    dtype: torch.dtype,
    device: torch.device,
    zero3_config: dict | None = None,
) -> BuiltModel:
    """The model with base weights, on CPU (DeepSpeed moves it). ZeRO-3 loads the towers partitioned."""
    family = tower_family(paths.vision_tower)
    tower_class, _ = tower_classes(family)
    keep_alive = _zero3_context(zero3_config)
    try:
        vision_tower = tower_class.from_pretrained(
            str(paths.vision_tower), dtype=dtype, attn_implementation=attention.vision_implementation
        )
        causal_lm = AutoModelForCausalLM.from_pretrained(
            str(paths.language_model), dtype=dtype, attn_implementation=attention.implementation
        )
        resize_embeddings(causal_lm, tokenizer)
    finally:
        del keep_alive  # transformers checks ZeRO-3 through this object's lifetime
    feature_select = resolve_feature_select(config.vision_tower, family)
    check_feature_layer(vision_tower.config, config.vision_tower.feature_layer)
    text_hidden = causal_lm.config.hidden_size
    projector = MultiModalProjector(vision_tower.config.hidden_size, text_hidden, config.projector)
    load_weights_file(projector, paths.projector_init)
    vdep_sum, kernel = select_vdep_sum(vdep.kernel, device, vdep.head)
    pass_through = pass_through_for(vdep_sum, vdep.head)
    if pass_through is not None:
        kernel += ", its gradient added into the text loss's"
    spec = MultimodalSpec(
        image_token_id=image_token_id(tokenizer),
        num_image_tokens=num_image_tokens(vision_tower.config, family, feature_select),
        feature_layer=config.vision_tower.feature_layer,
        feature_select=feature_select,
        target_norm=vdep.target_norm,
        detach_target=vdep.detach_target,
    )
    model = VdepLlava(
        vision_tower=vision_tower,
        multi_modal_projector=projector.to(dtype),
        language_model=causal_lm.get_decoder(),
        lm_head=causal_lm.get_output_embeddings(),
        vdep_head=make_vdep_head(vdep.head, text_hidden).to(dtype),
        spec=spec,
        vdep_sum=vdep_sum,
        vdep_pass_through=pass_through,
    )
    vision_tower.requires_grad_(False)
    if config.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return BuiltModel(model=model, spec=spec, family=family, kernel=kernel)


def _zero3_context(zero3_config: dict | None) -> object | None:
    if zero3_config is None:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(zero3_config)
