"""LoRA and QLoRA adapters on the LLM, through peft: the one place that adds them to a model.

A LoRA stage's model is built like any other (base weights, then the results of the stages it starts
from); then `add_adapters` injects peft's LoRA layers into the LLM in place
(`peft.inject_adapter_in_model`: no `PeftModel` wrapper, so every other name stays what it was).
Training, evaluation and export all call it with the stage's settings, so a stage's parameter names
are the same in every process, checkpoint and file:

    language_model.layers.0.self_attn.q_proj.base_layer.weight       the frozen base weight
    language_model.layers.0.self_attn.q_proj.lora_A.default.weight    (r, in), drawn from model.init_seed
    language_model.layers.0.self_attn.q_proj.lora_B.default.weight    (out, r), zeros at the start

`default` is peft's name for a model's only adapter, the one `PeftModel.from_pretrained` loads an
adapter folder into. Adapters are added on top of a stage's starting weights and never loaded as
them: a stage cannot start from a LoRA stage's result (`refuse_adapters`; docs/config.md says why).

QLoRA (`lora.quantize`) loads the LLM's Linear weights in 4 bits (bitsandbytes); the adapters and
everything else stay in the run's precision. The merged export dequantizes the base, so it holds the
model that was trained (`merged_parameters`).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import CheckpointError, ConfigError
from .llava import VdepLlava

ADAPTER = "default"
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def import_peft(where: str) -> ModuleType:
    try:
        import peft
    except ImportError:
        raise ConfigError(f"'{where}' is set, but peft is not installed: pip install 'vdep[lora]'") from None
    return peft


def is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def refuse_adapters(names: list[str], source: str) -> None:
    """A file of LoRA adapters offered as a stage's starting weights: refused, with the way round it."""
    adapters = [name for name in names if is_adapter(name)]
    if adapters:
        raise CheckpointError(
            f"{source} holds LoRA adapters ({adapters[0]}, ...): it is a LoRA stage's result, and vdep cannot start "
            "a stage from adapters. Export it merged (vdep export-hf --checkpoint ... --out EXPORT) and start from "
            "the export (model.init_from=EXPORT)"
        )


# ------------------------------------------------------------------------------------------- targets
def linear_names(language_model: nn.Module) -> list[str]:
    """The leaf names of the LLM's Linear layers (bitsandbytes' 4-bit Linear is one too)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in language_model.named_modules() if isinstance(module, nn.Linear)})


def target_modules(settings: LoraConfig, language_model: nn.Module, where: str) -> list[str]:
    """`lora.target_modules`, or every Linear of the LLM (LLaVA's choice) when it is null."""
    available = linear_names(language_model)
    if settings.target_modules is None:
        return available
    unknown = [name for name in settings.target_modules if name not in available]
    if unknown:
        raise ConfigError(
            f"'{where}.target_modules': {unknown} are not Linear layers of the language model; its Linear layers "
            f"are {available} (null: all of them)"
        )
    return sorted(set(settings.target_modules))


def modules_to_save(model: VdepLlava, settings: LoraConfig, where: str) -> dict[str, nn.Module]:
    """`lora.modules_to_save` by their names in vdep's model: `lm_head`, or LLM modules named by their
    last name components (`embed_tokens`, `norm`, `layers.31.mlp`)."""
    found: dict[str, nn.Module] = {}
    for wanted in settings.modules_to_save:
        if wanted == "lm_head":
            found["lm_head"] = model.lm_head
            continue
        matches = {f"language_model.{name}": module for name, module in model.language_model.named_modules()
                   if name and (name == wanted or name.endswith("." + wanted))}
        if not matches:
            raise ConfigError(
                f"'{where}.modules_to_save': the language model has no module '{wanted}' (lm_head, or an LLM module "
                "such as embed_tokens or norm)"
            )
        found.update(matches)
    return found


# --------------------------------------------------------------------------------------- injecting
def add_adapters(model: VdepLlava, settings: LoraConfig, seed: int, where: str) -> list[str]:
    """Inject the stage's LoRA layers into the LLM; returns the adapted modules' names.

    The A matrices are drawn from `seed` in a forked RNG: every rank and every run starts from the same
    adapters, and the stream that drives dropout and the data is left as it was.
    """
    peft = import_peft(where)
    language_model = model.language_model
    targets = target_modules(settings, language_model, where)
    for name, module in modules_to_save(model, settings, where).items():  # checked now, before anything trains
        if set(linear_names(module)) & set(targets) or name.rsplit(".", 1)[-1] in targets:
            raise ConfigError(
                f"'{where}.modules_to_save': {name} holds layers that get adapters ({sorted(targets)}); a module "
                "trains either in full or through adapters: remove it from one of the two lists"
            )
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, language_model, adapter_name=ADAPTER)
    checkpointed = any(getattr(module, "gradient_checkpointing", False) for module in language_model.modules())
    if checkpointed and not hasattr(language_model, "_require_grads_hook"):
        # Reentrant checkpointing of a block whose inputs need no gradient (frozen embeddings, frozen
        # projector) would give its adapters none; transformers registers this hook itself from 5.x.
        language_model.enable_input_require_grads()
    return sorted(adapter_layers(model))


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def train_adapters(model: VdepLlava, settings: LoraConfig, where: str) -> None:
    """Freeze the LLM and the LM head except the adapters and `modules_to_save`."""
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    for name, param in model.language_model.named_parameters():
        if is_adapter(name):
            param.requires_grad_(True)
    for module in modules_to_save(model, settings, where).values():
        module.requires_grad_(True)


# ----------------------------------------------------------------------------------------- merging
def base_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's frozen weight in floating point (a 4-bit weight dequantized)."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=weight.quant_state)
    return weight.detach()


def merged_parameters(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters with every adapter merged into its base weight, under the names the model
    had before adapters were added; 4-bit weights dequantized. W + (alpha / r)·B·A is computed in fp32
    (peft's `get_delta_weight`) and rounded once to `dtype`. The adapters themselves are left out.
    Unchanged parameters are yielded as themselves (a tied LM head is still recognisable)."""
    layers = adapter_layers(model)
    for name, param in model.named_parameters():
        if is_adapter(name):
            continue
        module_name, _, leaf = name.rpartition(".")
        owner = module_name.removesuffix(".base_layer")
        plain = _plain_name(module_name, leaf)
        if leaf == "weight" and owner in layers:
            layer = layers[owner]
            delta = layer.get_delta_weight(ADAPTER).float()
            yield plain, (base_weight(layer.get_base_layer()).float() + delta).to(dtype)
        elif getattr(param, "quant_state", None) is not None:  # a 4-bit layer without an adapter
            yield plain, base_weight(model.get_submodule(module_name)).to(dtype)
        else:
            yield plain, param


def _plain_name(module_name: str, leaf: str) -> str:
    """A parameter's name without peft's `base_layer` level; a top-level parameter (AnyRes's `image_newline`)
    has no module name to join."""
    owner = module_name.removesuffix(".base_layer")
    return f"{owner}.{leaf}" if owner else leaf


def base_parameters(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `merged_parameters`, without the adapters' contribution: the model the adapters sit on."""
    for name, param in model.named_parameters():
        if is_adapter(name):
            continue
        module_name, _, leaf = name.rpartition(".")
        plain = _plain_name(module_name, leaf)
        if getattr(param, "quant_state", None) is not None:
            yield plain, base_weight(model.get_submodule(module_name)).to(dtype)
        else:
            yield plain, param


def fold_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace each adapted layer's base by a plain Linear holding its merged weight rounded to `dtype`,
    exactly as the merged export writes it, and switch the adapters off: the model of a bf16 or fp16
    merged export, inside vdep (what its parity check compares against)."""
    merged = dict(merged_parameters(model, dtype))
    for owner, layer in adapter_layers(model).items():
        old = layer.get_base_layer()
        folded = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        folded.weight = nn.Parameter(merged[f"{owner}.weight"], requires_grad=False)
        if old.bias is not None:
            folded.bias = old.bias
        layer.base_layer = folded
        layer.enable_adapters(False)


# ---------------------------------------------------------------------------------------------- QLoRA
def quantization_config(settings: LoraConfig | None, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for a QLoRA stage (None: the LLM loads in full precision)."""
    if settings is None or settings.quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_4bit_numerics(language_model: nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes computes a 4-bit layer of a model in inference mode with a
    bf16 kernel of its own (and repacks the weight for it): logits then differ from training's by ~1e-3.
    Turned off, every 4-bit layer computes in its compute dtype in training, evaluation and the export's
    parity check alike."""
    for module in language_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_quantization(settings: LoraConfig | None, zero: int, device: torch.device, where: str) -> None:
    """Refuse QLoRA where it cannot run: under ZeRO-3, without bitsandbytes, or on a device it does not support."""
    if settings is None or settings.quantize == "none":
        return
    if zero == 3:
        raise ConfigError(
            f"'{where}.quantize={settings.quantize}' needs ZeRO-2 (or 0/1): ZeRO-3 partitions every weight into flat "
            "slices and gathers them per module, and bitsandbytes' 4-bit weights are packed bytes whose quantisation "
            "state (per-block scales, shape) lives beside the tensor, which a slice does not carry. Under ZeRO-2 "
            "each rank holds the whole 4-bit base (about 3.6 GiB for a 7B LLM); set the stage's zero to zero2"
        )
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type=settings.quantize)
    except ImportError:
        raise ConfigError(f"'{where}.quantize={settings.quantize}' needs bitsandbytes: pip install 'vdep[qlora]'") from None
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ConfigError(
            f"'{where}.quantize={settings.quantize}': bitsandbytes cannot quantise to 4 bits on {device} ({exc}); "
            f"use {where}.quantize=none (LoRA on the full-precision LLM)"
        ) from None
