"""DeepSpeed JSON configs: the presets in ds_configs/, and the "auto" values vdep fills in.

When the HF Trainer drives DeepSpeed it replaces "auto" entries; vdep drives DeepSpeed itself and
computes them: batch geometry from the stage, clipping from the stage, precision from the device, and
ZeRO bucket sizes from the LLM's hidden size (the HF Trainer's formulas). The optimizer and LR
schedule come from the stage config, so a DeepSpeed JSON must not define them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def _presets_dir() -> Path:
    """ds_configs/: inside the installed package (a wheel), or at the top of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "ds_configs"
    return installed if installed.is_dir() else package.parent / "ds_configs"


PRESETS_DIR = _presets_dir()


def find_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} does not exist")
        return path
    preset = PRESETS_DIR / f"{name_or_path}.json"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.json")) if PRESETS_DIR.is_dir() else []
        raise ConfigError(
            f"'{name_or_path}' is neither a DeepSpeed JSON file nor a preset in {PRESETS_DIR}"
            + (f"; presets: {', '.join(names)}" if names else "")
        )
    return preset


def load_preset(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = find_preset(name_or_path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(
                f"{path} defines '{key}'; vdep builds the optimizer and LR schedule from the stage config "
                f"(lr, projector_lr, weight_decay, warmup_ratio): remove '{key}' from the JSON"
            )
    return config, path


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        # DeepSpeed's CPU accelerator runs bf16 (slowly, where the CPU has no bf16 units), not fp16.
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("deepspeed.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); on CPU "
                              "use auto, fp32 or bf16")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def fill_config(
    preset: dict[str, Any],
    source: Path,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    hidden_size: int,
) -> dict[str, Any]:
    """The preset with every "auto" replaced; an "auto" vdep cannot compute is an error."""
    config = copy.deepcopy(preset)
    owned = {  # decided by the vdep config; the JSON may say "auto" or agree
        ("train_micro_batch_size_per_gpu",): (micro_batch_size, "stages.<stage>.micro_batch_size"),
        ("gradient_accumulation_steps",): (grad_accum_steps, "global_batch_size / (micro_batch_size × world size)"),
        ("train_batch_size",): (micro_batch_size * grad_accum_steps * world_size, "stages.<stage>.global_batch_size"),
        ("gradient_clipping",): (grad_clip, "stages.<stage>.grad_clip"),
        ("bf16", "enabled"): (precision == "bf16", "deepspeed.precision"),
        ("fp16", "enabled"): (precision == "fp16", "deepspeed.precision"),
    }
    for path, (value, origin) in owned.items():
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        current = node.get(path[-1], "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"{source} sets {'.'.join(path)}={current!r}, but vdep derives it from {origin} "
                f"(here {value!r}); set it to \"auto\" in the JSON"
            )
        node[path[-1]] = value
    if precision == "bf16":
        # A non-finite global gradient norm skips the step (docs/cluster.md); fp32 and ZeRO-3 check it anyway.
        config["bf16"].setdefault("check_grad_overflow", True)
    config.setdefault("steps_per_print", 10**9)  # vdep logs progress itself
    config.setdefault("wall_clock_breakdown", False)
    zero = config.setdefault("zero_optimization", {})
    computed = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in computed.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = _auto_keys(config)
    if leftover:
        raise ConfigError(f"{source}: vdep cannot fill these 'auto' values: {', '.join(leftover)}; set them")
    return config


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
