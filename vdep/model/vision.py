"""The vision tower: which transformers class, which hidden layer, which tokens.

The tower itself is the stock `CLIPVisionModel` / `SiglipVisionModel`, kept as the model's
`vision_tower` attribute so parameter names match transformers' Llava layout. It is always frozen and
runs without autograd.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, SiglipVisionConfig, SiglipVisionModel

from ..config import TinyVisionTowerConfig, VisionTowerConfig
from ..errors import ConfigError

_CLASSES = {
    "clip": (CLIPVisionModel, CLIPVisionConfig),
    "siglip": (SiglipVisionModel, SiglipVisionConfig),
}


def tower_family(folder: str | Path) -> str:
    """'clip' or 'siglip', from the folder's config.json (a full CLIP/SigLIP model or its vision part)."""
    path = Path(folder) / "config.json"
    model_type = json.loads(path.read_text()).get("model_type", "")
    for family in _CLASSES:
        if model_type.startswith(family):
            return family
    raise ConfigError(
        f"{path}: model_type {model_type!r} is not a supported vision tower (CLIP or SigLIP vision models)"
    )


def tower_classes(family: str) -> tuple[type, type]:
    return _CLASSES[family]


def tiny_tower_config(tiny: TinyVisionTowerConfig) -> PretrainedConfig:
    _, config_class = _CLASSES[tiny.architecture]
    return config_class(
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
    )


def config_hidden_size(config: PretrainedConfig) -> int:
    """The hidden size of a vision or text config; a full CLIP/SigLIP config nests its vision part."""
    vision = getattr(config, "vision_config", None)
    return (vision or config).hidden_size


def resolve_feature_select(config: VisionTowerConfig, family: str) -> str:
    if config.feature_select != "auto":
        return config.feature_select
    return "full" if family == "siglip" else "default"


def num_image_tokens(tower_config: PretrainedConfig, family: str, feature_select: str) -> int:
    patches = (tower_config.image_size // tower_config.patch_size) ** 2
    has_cls = family == "clip"
    tokens = patches + (1 if has_cls else 0)
    return tokens - 1 if feature_select == "default" and has_cls else tokens


def check_feature_layer(tower_config: PretrainedConfig, feature_layer: int) -> None:
    # hidden_states holds the embeddings plus one entry per layer.
    count = tower_config.num_hidden_layers + 1
    if not -count <= feature_layer < count:
        raise ConfigError(
            f"model.vision_tower.feature_layer={feature_layer} is out of range for a tower with "
            f"{tower_config.num_hidden_layers} layers (valid: {-count}..{count - 1})"
        )


@torch.no_grad()
def image_features(tower: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int, feature_select: str) -> torch.Tensor:
    """(n, 3, H, W) pixels → (n, N, C) features from the chosen hidden layer, CLS dropped for "default"."""
    outputs = tower(pixel_values, output_hidden_states=True)
    features = outputs.hidden_states[feature_layer]
    return features[:, 1:] if feature_select == "default" else features
