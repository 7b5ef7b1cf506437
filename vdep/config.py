"""The training configuration: typed dataclasses, recipe loading, `key=value` overrides, validation.

A recipe is a YAML file (or the name of one shipped in `vdep/recipes/`). Loading applies command-line
overrides to the parsed YAML, then builds the dataclasses below, so an override is checked exactly like
a key in the file. Defaults that belong to a published recipe (learning rates, batch sizes, the ZeRO
stage) are not defaults here: they live in the recipe YAML, the single place that states them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .data.remote import RemoteSettings, check_storage_options, is_remote
from .errors import ConfigError
from .structured import Source, closest_key, dotted_keys, set_dotted, structure, unstructure

# The LLaVA-1.5 recipe's two stages. A recipe may list any stages, in the order they run (docs/config.md).
LLAVA_STAGES: tuple[str, ...] = ("align", "finetune")
# A stage's folder sits beside these in the run directory (vdep/rundir.py); `all` means every stage.
RESERVED_STAGE_NAMES: tuple[str, ...] = ("all", "base", "logs", "tensorboard", "tokenizer", "config", "validation")
STAGE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
TRAINABLE_PARTS: tuple[str, ...] = ("projector", "language_model")
RECIPES_DIR = Path(__file__).parent / "recipes"
# Names users bring from the HF Trainer and LLaVA's scripts → ours (for "did you mean" hints).
KEY_ALIASES = {
    "learning_rate": "lr",
    "mm_projector_lr": "projector_lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "global_batch_size",
    "train_batch_size": "global_batch_size",
    "max_grad_norm": "grad_clip",
    "gradient_clipping": "grad_clip",
    "model_max_length": "max_length",
    "mm_vision_select_layer": "feature_layer",
    "mm_projector_type": "projector",
    "dataloader_num_workers": "num_workers",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_last",
}


# ----------------------------------------------------------------------------------------------- model
@dataclass
class TinyVisionTowerConfig:
    """Sizes of a randomly initialised vision tower (tests, the demo)."""

    architecture: Literal["clip", "siglip"] = "clip"
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 128
    image_size: int = 64
    patch_size: int = 8


@dataclass
class VisionTowerConfig:
    """A CLIP or SigLIP vision encoder: a local Hugging Face folder, or tiny random-init sizes."""

    path: str | None = None
    tiny: TinyVisionTowerConfig | None = None
    # Which hidden layer feeds the projector (LLaVA-1.5: the penultimate one).
    feature_layer: int = -2
    # "default" drops the CLS token (CLIP, as LLaVA-1.5); "full" keeps every token. "auto" picks
    # "default" for towers with a CLS token and "full" for SigLIP, which has none.
    feature_select: Literal["auto", "default", "full"] = "auto"


@dataclass
class TinyLanguageModelConfig:
    """Sizes of a randomly initialised decoder LLM (tests, the demo)."""

    architecture: Literal["llama", "qwen2", "mistral"] = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 1024


@dataclass
class LanguageModelConfig:
    """The decoder LLM: a local Hugging Face folder (AutoModelForCausalLM), or tiny random-init sizes."""

    path: str | None = None
    tiny: TinyLanguageModelConfig | None = None


@dataclass
class ModelConfig:
    vision_tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    # Tokenizer folder; defaults to the language model's folder.
    tokenizer: str | None = None
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    # auto: flash-attn on CUDA when installed; else FlexAttention for packed rows on CUDA; else SDPA.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    gradient_checkpointing: bool = False
    # Seed for every randomly initialised weight (tiny towers, the projector).
    init_seed: int = 0
    # Start from existing weights: a Hugging Face Llava folder (then leave vision_tower/language_model
    # unset), or an original LLaVA-1.5 mm_projector.bin for the projector. See docs/export.md.
    init_from: str | None = None
    # How an image becomes the tower's inputs, with LLaVA-NeXT's names (docs/config.md, "Images"): `pad`
    # (LLaVA-1.5: padded to a square of the mean colour), `square` (the tower's processor alone), `anyres`
    # (LLaVA-NeXT's tiles), `anyres_max_N` (OneVision's: the tiles' features pooled beyond N tiles). null:
    # what the older key data.pad_to_square says, else `pad`; loading fills it in (`resolve_image_aspect_ratio`).
    image_aspect_ratio: str | None = None
    # AnyRes's candidate resolutions: [[height, width], ...] in pixels, or LLaVA-NeXT's range form
    # "(1x1),...,(6x6)" in tiles of the tower's image size. Only with anyres/anyres_max_N.
    image_grid_pinpoints: list[list[int]] | str | None = None
    # `flat`: an image's tokens are its views' features one after the other (LLaVA-1.5; LLaVA-NeXT's flat);
    # `spatial_unpad`: tiles laid out as the image, padding removed, a learned `image_newline` ending each row.
    mm_patch_merge_type: Literal["flat", "spatial_unpad"] = "flat"

    def tokenizer_source(self) -> str | None:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.init_from is not None and Path(self.init_from).is_dir():
            return self.init_from
        return self.language_model.path

    def imports_llava_folder(self) -> bool:
        return self.init_from is not None and Path(self.init_from).is_dir()


# ------------------------------------------------------------------------------------------------ data
@dataclass
class DataConfig:
    # The older spelling of model.image_aspect_ratio pad (true) / square (false); loading fills it in from
    # that key (null under anyres), and a value that contradicts it is refused.
    pad_to_square: bool | None = None
    max_length: int = 2048
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # How the shards of an epoch are divided among ranks and loader workers: "shards" gives each
    # consumer whole shards (needs at least as many shards as consumers); "samples" makes every
    # consumer read every shard and keep every k-th sample; "auto" picks "shards" when possible.
    # "resample": each consumer draws shards with replacement until it has its share (docs/data.md).
    split: Literal["auto", "shards", "samples", "resample"] = "auto"
    # Put several samples in one row (up to max_length tokens), attention confined to each sample.
    # A micro-batch keeps micro_batch_size samples; only the number of rows and padding shrink.
    packing: bool = False
    # LLaVA's group_by_modality_length: within a window of `group_window` micro-batches, micro-batches
    # hold samples of one modality and similar length.
    group_by_modality_length: bool = False
    group_window: int = 32
    # Reading shards from https://, s3:// or gs:// prefixes (data/remote.py; docs/data.md, "Remote shards").
    remote: RemoteSettings = field(default_factory=RemoteSettings)


# ------------------------------------------------------------------------------------------------ vdep
@dataclass
class VdepConfig:
    """The VDEP objective's knobs (docs/vdep.md). Settable for both stages and per stage."""

    enabled: bool = True
    alpha: float = 1.0
    mode_ratio: float = 0.5
    text_loss_in_vdep_mode: bool = False
    layout: Literal["image_first", "text_first"] = "image_first"
    detach_target: bool = True
    # Not in the paper's text (docs/vdep.md): VDEP-mode samples feed stop-gradient image embeddings
    # into the LLM, so the image term cannot train the projector to make its outputs predictable.
    detach_input: bool = False
    head: Literal["identity", "linear"] = "identity"
    target_norm: Literal["none", "layernorm", "l2"] = "none"
    skip_first_image_token: bool = False
    kernel: Literal["auto", "fused", "reference"] = "auto"


# ------------------------------------------------------------------------------------------------ lora
@dataclass
class LoraConfig:
    """Low-rank adapters (peft's LoRA) on the LLM: the stage trains the language model through them
    instead of in full (vdep/model/lora.py, docs/config.md). The projector still trains in full, the
    vision tower stays frozen. Rank and alpha belong to a recipe, so they have no default here."""

    r: int
    alpha: float
    dropout: float = 0.0
    # Leaf names of the LLM's Linear layers that get adapters (q_proj, v_proj, ...); null: every Linear
    # of the LLM, as LLaVA's finetune_lora.sh (the LM head is outside the LLM and never gets one).
    target_modules: list[str] | None = None
    # Modules trained in full beside the adapters: `lm_head`, or modules of the LLM by name (`embed_tokens`).
    modules_to_save: list[str] = field(default_factory=list)
    # QLoRA: load the LLM's Linear weights in 4 bits with bitsandbytes (`nf4`, as the QLoRA paper, or
    # `fp4`), double-quantised, computed in the run's precision. Not under ZeRO-3 (docs/config.md).
    quantize: Literal["none", "nf4", "fp4"] = "none"


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class StageEvalConfig:
    # Held-out data: a LLaVA-format JSON/JSONL file (made into shards once, in RUN_DIR/validation/<stage>)
    # or a shard directory written by `vdep build-shards`.
    data: str
    # The folder a JSON/JSONL file's image paths are relative to.
    image_root: str | None = None
    # Validate every N optimizer steps, and at the stage's end (0: only at the end).
    every: int = 0
    # About this many samples of the set (null: all of it).
    max_samples: int | None = None
    # Also answer the set's questions by greedy decoding (first user turn → first assistant turn, scored
    # as `vdep eval` scores them) and log the accuracy.
    qa: bool = True
    # The longest answer decoded, in tokens.
    max_new_tokens: int = 16


@dataclass
class StageConfig:
    """One training stage. Optimisation values have no defaults: the recipe states them."""

    shards: list[str]
    template: Literal["plain", "vicuna_v1", "llama3", "qwen2", "chat_template"]
    trainable: list[str]
    lr: float
    global_batch_size: int
    micro_batch_size: int
    # Separate learning rate for the projector (and the VDEP head); null means `lr`.
    projector_lr: float | None = None
    epochs: float = 1.0
    # Stop after this many optimizer steps (overrides `epochs` when set).
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # A preset name from ds_configs/ (zero2, zero3, zero3_offload) or a path to a DeepSpeed JSON.
    zero: str = "zero2"
    # Where the stage's starting weights come from, on top of the base model: "previous" (the
    # previous stage's final weights in this run; nothing for the first stage), "none", or a path
    # to a stage's `final/` folder or its `trainable.safetensors`.
    init_from: str = "previous"
    # Save a resumable checkpoint every N optimizer steps (0: only at the end of the stage).
    save_every: int = 0
    vdep: VdepConfig = field(default_factory=VdepConfig)
    # Train the language model through LoRA adapters (null: in full, as `trainable` says).
    lora: LoraConfig | None = None
    # Held-out losses during the stage (null: none); vdep/train/validation.py.
    eval: StageEvalConfig | None = None


# ------------------------------------------------------------------------------------------ deepspeed
@dataclass
class DeepSpeedConfig:
    # "auto": bf16 on a GPU that supports it, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Collective timeout; a hung collective fails after this long instead of waiting forever.
    timeout_minutes: float = 30.0


# ------------------------------------------------------------------------------------------- reporting
# Where a stage's scalars go besides RUN_DIR/<stage>/metrics.jsonl (vdep/train/reporting.py): the backend's
# name → (the module it needs, the vdep extra that installs it).
REPORT_BACKENDS: dict[str, tuple[str, str | None]] = {
    "tensorboard": ("tensorboard", None),  # a dependency of vdep itself
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# A setting under run.wandb or run.mlflow whose name says it holds a credential. The resolved config is
# copied into every run directory (and logged as the run's parameters), so credentials come from the
# environment only: the backend reads them there itself.
CREDENTIAL_NAME = re.compile(r"(^|[_.-])(api[_-]?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
CREDENTIAL_VARIABLES = {
    "wandb": "WANDB_API_KEY (or run `wandb login` once)",
    "mlflow": "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
}


@dataclass
class WandbConfig:
    """Weights & Biases (`run.report_to` lists `wandb`): where the stage's runs go. Credentials and the
    server come from the environment (WANDB_API_KEY, WANDB_BASE_URL, WANDB_MODE=offline)."""

    project: str = "vdep"
    # The team or user the project belongs to (null: the API key's default entity).
    entity: str | None = None
    # The stages of one vdep run are grouped under this name (null: run.name).
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    """MLflow (`run.report_to` lists `mlflow`): where the stage's runs go. Credentials come from the
    environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD)."""

    # null: MLFLOW_TRACKING_URI, else MLflow's default.
    tracking_uri: str | None = None
    experiment: str = "vdep"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class LossAlertConfig:
    """When a logged training loss raises an alert (in the log and in every backend): when any `loss/*` or
    `grad_norm` is not finite, or when `loss/total` exceeds `spike_factor` times the median of the previous
    `spike_window` logged values of `loss/total` (the check starts once the window is full)."""

    spike_factor: float = 3.0
    spike_window: int = 20


# ------------------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    name: str = "vdep-run"
    # The run directory is output_dir/name.
    output_dir: str = "runs"
    seed: int = 0
    log_every: int = 10
    # "auto": continue from the latest checkpoint in the run directory; "never": refuse to reuse one.
    resume: Literal["auto", "never"] = "auto"
    keep_last: int = 2
    # After SIGUSR1/SIGTERM, the step in progress and the checkpoint must finish within this many
    # seconds, or the process exits anyway (the previous checkpoint stays the latest). Keep it below
    # the warning time of the scheduler's signal (slurm/train.sbatch: USR1 120 s before the end).
    stop_timeout_s: float = 100.0
    # Steps skipped in a row for a non-finite loss or gradient norm before the run stops.
    max_nonfinite_steps: int = 5
    # The run stops (with a checkpoint) when more than this share of the samples that sizes.json lists
    # for the epochs so far is missing from the shards (a truncated or corrupt shard; docs/data.md).
    max_missing_fraction: float = 0.01
    # Where the scalars of metrics.jsonl are also sent, rank 0 only: any of tensorboard, wandb, mlflow
    # (docs/monitoring.md). [] sends them nowhere else.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    alerts: LossAlertConfig = field(default_factory=LossAlertConfig)

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class TrainConfig:
    """Everything `vdep train` needs. Written, fully resolved, to RUN_DIR/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # VDEP settings for every stage; `stages.<name>.vdep` overrides single keys for one stage.
    vdep: VdepConfig = field(default_factory=VdepConfig)
    # The stages, in the order they run (the YAML mapping's order); LLaVA-1.5's are align and finetune.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Which stages to run: "all" (every stage, in order) or one stage's name.
    stage: str = "all"

    def stages_to_run(self) -> list[tuple[str, StageConfig]]:
        names = list(self.stages) if self.stage == "all" else [self.stage]
        return [(name, self.stages[name]) for name in names if name in self.stages]

    def stages_before(self, name: str) -> list[str]:
        """The stages that run before `name`, in order."""
        names = list(self.stages)
        return names[: names.index(name)]

    @property
    def last_stage(self) -> str:
        return list(self.stages)[-1]


# ---------------------------------------------------------------------------------------------- loading
def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the recipe shipped with vdep under that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe; shipped recipes: {', '.join(names)}"
    )


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """Parse `key=value` strings; values are YAML scalars or flow collections."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. stages.align.lr=2e-3)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': cannot parse the value: {exc}") from None
        parsed.append((key.strip(), value))
    return parsed


def load_config(recipe: str, overrides: list[str] | None = None, files: bool = True) -> TrainConfig:
    """Load a recipe, apply overrides, merge per-stage VDEP settings, build and check the dataclasses.

    `files=False` leaves out the checks that the files and folders the config names exist (models,
    tokenizer, shards): `vdep train --print-config` shows a config before its data and models are there.
    """
    path = find_recipe(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model, data, stages, ...)")
    source = Source(str(path))
    stages = raw.get("stages")
    valid = dotted_keys(TrainConfig, names={"stages": [str(name) for name in stages] if isinstance(stages, dict) else []})
    overrides = overrides or []
    stage_names = [str(name) for name in stages] if isinstance(stages, dict) else []
    for item, (key, value) in zip(overrides, parse_overrides(overrides)):
        _refuse_credential(key, f"the command-line override of '{key}'")  # before echoing the override anywhere
        _check_stage_in_override(key, item, stage_names)
        if key not in valid:
            suggestion = closest_key(key, valid, KEY_ALIASES)
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            raise ConfigError(f"unknown key '{key}' in the command-line override '{item}'{hint}")
        set_dotted(raw, key, value)
        source.add_override(key, item)
    _merge_stage_vdep(raw, source)
    _refuse_report_credentials(raw, source)
    config = config_from_dict(raw, source)
    check_settings(config, source)
    if files:
        check_files(config, source)
    return config


def config_from_dict(raw: dict, source: str | Source) -> TrainConfig:
    """A parsed recipe or a run's config.yaml → the resolved `TrainConfig`: the one way a config is read, so
    that a run directory written before a key existed reads as the same config as a recipe today."""
    source = Source(source) if isinstance(source, str) else source
    config = structure(TrainConfig, raw, source=source, aliases=KEY_ALIASES)
    resolve_image_aspect_ratio(config, source)
    return config


# model.image_aspect_ratio's values: LLaVA-NeXT's names.
ASPECT_RATIO_PATTERN = re.compile(r"pad|square|anyres|anyres_max_([1-9][0-9]*)")
_PAD_TO_SQUARE = {"pad": True, "square": False}


def resolve_image_aspect_ratio(config: TrainConfig, source: Source) -> None:
    """`model.image_aspect_ratio` is the one source of truth; `data.pad_to_square` (the key vdep had first,
    which every older run directory's config.yaml holds) is its older spelling of `pad`/`square`. Unset, the
    aspect ratio is what pad_to_square says, else `pad`; both set and disagreeing is refused. Afterwards
    pad_to_square mirrors it (null under anyres), so a resolved config reads back as itself."""
    model, data = config.model, config.data
    given = model.image_aspect_ratio
    if given is not None and not ASPECT_RATIO_PATTERN.fullmatch(given):
        raise ConfigError(
            f"{source.where('model.image_aspect_ratio')}: {given!r} is not an aspect ratio mode; use pad, square, "
            "anyres or anyres_max_N (N: the most tiles before OneVision's pooling, e.g. anyres_max_9)"
        )
    implied = None if data.pad_to_square is None else ("pad" if data.pad_to_square else "square")
    if given is None:
        model.image_aspect_ratio = implied or "pad"
    elif implied is not None and implied != given:
        raise ConfigError(
            f"{source.where('model.image_aspect_ratio')} is {given!r}, but {source.where('data.pad_to_square')} is "
            f"{str(data.pad_to_square).lower()}, which means {implied!r}. data.pad_to_square is the older spelling of "
            "pad/square: remove it (data.pad_to_square=null) or make the two agree"
        )
    data.pad_to_square = _PAD_TO_SQUARE.get(model.image_aspect_ratio)


def is_anyres(aspect_ratio: str | None) -> bool:
    return aspect_ratio is not None and aspect_ratio.startswith("anyres")


def max_tiles(aspect_ratio: str) -> int | None:
    """N of `anyres_max_N` (OneVision pools a tiled image's features beyond N tiles); None otherwise."""
    match = ASPECT_RATIO_PATTERN.fullmatch(aspect_ratio)
    return int(match.group(1)) if match and match.group(1) else None


_RANGE_PAIR = re.compile(r"\((\d+)x(\d+)\)")
_RANGE_FORM = re.compile(r"\s*\(\d+x\d+\)(\s*,\s*(\.\.\.|\(\d+x\d+\)))*\s*")


def grid_pinpoints(value: list[list[int]] | str, tile_size: int) -> list[list[int]]:
    """`model.image_grid_pinpoints` as [height, width] pairs in pixels. The range form "(1x1),...,(6x6)"
    expands as LLaVA-NeXT does (llava/mm_utils.py): every (i, j) from the first pair to the last, each
    times the tower's image size; the pairs are then read as [height, width], as transformers reads the
    expanded list (image_processing_utils.select_best_resolution). A bad value raises ValueError."""
    if isinstance(value, str):
        if not _RANGE_FORM.fullmatch(value):
            raise ValueError(f"{value!r} is not LLaVA-NeXT's range form, e.g. \"(1x1),...,(6x6)\"")
        pairs = [(int(a), int(b)) for a, b in _RANGE_PAIR.findall(value)]
        (first_i, first_j), (last_i, last_j) = pairs[0], pairs[-1]
        if first_i < 1 or first_j < 1 or last_i < first_i or last_j < first_j:
            raise ValueError(f"{value!r}: the range must run from at least (1x1) up to pairs no smaller than the first")
        return [[i * tile_size, j * tile_size] for i in range(first_i, last_i + 1) for j in range(first_j, last_j + 1)]
    if not value or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
                            for p in value):
        raise ValueError(f"{value!r} is not a list of [height, width] pairs of positive pixel counts")
    return [list(p) for p in value]


def _check_image_settings(model: ModelConfig, source: Source) -> None:
    aspect, pinpoints = model.image_aspect_ratio, model.image_grid_pinpoints
    if is_anyres(aspect):
        if pinpoints is None:
            raise ConfigError(
                f"{source.where('model.image_grid_pinpoints')}: model.image_aspect_ratio={aspect} tiles images on a "
                "grid chosen among these resolutions; set it, e.g. LLaVA-NeXT's [[336,672],[672,336],[672,672],"
                "[1008,336],[336,1008]] or OneVision's \"(1x1),...,(6x6)\""
            )
        try:
            grid_pinpoints(pinpoints, 1)
        except ValueError as exc:
            raise ConfigError(f"{source.where('model.image_grid_pinpoints')}: {exc}") from None
    else:
        if pinpoints is not None:
            raise ConfigError(
                f"{source.where('model.image_grid_pinpoints')}: grid pinpoints are for model.image_aspect_ratio=anyres "
                f"or anyres_max_N, not {aspect}; remove them or choose anyres"
            )
        if model.mm_patch_merge_type != "flat":
            raise ConfigError(
                f"{source.where('model.mm_patch_merge_type')}: {model.mm_patch_merge_type} lays tiles out as the image; "
                f"with model.image_aspect_ratio={aspect} an image is one view: use flat, or anyres"
            )


def _check_stage_in_override(key: str, item: str, stage_names: list[str]) -> None:
    """An override under `stages.` names a stage the recipe defines (a typo would otherwise start a new one)."""
    section, _, rest = key.partition(".")
    name = rest.partition(".")[0]
    if section != "stages" or not name or name in stage_names:
        return
    close = difflib.get_close_matches(name, stage_names, n=1)
    hint = f"; did you mean '{key.replace(f'stages.{name}', f'stages.{close[0]}', 1)}'?" if close else ""
    raise ConfigError(
        f"unknown key '{key}' in the command-line override '{item}': the recipe has no stage '{name}' "
        f"(its stages: {', '.join(stage_names) or 'none'}){hint}"
    )


def _refuse_credential(key: str, where: str) -> None:
    """A setting under run.wandb or run.mlflow named like a credential is refused; the message names the key,
    never its value."""
    section, _, rest = key.partition(".")
    backend, _, name = rest.partition(".")
    if section != "run" or backend not in CREDENTIAL_VARIABLES or not name:
        return
    if any(CREDENTIAL_NAME.search(part) for part in name.split(".")):
        raise ConfigError(
            f"{where}: credentials never go into a config (it is copied into the run directory and logged as "
            f"the run's parameters); remove '{key}' and set {CREDENTIAL_VARIABLES[backend]} in the environment, "
            f"where {backend} reads it"
        )


def _refuse_report_credentials(raw: dict, source: Source) -> None:
    """`_refuse_credential` for every key under run.wandb and run.mlflow (tags included)."""
    run = raw.get("run")
    if not isinstance(run, dict):
        return

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                inner = f"{key}.{name}"
                overridden = source.override_of(inner)
                _refuse_credential(inner, f"'{inner}' (from the command-line override of '{overridden.partition('=')[0]}')"
                                   if overridden else source.where(inner))
                walk(value, inner)

    for backend in CREDENTIAL_VARIABLES:
        walk(run.get(backend), f"run.{backend}")


def _merge_stage_vdep(raw: dict, source: Source) -> None:
    """Give every stage the top-level `vdep` section, overridden key by key by the stage's own."""
    shared = raw.get("vdep") or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"{source.where('vdep')}: expected a mapping of VDEP settings")
    for name, stage in (raw.get("stages") or {}).items():
        if isinstance(stage, dict):
            own = stage.get("vdep") or {}
            if not isinstance(own, dict):
                raise ConfigError(f"{source.where(f'stages.{name}.vdep')}: expected a mapping of VDEP settings")
            stage["vdep"] = {**shared, **own}
            for key in shared.keys() - own.keys():  # an error in a copied value names the override that set it
                source.copies[f"stages.{name}.vdep.{key}"] = f"vdep.{key}"


# ------------------------------------------------------------------------------------------- validation
# Two kinds of checks: `check_settings` looks at the values alone (ranges, combinations) and runs for
# every loaded config; `check_files` looks at the file system (the models, tokenizer and shards a config
# names exist) and runs before training, not for `vdep train --print-config`.
PROJECTOR_FILE_SUFFIXES = (".bin", ".pt", ".safetensors")


def check_settings(config: TrainConfig, source: str | Source = "config") -> None:
    """Cross-field checks of the values alone (ranges, combinations); no file needs to exist."""
    source = Source(source) if isinstance(source, str) else source
    model = config.model
    if model.init_from is not None and _names_llava_folder(model.init_from):
        for part in ("vision_tower", "language_model"):
            section = getattr(model, part)
            if section.path is not None or section.tiny is not None:
                raise ConfigError(
                    f"{source.where('model.init_from')}: a Llava folder provides the {part}; "
                    f"leave model.{part}.path/tiny unset"
                )
    else:
        _exactly_one(model.vision_tower.path, model.vision_tower.tiny, "model.vision_tower", source)
        _exactly_one(model.language_model.path, model.language_model.tiny, "model.language_model", source)
    _check_image_settings(model, source)
    if model.language_model.tiny is not None and model.tokenizer is None:
        raise ConfigError(
            f"{source.where('model.tokenizer')}: a tiny language model needs a tokenizer folder "
            "(make one with `vdep make-tokenizer --shards DIR --vocab-size N --out DIR`)"
        )
    if config.data.max_length < 16:
        raise ConfigError(f"{source.where('data.max_length')}: {config.data.max_length} is too small")
    if config.data.num_workers < 0:
        raise ConfigError(f"{source.where('data.num_workers')}: must be 0 or more")
    if config.data.group_window < 1:
        raise ConfigError(
            f"{source.where('data.group_window')}: must be at least 1 (micro-batches per grouping window)"
        )
    remote = config.data.remote
    if remote.retries < 0 or remote.backoff_s < 0 or remote.max_backoff_s < 0 or remote.request_mb <= 0 \
            or remote.timeout_s <= 0:
        raise ConfigError(
            f"{source.where('data.remote')}: retries, backoff_s and max_backoff_s must be 0 or more, "
            "timeout_s and request_mb positive"
        )
    check_storage_options(remote.storage_options, "data.remote.storage_options")
    if config.run.log_every < 1:
        raise ConfigError(f"{source.where('run.log_every')}: must be at least 1")
    if config.run.max_nonfinite_steps < 1:
        raise ConfigError(f"{source.where('run.max_nonfinite_steps')}: must be at least 1")
    if not 0.0 <= config.run.max_missing_fraction <= 1.0:
        raise ConfigError(
            f"{source.where('run.max_missing_fraction')}: a fraction within [0, 1] (0.01: 1% of the samples)"
        )
    if config.run.stop_timeout_s <= 0:
        raise ConfigError(f"{source.where('run.stop_timeout_s')}: must be positive (seconds)")
    _check_reporting(config.run, source)
    _check_stage_names(config, source)
    for name, stage in config.stages_to_run():
        _check_stage(name, stage, source)
    _check_lora_chain(config, source)


def _check_reporting(run: RunConfig, source: Source) -> None:
    names = list(REPORT_BACKENDS)
    for name in run.report_to:
        if name not in REPORT_BACKENDS:
            close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source.where('run.report_to')}: unknown backend '{name}'{hint}; choose from {', '.join(names)} "
                "(a list; [] reports to metrics.jsonl only)"
            )
        if run.report_to.count(name) > 1:
            raise ConfigError(f"{source.where('run.report_to')}: lists '{name}' twice")
    uri = run.mlflow.tracking_uri
    if uri is not None and urllib.parse.urlsplit(uri).password is not None:
        where = ("the command-line override of 'run.mlflow.tracking_uri'"  # never echo the override's value
                 if source.override_of("run.mlflow.tracking_uri") else source.where("run.mlflow.tracking_uri"))
        raise ConfigError(
            f"{where}: holds a password; credentials never go into a config. "
            f"Give the URI without it and set {CREDENTIAL_VARIABLES['mlflow']} in the environment"
        )
    alerts = run.alerts
    if alerts.spike_factor <= 1:
        raise ConfigError(
            f"{source.where('run.alerts.spike_factor')}: must be above 1 (an alert when loss/total exceeds this many "
            f"times its recent median), got {alerts.spike_factor}"
        )
    if alerts.spike_window < 1:
        raise ConfigError(f"{source.where('run.alerts.spike_window')}: must be at least 1 (logged values), got "
                          f"{alerts.spike_window}")


def module_installed(module: str) -> bool:
    """Whether `module` can be imported here (without importing it: wandb and mlflow take seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_backends(run: RunConfig, source: Source) -> None:
    """Every backend in run.report_to has its package installed: before training, not at the first log line."""
    for name in run.report_to:
        module, extra = REPORT_BACKENDS[name]
        if not module_installed(module):
            install = f"pip install 'vdep[{extra}]'" if extra else f"pip install {module}"
            raise ConfigError(
                f"{source.where('run.report_to')}: lists {name}, but the {module} package is not installed in this "
                f"Python environment ({sys.executable}); install it with `{install}`, or remove {name} from run.report_to"
            )


def check_files(config: TrainConfig, source: str | Source = "config") -> None:
    """The files and folders the config names exist and are what they should be (local ones; remote
    shards are found when a stage starts), and the packages of the reporting backends are installed."""
    source = Source(source) if isinstance(source, str) else source
    check_report_backends(config.run, source)
    model = config.model
    if model.init_from is not None:
        _check_init_from(model, source)
    for key, value in (
        ("model.vision_tower.path", model.vision_tower.path),
        ("model.language_model.path", model.language_model.path),
    ):
        if value is not None:
            _require_hf_folder(value, key, source)
    tokenizer = model.tokenizer_source()
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConfigError(f"{source.where('model.tokenizer')}: tokenizer folder {tokenizer} does not exist")
    for name, stage in config.stages_to_run():
        if stage.eval is not None:
            _check_stage_eval_files(stage.eval, f"stages.{name}.eval", source)
        for shard_dir in stage.shards:
            if not is_remote(shard_dir) and not Path(shard_dir).exists():
                raise ConfigError(
                    f"{source.where(f'stages.{name}.shards')}: {shard_dir} does not exist; build shards with "
                    "`vdep build-shards INPUT --image-root DIR --out DIR`"
                )


def _names_llava_folder(init_from: str) -> bool:
    """Whether `model.init_from` stands for a Llava folder rather than an mm_projector file, also when it
    does not exist (yet)."""
    path = Path(init_from)
    return path.is_dir() or (not path.exists() and path.suffix not in PROJECTOR_FILE_SUFFIXES)


# The folders model.init_from splits into base weights (train/base_weights.py): Llava, LlavaNext, LlavaOnevision.
IMPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


def _check_init_from(model: ModelConfig, source: Source) -> None:
    path = Path(model.init_from)  # type: ignore[arg-type]
    where = source.where("model.init_from")
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("model_type") not in IMPORTED_MODEL_TYPES:
            raise ConfigError(f"{where}: {path} is not a Hugging Face Llava folder (config.json with model_type "
                              f"{', '.join(IMPORTED_MODEL_TYPES)})")
    elif path.suffix not in PROJECTOR_FILE_SUFFIXES:
        raise ConfigError(f"{where}: {path} is neither a Llava folder nor an mm_projector .bin/.safetensors file")


def _exactly_one(path: str | None, tiny: object, key: str, source: Source) -> None:
    if (path is None) == (tiny is None):
        raise ConfigError(
            f"{source.where(key)}: set exactly one of '{key}.path' (a local Hugging Face folder) "
            f"and '{key}.tiny' (sizes of a random-init model)"
        )


def _require_hf_folder(path: str, key: str, source: Source) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"{source.where(key)}: {path} does not exist; point it at a local Hugging Face model folder "
            "(vdep never downloads weights at run time)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{source.where(key)}: {path} has no config.json; is it a Hugging Face model folder?")


def _check_stage(name: str, stage: StageConfig, source: Source) -> None:
    key = f"stages.{name}"
    unknown = [part for part in stage.trainable if part not in TRAINABLE_PARTS]
    if unknown:
        extra = " (the vision tower is always frozen)" if "vision_tower" in unknown else ""
        raise ConfigError(
            f"{source.where(f'{key}.trainable')}: unknown part(s) {unknown}{extra}; choose from {list(TRAINABLE_PARTS)}"
        )
    if not stage.trainable:
        raise ConfigError(f"{source.where(f'{key}.trainable')}: nothing to train; list at least 'projector'")
    for field_name in ("lr", "global_batch_size", "micro_batch_size", "epochs"):
        if getattr(stage, field_name) <= 0:
            raise ConfigError(
                f"{source.where(f'{key}.{field_name}')}: must be positive, got {getattr(stage, field_name)}"
            )
    if stage.global_batch_size % stage.micro_batch_size:
        raise ConfigError(
            f"{source.where(f'{key}.global_batch_size')}: {stage.global_batch_size} is not a multiple of "
            f"micro_batch_size {stage.micro_batch_size}"
        )
    if stage.max_steps is not None and stage.max_steps <= 0:
        raise ConfigError(f"{source.where(f'{key}.max_steps')}: must be positive or null")
    if not 0.0 <= stage.warmup_ratio < 1.0:
        raise ConfigError(f"{source.where(f'{key}.warmup_ratio')}: must be in [0, 1)")
    if stage.grad_clip < 0:
        raise ConfigError(f"{source.where(f'{key}.grad_clip')}: must be 0 (off) or positive")
    if not stage.shards:
        raise ConfigError(f"{source.where(f'{key}.shards')}: list at least one shard directory")
    if stage.eval is not None:
        _check_stage_eval(stage.eval, f"{key}.eval", source)
    vdep = stage.vdep
    if vdep.alpha < 0:
        raise ConfigError(f"{source.where(f'{key}.vdep.alpha')}: must be 0 or more, got {vdep.alpha}")
    if not 0.0 <= vdep.mode_ratio <= 1.0:
        raise ConfigError(f"{source.where(f'{key}.vdep.mode_ratio')}: must be within [0, 1], got {vdep.mode_ratio}")
    if stage.lora is not None:
        _check_lora(key, stage.lora, stage.trainable, source)


def _check_lora(key: str, lora: LoraConfig, trainable: list[str], source: Source) -> None:
    if "language_model" not in trainable:
        raise ConfigError(
            f"{source.where(f'{key}.lora')}: LoRA trains the language model through adapters, but '{key}.trainable' "
            f"is {trainable}; add language_model to it, or set {key}.lora=null"
        )
    if lora.r < 1:
        raise ConfigError(f"{source.where(f'{key}.lora.r')}: the adapters' rank must be at least 1, got {lora.r}")
    if lora.alpha <= 0:
        raise ConfigError(
            f"{source.where(f'{key}.lora.alpha')}: must be positive (the update is scaled by alpha / r), "
            f"got {lora.alpha}"
        )
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"{source.where(f'{key}.lora.dropout')}: must be in [0, 1), got {lora.dropout}")
    if lora.target_modules is not None and (not lora.target_modules or not all(lora.target_modules)):
        raise ConfigError(
            f"{source.where(f'{key}.lora.target_modules')}: list the LLM's Linear layers by name "
            "(q_proj, v_proj, ...), or null for every Linear of the LLM"
        )
    if not all(lora.modules_to_save):
        raise ConfigError(f"{source.where(f'{key}.lora.modules_to_save')}: empty module name")


def _check_stage_eval(settings: StageEvalConfig, key: str, source: Source) -> None:
    if settings.every < 0:
        raise ConfigError(f"{source.where(f'{key}.every')}: validate every N steps (0: only at the stage's end), got {settings.every}")
    if settings.max_new_tokens < 1:
        raise ConfigError(f"{source.where(f'{key}.max_new_tokens')}: must be at least 1")
    if settings.max_samples is not None and settings.max_samples < 1:
        raise ConfigError(f"{source.where(f'{key}.max_samples')}: must be positive or null (all of the set)")


def validation_source_is_file(settings: StageEvalConfig) -> bool:
    """Whether `eval.data` names a LLaVA JSON/JSONL file (else a shard directory)."""
    return Path(settings.data).suffix in (".json", ".jsonl")


def _check_stage_eval_files(settings: StageEvalConfig, key: str, source: Source) -> None:
    data = Path(settings.data)
    if is_remote(settings.data):
        raise ConfigError(f"{source.where(f'{key}.data')}: validation data must be local (a file or a shard directory)")
    if not data.exists():
        raise ConfigError(f"{source.where(f'{key}.data')}: {data} does not exist")
    if validation_source_is_file(settings):
        if settings.image_root is None or not Path(settings.image_root).is_dir():
            raise ConfigError(
                f"{source.where(f'{key}.image_root')}: {data} is a LLaVA file; set {key}.image_root to the folder "
                f"its image paths are relative to (now {settings.image_root!r})"
            )
    elif not data.is_dir():
        raise ConfigError(f"{source.where(f'{key}.data')}: {data} is neither a .json/.jsonl file nor a shard directory")


def _check_stage_names(config: TrainConfig, source: Source) -> None:
    """Stage names are folder names in the run directory and keys in overrides: short, lower-case."""
    if not config.stages:
        raise ConfigError(f"{source.where('stages')}: no stage is defined (LLaVA-1.5's recipe has align and finetune)")
    for name in config.stages:
        if not STAGE_NAME_PATTERN.fullmatch(name) or name in RESERVED_STAGE_NAMES:
            raise ConfigError(
                f"{source.where(f'stages.{name}')}: {name!r} cannot name a stage; use lower-case letters, digits and "
                f"'_', starting with a letter (up to 64), and none of {', '.join(RESERVED_STAGE_NAMES)}"
            )
    if config.stage != "all" and config.stage not in config.stages:
        raise ConfigError(
            f"{source.where('stage')}: no stage named {config.stage!r}; this recipe's stages are "
            f"{', '.join(config.stages)} (or stage=all)"
        )


def _check_lora_chain(config: TrainConfig, source: Source) -> None:
    """A stage cannot start from a LoRA stage's result in this run (vdep/model/lora.py: adapters are
    added on top of a stage's starting weights, never loaded as them)."""
    for name, stage in config.stages.items():
        if stage.init_from != "previous":
            continue
        for earlier in config.stages_before(name):
            if config.stages[earlier].lora is not None:
                raise ConfigError(
                    f"{source.where(f'stages.{name}.init_from')}: 'previous' starts {name} from the {earlier} stage's "
                    f"result, which holds LoRA adapters (stages.{earlier}.lora); vdep cannot start a stage from "
                    f"adapters. Export {earlier} merged (vdep export-hf) and start from the export "
                    f"(model.init_from=EXPORT, stages.{name}.init_from=none), or set stages.{earlier}.lora=null"
                )


def check_batch_geometry(name: str, stage: StageConfig, world_size: int) -> int:
    """Gradient accumulation steps for this world size; an error if the global batch does not split."""
    per_step = stage.micro_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise ConfigError(
            f"stages.{name}.global_batch_size={stage.global_batch_size} is not divisible by "
            f"micro_batch_size × world size = {stage.micro_batch_size} × {world_size} = {per_step}; "
            f"change stages.{name}.micro_batch_size or the number of processes"
        )
    return stage.global_batch_size // per_step


# ------------------------------------------------------------------------------------------------ saving
def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(unstructure(config), sort_keys=False)


def stage_fingerprint(config: TrainConfig, stage: str) -> str:
    """A short hash of what decides a stage's model shape and data (the model, the stage's shards and
    template), recorded in its checkpoints: a checkpoint is resumed only into the same. It depends on
    that stage alone, so running another subset of the stages (`stage=`) keeps it."""
    settings = config.stages[stage]
    model = unstructure(config.model)
    if not is_anyres(config.model.image_aspect_ratio):  # pad/square was data.pad_to_square, outside the fingerprint
        for key in ("image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type"):
            model.pop(key)
    material = {"model": model, "shards": settings.shards, "template": settings.template}
    if settings.lora is not None:  # the adapters are part of the model's shape (absent: fingerprints as before)
        material["lora"] = unstructure(settings.lora)
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

