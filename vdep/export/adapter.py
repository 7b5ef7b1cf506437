"""`vdep export-hf --adapter`: a LoRA stage's adapters as a PEFT adapter folder.

The folder is written by peft itself: `get_peft_model` wraps a `LlavaForConditionalGeneration` built
on the meta device (no memory for the base weights), with the stage's rank, alpha and dropout, its
adapted modules (the same LLM Linear layers, by transformers' module names) and, as
`modules_to_save`, the modules the stage trained in full (the projector, `lora.modules_to_save`);
vdep's tensors are assigned to the wrapper's parameters, matched by name through the Llava layout,
and `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors`. So

    base = LlavaForConditionalGeneration.from_pretrained(OUT)
    model = PeftModel.from_pretrained(base, OUT / "adapter")

is the trained model, where OUT holds the model the stage started from (export/hf.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..config import LoraConfig
from ..errors import CheckpointError
from ..model.llava import VdepLlava
from ..model.lora import ADAPTER, adapter_layers, import_peft, modules_to_save
from .layout import from_hf_name, to_hf_module_name

ADAPTER_FOLDER = "adapter"


def saved_modules(model: VdepLlava, settings: LoraConfig, projector_trained: bool, where: str) -> list[str]:
    """transformers' names of the modules the stage trained in full: `modules_to_save` in peft's terms."""
    names = ["multi_modal_projector"] if projector_trained else []
    names += sorted(modules_to_save(model, settings, where))
    return [to_hf_module_name(name) for name in names]


def target_pattern(model: VdepLlava) -> str:
    """A regular expression (peft matches it against whole module names) for the adapted LLM layers."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapter_layers(model)})
    prefix = re.escape(to_hf_module_name("language_model") + ".")
    return rf"{prefix}.*\.({'|'.join(map(re.escape, leaves))})"


def write_adapter(model: VdepLlava, settings: LoraConfig, config: LlavaConfig, saved: list[str], folder: Path,
                  dtype: torch.dtype) -> None:
    peft = import_peft("lora")
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    peft_config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                  target_modules=target_pattern(model), modules_to_save=saved or None, bias="none")
    wrapped = peft.get_peft_model(skeleton, peft_config, adapter_name=ADAPTER)
    ours = dict(model.named_parameters())
    values = {}
    for name, param in wrapped.named_parameters():
        if not param.requires_grad:  # the base model's weights: not part of the adapter
            continue
        hf_name = name.removeprefix("base_model.model.").replace(f".modules_to_save.{ADAPTER}.", ".")
        vdep_name = from_hf_name(hf_name)
        if vdep_name not in ours or tuple(ours[vdep_name].shape) != tuple(param.shape):
            raise CheckpointError(f"the adapter's '{name}' has no counterpart in vdep's model ('{vdep_name}')")
        values[name] = ours[vdep_name].detach().to("cpu", dtype, copy=True).contiguous()
    wrapped.load_state_dict(values, strict=False, assign=True)
    wrapped.peft_config[ADAPTER].base_model_name_or_path = None  # no machine-local path travels with the export
    wrapped.save_pretrained(str(folder))


def adapter_card(stage: str, settings: LoraConfig) -> str:
    """The export's README section for an adapter export: what OUT/ and OUT/adapter hold, and how to load them."""
    return "\n".join([
        "## LoRA adapter",
        "",
        (f"The weights in this folder are the model the `{stage}` stage started from; its LoRA adapters (r={settings.r}, "
         f"alpha={settings.alpha:g}{', on a ' + settings.quantize + ' base' if settings.quantize != 'none' else ''}) "
         f"and the modules it trained in full are the PEFT adapter in `{ADAPTER_FOLDER}/`:"),
        "",
        "```python",
        "from peft import PeftModel",
        "base = LlavaForConditionalGeneration.from_pretrained(PATH)",
        f'model = PeftModel.from_pretrained(base, PATH + "/{ADAPTER_FOLDER}")',
        "```",
        "",
    ])
