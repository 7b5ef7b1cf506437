"""Which parts train in a stage, the table that says so, and the optimizer's parameter groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.llava import VdepLlava

# Top-level modules of VdepLlava and the stage `trainable` entry that unfreezes each.
PART_OF_MODULE = {
    "vision_tower": None,  # always frozen
    "multi_modal_projector": "projector",
    "vdep_head": "projector",  # trains with the projector, in its LR group
    "language_model": "language_model",
    "lm_head": "language_model",
}


def numel(param: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def apply_trainable(model: VdepLlava, trainable: list[str]) -> None:
    for module_name, part in PART_OF_MODULE.items():
        getattr(model, module_name).requires_grad_(part is not None and part in trainable)


@dataclass(frozen=True)
class ModuleRow:
    module: str
    trainable: int
    frozen: int


def trainable_table(model: VdepLlava) -> list[ModuleRow]:
    rows = []
    for module_name in PART_OF_MODULE:
        params = list(getattr(model, module_name).parameters())
        trainable = sum(numel(p) for p in params if p.requires_grad)
        rows.append(ModuleRow(module_name, trainable, sum(numel(p) for p in params) - trainable))
    return rows


def format_table(rows: list[ModuleRow]) -> str:
    lines = [f"{'module':<24}{'trainable':>16}{'frozen':>16}"]
    for row in rows:
        lines.append(f"{row.module:<24}{row.trainable:>16,}{row.frozen:>16,}")
    lines.append(f"{'total':<24}{sum(r.trainable for r in rows):>16,}{sum(r.frozen for r in rows):>16,}")
    return "\n".join(lines)


def param_groups(model: VdepLlava, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    """Groups by LR (projector and VDEP head vs. the LLM) and by decay (matrices decay; biases, norms don't)."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a tied LM head shares its weight with the input embeddings
    for module_name, part in PART_OF_MODULE.items():
        for param in getattr(model, module_name).parameters():
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
