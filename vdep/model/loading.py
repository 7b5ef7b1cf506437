"""Loading weight layers into a model: the one way trained weights get on top of the base weights.

Training's starting weights (train/setup.py, into ZeRO-3 partitioned parameters), evaluation
(evaluate.py) and export (export/hf.py) all call `load_layers`, and `build_model` loads the projector's
initial weights with `load_layer`, so every path checks the same things:
- every name must be a parameter of the model and have its shape; a LoRA stage's adapters offered to
  a model without them are refused with the way round (`lora.refuse_adapters`);
- objective-only weights (the VDEP head, `OBJECTIVE_ONLY_PREFIXES`) stay behind when the model has no
  place for them (an evaluation, an export, a later stage with another head kind), and are reported;
- a weight that a QLoRA stage holds in 4 bits is refused: its trained value cannot be loaded into it;
- a LoRA stage's adapters are added after what the stage started from and before its own layer, as
  training adds them (train/setup.py), so the names match the stage's files.
Tensors are read and copied one at a time (a ZeRO-3 parameter is gathered for its copy; rank 0's
values are kept).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import CheckpointError
from ..weight_layers import WeightLayer
from .llava import OBJECTIVE_ONLY_PREFIXES
from .lora import add_adapters, is_adapter, refuse_adapters


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


@dataclass(frozen=True)
class StageAdapters:
    """A LoRA stage's adapters: added to the model before the stage's own layer (the last)."""

    settings: LoraConfig
    seed: int  # model.init_seed: the A matrices' starting values, as in training
    where: str  # the settings' key, for messages: stages.<name>.lora


@dataclass
class LoadedLayers:
    # Per layer (its description): the objective-only weights it held that this model has no place for.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # With `keep_replaced`: the values the last layer overwrote in parameters other than adapters, i.e.
    # where the weights a LoRA stage trained in full (the projector) started from (export --adapter).
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)


def load_layers(model: nn.Module, layers: list[WeightLayer], adapters: StageAdapters | None = None,
                keep_replaced: bool = False) -> LoadedLayers:
    """Copy each layer into the model, in order. With `adapters`, the last layer is a LoRA stage's own
    and its adapters are added just before it."""
    loaded = LoadedLayers()
    for index, layer in enumerate(layers):
        own = index == len(layers) - 1
        if own and adapters is not None:
            add_adapters(model, adapters.settings, adapters.seed, adapters.where)  # type: ignore[arg-type]
        skipped = load_layer(model, layer, loaded.replaced if own and keep_replaced else None)
        if skipped:
            loaded.skipped[layer.description] = skipped
    return loaded


def load_layer(model: nn.Module, layer: WeightLayer, replaced: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Copy one layer's tensors into the model's parameters; returns the objective-only names it left
    behind. With `replaced`, the values it overwrites (adapters aside) are kept there first."""
    params = dict(model.named_parameters())
    with layer.open() as reader:
        names = reader.names()
        unknown = [name for name in names if name not in params]
        own_head = {name for name in params if name.startswith(OBJECTIVE_ONLY_PREFIXES)}
        head_in_layer = {name for name in names if name.startswith(OBJECTIVE_ONLY_PREFIXES)}
        left_behind: set[str] = set()
        if head_in_layer and not head_in_layer <= own_head:  # another head kind, or none: all of it stays behind
            left_behind = head_in_layer
            unknown = [name for name in unknown if name not in left_behind]
        if unknown:
            refuse_adapters(unknown, layer.description)
            raise CheckpointError(
                f"{layer.description} holds weights this model does not have: {unknown[:5]}"
                f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}; was it trained with a different "
                "model config (model.*, or another run's base weights)?"
            )
        for name in names:
            if name not in left_behind:
                _copy(params[name], reader.read(name), name, layer.description, replaced)
    return sorted(left_behind)


def _copy(param: torch.Tensor, value: torch.Tensor, name: str, source: str,
          replaced: dict[str, torch.Tensor] | None) -> None:
    if getattr(param, "quant_state", None) is not None:
        raise CheckpointError(
            f"{source} holds '{name}', a weight this QLoRA stage loads in 4 bits from the base LLM; export the "
            "model it belongs to (vdep export-hf) and start from the export (model.init_from=EXPORT)"
        )
    with gathered([param], modifier_rank=0):
        if tuple(param.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: '{name}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}; "
                "was it trained with a different model config?"
            )
        if replaced is not None and not is_adapter(name):
            replaced[name] = param.detach().clone()
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
