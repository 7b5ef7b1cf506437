"""Which parts train in a stage, the table that says so, and the optimizer's parameter groups.

A LoRA stage trains the language model through its adapters: the LLM and the LM head are frozen
except the adapters and `lora.modules_to_save` (model/lora.py), and the table shows the adapters on
a row of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraConfig
from ..model.llava import VdepLlava
from ..model.lora import is_adapter, train_adapters

# Top-level modules of VdepLlava and the stage `trainable` entry that unfreezes each.
PART_OF_MODULE = {
    "vision_tower": None,  # always frozen
    "multi_modal_projector": "projector",
    "vdep_head": "projector",  # trains with the projector, in its LR group
    "image_newline": "projector",  # a Parameter, present with mm_patch_merge_type: spatial_unpad (LLaVA-NeXT trains it with the projector)
    "language_model": "language_model",
    "lm_head": "language_model",
}


def numel(param: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty) and a
    4-bit one (whose tensor holds two weights per byte)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return math.prod(quant_state.shape)
    return int(getattr(param, "ds_numel", param.numel()))


def part_parameters(model: VdepLlava, name: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of a top-level module, or of the top-level parameter `name` (none if the model has none)."""
    part = getattr(model, name)
    if part is None:
        return []
    if isinstance(part, nn.Parameter):
        return [("", part)]
    return list(part.named_parameters())


def apply_trainable(model: VdepLlava, trainable: list[str], lora: LoraConfig | None = None, where: str = "lora") -> None:
    for module_name, part in PART_OF_MODULE.items():
        # A LoRA stage's LLM trains through its adapters only (and a 4-bit weight cannot require a gradient).
        trains = part is not None and part in trainable and not (lora is not None and part == "language_model")
        for _, param in part_parameters(model, module_name):
            param.requires_grad_(trains)
    if lora is not None:
        train_adapters(model, lora, where)


@dataclass(frozen=True)
class ModuleRow:
    module: str
    trainable: int
    frozen: int


def trainable_table(model: VdepLlava) -> list[ModuleRow]:
    """A row per top-level module; a module with LoRA adapters gets a second row for them."""
    rows = []
    for module_name in PART_OF_MODULE:
        params = part_parameters(model, module_name)
        if not params and getattr(model, module_name) is None:
            continue
        for label, selected in ((module_name, [p for n, p in params if not is_adapter(n)]),
                                (f"{module_name} LoRA adapters", [p for n, p in params if is_adapter(n)])):
            if selected or label == module_name:
                trainable = sum(numel(p) for p in selected if p.requires_grad)
                rows.append(ModuleRow(label, trainable, sum(numel(p) for p in selected) - trainable))
    return rows


def format_table(rows: list[ModuleRow]) -> str:
    lines = [f"{'module':<32}{'trainable':>16}{'frozen':>16}"]
    for row in rows:
        lines.append(f"{row.module:<32}{row.trainable:>16,}{row.frozen:>16,}")
    lines.append(f"{'total':<32}{sum(r.trainable for r in rows):>16,}{sum(r.frozen for r in rows):>16,}")
    return "\n".join(lines)


def param_groups(model: VdepLlava, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """Groups by LR (projector and VDEP head vs. the LLM) and by decay (matrices decay; biases, norms don't)."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a tied LM head shares its weight with the input embeddings
    for module_name, part in PART_OF_MODULE.items():
        for _, param in part_parameters(model, module_name):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decays = weight_decay > 0 and len(getattr(param, "ds_shape", param.shape)) >= 2
            groups.setdefault((part, decays), []).append(param)
    result = []
    for (part, decays), params in groups.items():
        group_lr = projector_lr if part == "projector" and projector_lr is not None else lr
        result.append({
            "params": params,
            "lr": group_lr,
            "weight_decay": weight_decay if decays else 0.0,
            "name": part + ("" if decays or weight_decay == 0 else "_no_decay"),
        })
    return result
