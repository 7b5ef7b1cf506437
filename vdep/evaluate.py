"""A run's model rebuilt from its files, in one process without DeepSpeed: for evaluation and export.

`build_trained_model` builds the model a `rundir.ModelSource` describes: the run's tokenizer and base
weights, then the source's weight layers (`model.loading.load_layers`, a LoRA stage's adapters before
its own layer). `vdep eval`, `vdep attention-map`, the demo and `vdep export-hf` all build through it,
so evaluating a path and exporting it see one model. `load_trained_model` resolves a path first
(`rundir.resolve_model`: a run directory, a stage folder, a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .data.images import ImageProcessing
from .errors import CheckpointError
from .model.attention import AttentionChoice
from .model.build import build_model, load_image_processing, model_spec
from .model.llava import MultimodalSpec, VdepLlava
from .model.loading import StageAdapters, load_layers
from .model.tokenizer import load_tokenizer
from .rundir import FINAL_WEIGHTS, ModelSource, model_template, resolve_model


@dataclass
class TrainedModel:
    model: VdepLlava
    tokenizer: object
    spec: MultimodalSpec
    image_processing: ImageProcessing
    config: TrainConfig
    stage: str | None  # the stage whose model this is (None: the base weights)
    source: ModelSource | None = None  # the files it was built from (None: a model still training, validation.py)
    # With `keep_replaced`: what the LoRA stage's own layer overwrote outside the adapters (export --adapter).
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def template(self) -> str:
        """The stage's conversation template; for the base weights the recipe's last stage's (`rundir.model_template`)."""
        return model_template(self.config, self.stage)


def build_trained_model(source: ModelSource, dtype: torch.dtype = torch.float32,
                        attention: AttentionChoice | None = None, keep_replaced: bool = False) -> TrainedModel:
    """The model `source` describes, on the CPU, in `dtype`. Without an objective: the VDEP head, a
    training device, is not built, and a layer's head weights stay behind."""
    run, config = source.run, source.config
    tokenizer = load_tokenizer(run.tokenizer)
    base = run.base_paths(config.model)
    spec = model_spec(config.model, base, tokenizer)
    model = build_model(config.model, spec, tokenizer, base, attention or AttentionChoice("sdpa", "evaluation"), dtype,
                        lora=source.lora)
    adapters = None
    if source.lora is not None:
        adapters = StageAdapters(source.lora, config.model.init_seed, f"stages.{source.stage}.lora")
    loaded = load_layers(model, list(source.layers), adapters, keep_replaced)
    image_processing = load_image_processing(base, config.model.image_aspect_ratio == "pad")
    return TrainedModel(model, tokenizer, spec, image_processing, config, source.stage, source, loaded.replaced)


def load_trained_model(path: Path, device: torch.device | None = None, *, allow_base: bool = False,
                       attention: str = "sdpa") -> TrainedModel:
    """The model `path` stands for (`rundir.resolve_model`), in fp32, in evaluation mode: the model the
    exporter writes from the same path. With `allow_base`, a run with no trained stage gives its base
    weights (in the chat format of the recipe's last stage, as its export does). `attention`: the LLM's
    attn_implementation (`eager` returns attention weights, for `vdep attention-map`)."""
    source = resolve_model(path)
    if source.stage is None and not allow_base:
        raise CheckpointError(f"{source.run.path} has no completed stage (no */final/{FINAL_WEIGHTS}); pass a stage's "
                              "checkpoints folder to use a checkpoint")
    trained = build_trained_model(source, torch.float32, AttentionChoice(attention, "evaluation"))
    trained.model.to(device or torch.device("cpu")).eval()
    return trained
