"""Starting a run from existing multimodal weights (`model.init_from`).

- A Hugging Face Llava folder (an export of vdep, or a published llava-hf model) is split into the run's
  base weights: RUN_DIR/base/vision_tower, RUN_DIR/base/language_model (a causal LM folder) and the
  projector's starting weights. The tokenizer comes from the same folder unless `model.tokenizer` says
  otherwise. From there on the run is like any other.
- An original LLaVA-1.5 `mm_projector.bin` (keys `model.mm_projector.0.weight`, ...) gives the
  projector's starting weights; `model.vision_tower.path` and `model.language_model.path` name the tower
  and the base LLM as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.images import ImageProcessing
from ..errors import ConfigError


def is_llava_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def _save_atomic(tensors: dict[str, torch.Tensor], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, target)


def import_llava_folder(folder: Path, vision_dir: Path, language_dir: Path, projector_file: Path) -> None:
    """Split a Llava checkpoint into a vision tower folder, a causal LM folder and projector weights."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from ..model.build import atomic_folder

    llava = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype="auto")
    inner = getattr(llava, "model", llava)  # transformers 5.x nests the parts under .model
    vision_tower = inner.vision_tower
    with atomic_folder(vision_dir) as out:
        vision_tower.save_pretrained(out)
        processor_config = folder / "preprocessor_config.json"
        if not processor_config.is_file():
            raise ConfigError(f"model.init_from={folder}: no preprocessor_config.json (the image processor) in it")
        settings = json.loads(processor_config.read_text())
        processing = ImageProcessing.from_hf_dict(settings, pad_to_square=bool(settings.get("do_pad", False)))
        family = "siglip" if "siglip" in vision_tower.config.model_type else "clip"
        kind = "SiglipImageProcessor" if family == "siglip" else "CLIPImageProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(processing.to_hf_dict(kind), indent=2))
    text_config = llava.config.text_config
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(text_config)
    weights = {f"model.{name}": tensor for name, tensor in inner.language_model.state_dict().items()}
    weights["lm_head.weight"] = llava.lm_head.weight
    causal_lm.load_state_dict(weights, strict=True, assign=True)
    with atomic_folder(language_dir) as out:
        causal_lm.save_pretrained(out)
    _save_atomic(dict(inner.multi_modal_projector.state_dict()), projector_file)


def projector_from_llava_bin(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's `mm_projector.bin` (Sequential indices 0 and 2, or one Linear) → our projector's names."""
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which and why
        raise ConfigError(f"model.init_from={path}: cannot read it as projector weights ({exc})") from None
    renamed = {}
    for key, tensor in state.items():
        suffix = key.split("mm_projector.", 1)[-1]
        if suffix.startswith("0."):
            renamed["linear_1." + suffix[2:]] = tensor
        elif suffix.startswith("2."):
            renamed["linear_2." + suffix[2:]] = tensor
        elif suffix in ("weight", "bias"):
            renamed["linear_1." + suffix] = tensor
        else:
            raise ConfigError(f"model.init_from={path}: unexpected key {key!r} for an LLaVA mm_projector")
    expected = {"linear_1.weight", "linear_1.bias"} | ({"linear_2.weight", "linear_2.bias"} if kind == "mlp2x_gelu" else set())
    if set(renamed) != expected:
        raise ConfigError(
            f"model.init_from={path}: holds {sorted(renamed)} but model.projector={kind} needs {sorted(expected)}"
        )
    return renamed


def write_projector_init(path: Path, kind: str, target: Path) -> None:
    _save_atomic(projector_from_llava_bin(path, kind), target)
