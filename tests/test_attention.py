"""The attention implementation chosen at start, with its reason."""

from __future__ import annotations

import pytest
import torch

from vdep.errors import ConfigError
from vdep.model import attention
from vdep.model.attention import choose_attention, packed_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # choose_attention only looks at the device type


@pytest.mark.parametrize("flash_installed", [False, True])
def test_auto_choices(monkeypatch, flash_installed):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash_installed)
    assert choose_attention("auto", CPU).implementation == "sdpa"
    assert choose_attention("auto", CPU, packing=True).implementation == "sdpa"
    on_gpu_padded = choose_attention("auto", CUDA, packing=False)
    on_gpu_packed = choose_attention("auto", CUDA, packing=True)
    if flash_installed:
        assert on_gpu_padded.implementation == on_gpu_packed.implementation == "flash_attention_2"
    else:
        assert on_gpu_padded.implementation == "sdpa"
        assert on_gpu_packed.implementation == "flex_attention"
        assert "packed" in on_gpu_packed.reason
        assert "FlexAttention block mask" in packed_attention(on_gpu_packed)


def test_the_vision_tower_keeps_sdpa_when_the_language_model_uses_flex():
    choice = choose_attention("flex_attention", CUDA)
    assert (choice.implementation, choice.vision_implementation) == ("flex_attention", "sdpa")
    assert choose_attention("eager", CPU).vision_implementation == "eager"


def test_requests_a_device_cannot_serve_are_refused_with_the_key(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with pytest.raises(ConfigError, match="model.attn_implementation=flex_attention needs a CUDA device"):
        choose_attention("flex_attention", CPU)
    with pytest.raises(ConfigError, match="flash-attn is not installed"):
        choose_attention("flash_attention_2", CUDA)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        choose_attention("flash_attention_2", CPU)
