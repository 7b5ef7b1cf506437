"""A run's base weights, written once into RUN_DIR/base by run preparation (rank 0).

Every stage, rank and world size then loads the very same tensors from disk, which is what makes
single-process, ZeRO-2 and ZeRO-3 runs comparable and resumes exact. What is written depends on
where the model comes from:

- tiny random-init towers (tests, the demo): seeded, saved as Hugging Face folders;
- `model.init_from` = a Hugging Face Llava, LlavaNext or LlavaOnevision folder (a vdep export or a published
  llava-hf model): split into a vision tower folder, a causal LM folder, the projector's starting weights and
  (LlavaNext, LlavaOnevision) `image_newline`'s; from there on the run is like any other;
- `model.init_from` = LLaVA-1.5's `mm_projector.bin` (keys `model.mm_projector.0.weight`, ...): the
  projector's starting weights (the towers come from `model.*.path` as usual);
- otherwise the projector's initial weights, seeded.

What base/ and tokenizer/ were made from is stamped in base/built_from.json (`BaseStamp`): the model
settings that decide them (where the towers, the tokenizer and an imported folder come from, the tiny
sizes, `model.init_seed`, the projector). A run directory whose stamp differs from the config is rebuilt
when nothing was trained in it yet; once a stage has a checkpoint, a model change is refused before this
point (prepare.check_resume_changes), so trained weights never meet other base weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from ..atomic import atomic_folder, atomic_path, atomic_write
from ..config import ModelConfig, TinyLanguageModelConfig, TinyVisionTowerConfig, grid_pinpoints, is_anyres
from ..data.images import ImageProcessing
from ..errors import CheckpointError, ConfigError
from ..log import get_logger
from ..model.projector import MultiModalProjector
from ..model.tokenizer import load_tokenizer, padded_vocab_size, prepare_tokenizer
from ..model.vision import config_hidden_size, tiny_tower_config, tower_classes
from ..rundir import BasePaths, RunDir
from ..structured import unstructure

log = get_logger("run")


STAMP_FILE = "built_from.json"


@dataclass(frozen=True)
class BaseStamp:
    """What a run's base/ and tokenizer/ folders were built from (the settings that decide their contents)."""

    settings: dict

    @classmethod
    def of(cls, config: ModelConfig) -> BaseStamp:
        model = unstructure(config)
        # How the model runs or reads its images, not its weights (image_newline's starting value is a file of
        # its own, written when a run first needs it: materialize_base).
        for key in ("attn_implementation", "gradient_checkpointing", "image_aspect_ratio", "image_grid_pinpoints",
                    "mm_patch_merge_type"):
            model.pop(key, None)
        model["vision_tower"].pop("feature_select", None)  # which features are read, not which weights exist
        model["vision_tower"].pop("feature_layer", None)
        model["tokenizer_source"] = config.tokenizer_source()
        return cls(model)

    @staticmethod
    def read(base: Path) -> BaseStamp | None:
        path = base / STAMP_FILE
        return BaseStamp(json.loads(path.read_text())) if path.is_file() else None

    def write(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        atomic_write(base / STAMP_FILE, json.dumps(self.settings, indent=1, sort_keys=True))

    def differences(self, other: BaseStamp) -> list[str]:
        return sorted(key for key in set(self.settings) | set(other.settings)
                      if self.settings.get(key) != other.settings.get(key))


def prepare_base(config: ModelConfig, run: RunDir, trained: bool) -> None:
    """Rank 0: the run's tokenizer/ and base/, built from `config` (again, when they were built from other
    settings and nothing is `trained` in the run yet)."""
    wanted = BaseStamp.of(config)
    existing = BaseStamp.read(run.base)
    built = run.base.exists() or run.tokenizer.exists()
    if built and existing is not None and existing != wanted:
        if trained:  # prepare.check_resume_changes refuses this first; kept as the last line of defence
            raise CheckpointError(
                f"{run.base} was built from other model settings ({', '.join(existing.differences(wanted))}) than the "
                "config's, and the run has trained stages; use a new run.name"
            )
        log.info("run directory %s: base weights and tokenizer were built from other settings (%s); building them "
                 "again", run.path, ", ".join(existing.differences(wanted)))
        shutil.rmtree(run.base, ignore_errors=True)
        shutil.rmtree(run.tokenizer, ignore_errors=True)
    elif built and existing is None and not trained:  # made before vdep stamped them: cannot be trusted
        log.info("run directory %s: base weights without %s; building them again", run.path, STAMP_FILE)
        shutil.rmtree(run.base, ignore_errors=True)
        shutil.rmtree(run.tokenizer, ignore_errors=True)
    if not run.tokenizer.is_dir():
        tokenizer = prepare_tokenizer(config.tokenizer_source())  # type: ignore[arg-type]
        with atomic_folder(run.tokenizer) as folder:
            tokenizer.save_pretrained(str(folder))
    materialize_base(config, load_tokenizer(run.tokenizer), run.base_paths(config))
    if existing != wanted:
        wanted.write(run.base)


def materialize_base(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, paths: BasePaths) -> BasePaths:
    """Write whatever of the base weights does not exist yet (rank 0 only); returns `paths`."""
    if config.init_from is not None:
        source = Path(config.init_from)
        if config.imports_llava_folder():
            if not (paths.vision_tower.is_dir() and paths.language_model.is_dir() and paths.projector_init.is_file()):
                import_llava_folder(source, paths, config)
        elif not paths.projector_init.is_file():
            save_tensors(projector_from_llava_bin(source, config.projector), paths.projector_init)
    with torch.random.fork_rng(devices=[]):
        if config.vision_tower.tiny is not None and not paths.vision_tower.is_dir():
            torch.manual_seed(config.init_seed)
            write_tiny_tower(config.vision_tower.tiny, paths.vision_tower)
        if config.language_model.tiny is not None and not paths.language_model.is_dir():
            torch.manual_seed(config.init_seed + 1)
            write_tiny_language_model(config.language_model.tiny, tokenizer, paths.language_model)
        if not paths.projector_init.is_file():
            torch.manual_seed(config.init_seed + 2)
            projector = MultiModalProjector(
                config_hidden_size(AutoConfig.from_pretrained(paths.vision_tower)),
                config_hidden_size(AutoConfig.from_pretrained(paths.language_model)),
                config.projector,
            )
            save_tensors(dict(projector.state_dict()), paths.projector_init)
        if config.mm_patch_merge_type == "spatial_unpad" and not paths.image_newline_init.is_file():
            # As LlavaNextModel initialises it: N(0, 1/D). Its own file, written when a run first needs it, so
            # that base/ of a run without it stays as it was.
            torch.manual_seed(config.init_seed + 3)
            hidden = config_hidden_size(AutoConfig.from_pretrained(paths.language_model))
            save_tensors({"image_newline": torch.randn(hidden) / hidden**0.5}, paths.image_newline_init)
    return paths


def save_tensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    with atomic_path(target) as temporary:
        save_file({name: value.contiguous() for name, value in tensors.items()}, str(temporary))


def write_tiny_tower(tiny: TinyVisionTowerConfig, folder: Path) -> None:
    model_class, _ = tower_classes(tiny.architecture)
    tower = model_class(tiny_tower_config(tiny))
    with atomic_folder(folder) as out:
        tower.save_pretrained(out)
        processing = ImageProcessing.tiny(tiny.architecture, tiny.image_size)
        (out / "preprocessor_config.json").write_text(json.dumps(processing.to_hf_dict(tiny.architecture), indent=2))


def write_tiny_language_model(tiny: TinyLanguageModelConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    config = AutoConfig.for_model(
        tiny.architecture,
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with atomic_folder(folder) as out:
        AutoModelForCausalLM.from_config(config).save_pretrained(out)


# ---------------------------------------------------------------------------------- from other formats
def import_llava_folder(folder: Path, paths: BasePaths, config: ModelConfig) -> None:
    """Split a Llava, LlavaNext or LlavaOnevision checkpoint into a vision tower folder, a causal LM folder, the
    projector's starting weights and (LlavaNext, LlavaOnevision) `image_newline`'s starting value."""
    from transformers import AutoModelForImageTextToText

    settings = image_processor_settings(folder)
    llava = AutoModelForImageTextToText.from_pretrained(str(folder), dtype="auto")
    inner = getattr(llava, "model", llava)  # transformers 5.x nests the parts under .model
    image_newline = getattr(inner, "image_newline", None)
    check_imported_layout(folder, llava.config, config)
    vision_tower = inner.vision_tower
    with atomic_folder(paths.vision_tower) as out:
        vision_tower.save_pretrained(out)
        processing = ImageProcessing.from_hf_dict(settings, pad_to_square=bool(settings.get("do_pad", False)))
        family = "siglip" if "siglip" in vision_tower.config.model_type else "clip"
        (out / "preprocessor_config.json").write_text(json.dumps(processing.to_hf_dict(family), indent=2))
    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(llava.config.text_config)
    weights = {f"model.{name}": tensor for name, tensor in inner.language_model.state_dict().items()}
    weights["lm_head.weight"] = llava.lm_head.weight
    causal_lm.load_state_dict(weights, strict=True, assign=True)
    with atomic_folder(paths.language_model) as out:
        causal_lm.save_pretrained(out)
    save_tensors(dict(inner.multi_modal_projector.state_dict()), paths.projector_init)
    if image_newline is not None and config.mm_patch_merge_type == "spatial_unpad":
        save_tensors({"image_newline": image_newline.detach()}, paths.image_newline_init)


def check_imported_layout(folder: Path, imported, config: ModelConfig) -> None:
    """A LlavaNext/LlavaOnevision folder imported into a run whose images are not laid out its way: refused when
    its trained `image_newline` would be dropped (a run without tiles, or a flat merge); a warning when the run
    tiles with another rule or grid (a deliberate change, e.g. fine-tuning on another grid)."""
    model_type = imported.model_type
    if model_type not in ("llava_next", "llava_onevision"):
        return
    folder_aspect = getattr(imported, "vision_aspect_ratio", None) or "anyres"
    if config.mm_patch_merge_type != "spatial_unpad" or not is_anyres(config.image_aspect_ratio or "pad"):
        raise ConfigError(
            f"model.init_from={folder}: a {type(imported).__name__.removesuffix('Config')} folder tiles its images "
            f"and holds a trained image_newline, but the run has model.image_aspect_ratio={config.image_aspect_ratio} "
            f"and model.mm_patch_merge_type={config.mm_patch_merge_type}; set model.image_aspect_ratio={folder_aspect}, "
            f"model.mm_patch_merge_type=spatial_unpad and model.image_grid_pinpoints={imported.image_grid_pinpoints}"
        )
    tile = imported.vision_config.image_size
    ours = grid_pinpoints(config.image_grid_pinpoints, tile)  # type: ignore[arg-type]
    theirs = [list(p) for p in imported.image_grid_pinpoints]
    if config.image_aspect_ratio != folder_aspect or [list(p) for p in ours] != theirs:
        log.warning("model.init_from=%s was trained with image_aspect_ratio %s and grid pinpoints %s; this run uses %s "
                    "and %s", folder, folder_aspect, theirs, config.image_aspect_ratio, ours)


def image_processor_settings(folder: Path) -> dict:
    """A Llava folder's image processor settings: its `preprocessor_config.json`, or else the `image_processor`
    entry of its `processor_config.json`, where transformers 5 puts them when a processor is saved as one
    file (what LLaMA-Factory 0.9.5's results hold)."""
    separate = folder / "preprocessor_config.json"
    if separate.is_file():
        return json.loads(separate.read_text())
    combined = folder / "processor_config.json"
    settings = json.loads(combined.read_text()).get("image_processor") if combined.is_file() else None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"model.init_from={folder}: no image processor settings in it (neither a preprocessor_config.json nor an "
            "image_processor entry in processor_config.json); save the model's processor into the folder"
        )
    return settings


def projector_from_llava_bin(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's `mm_projector.bin` (Sequential indices 0 and 2, or one Linear) → our projector's names."""
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a corrupt or foreign file, whatever the reader raises: say which and why)
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
