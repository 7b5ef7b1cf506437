"""The run directory: its layout, and which weight files make a stage's model.

RUN_DIR (run.output_dir/run.name) holds:
    config.yaml                  the fully resolved config (`vdep train RUN_DIR/config.yaml` repeats the run)
    logs/train.log               rank 0's log
    tokenizer/                   the prepared tokenizer (with <image> and pad)
    base/                        random-init towers (tiny models), an imported Llava folder's parts, and
                                 the projector's initial weights: what every stage starts from
    tensorboard/<stage>/         event files
    <stage>/metrics.jsonl        the logged scalars, one JSON object per logged step (with `time`, Unix seconds)
    <stage>/checkpoints/step_N/  resumable checkpoints (train/checkpoint.py); `latest` names the newest
    <stage>/final/               trainable.safetensors (the stage's trained weights, written last: its
                                 presence marks the stage complete) and summary.json

Which model a path stands for is answered once, by `resolve_model`: `vdep eval`, `vdep export-hf`,
`vdep attention-map` and the demo pass it whatever path the user gave, and get one `ModelSource` (the
run, the stage, the weight layers on top of the base weights, the step of a checkpoint, the stage's
LoRA settings). What a stage starts from is `stage_weights(..., final=False)`, which training calls too,
so training, evaluation and export always build the same model from the same run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import LoraConfig, ModelConfig, TrainConfig, config_from_dict
from .errors import CheckpointError
from .log import get_logger
from .weight_layers import SafetensorsLayer, WeightLayer, ZeroCheckpointLayer

log = get_logger("rundir")

CONFIG_FILE = "config.yaml"
FINAL_WEIGHTS = "trainable.safetensors"
SUMMARY_FILE = "summary.json"
PROJECTOR_INIT_FILE = "projector_init.safetensors"
IMAGE_NEWLINE_INIT_FILE = "image_newline_init.safetensors"
LATEST = "latest"


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    """The optimizer step a checkpoint tag names (None for a tag vdep did not write)."""
    prefix, _, number = tag.rpartition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def latest_tag(checkpoints: Path) -> str | None:
    """The tag `checkpoints/latest` names, if that checkpoint exists."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoints / tag).is_dir() else None


@dataclass(frozen=True)
class BasePaths:
    """Where a run's base weights are: given folders, or the run's own base/ copies."""

    vision_tower: Path
    language_model: Path
    projector_init: Path

    @property
    def image_newline_init(self) -> Path:
        """`image_newline`'s starting value (mm_patch_merge_type: spatial_unpad), beside the projector's."""
        return self.projector_init.parent / IMAGE_NEWLINE_INIT_FILE


@dataclass(frozen=True)
class StageDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def final_weights(self) -> Path:
        return self.final / FINAL_WEIGHTS

    @property
    def summary_file(self) -> Path:
        return self.final / SUMMARY_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def is_complete(self) -> bool:
        return self.final_weights.is_file()

    def read_summary(self) -> dict:
        return json.loads(self.summary_file.read_text())

    def latest_checkpoint(self) -> Path | None:
        tag = latest_tag(self.checkpoints) if self.checkpoints.is_dir() else None
        return self.checkpoints / tag if tag is not None else None


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def containing(cls, path: Path) -> RunDir:
        """The run directory `path` is (or lies in): the nearest folder with a config.yaml."""
        for folder in (path, *path.parents):
            if (folder / CONFIG_FILE).is_file():
                return cls(folder)
        raise CheckpointError(
            f"no vdep run directory (a folder with {CONFIG_FILE}) contains {path}; the run's config, tokenizer and "
            "base weights are needed"
        )

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / "logs" / "train.log"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def base(self) -> Path:
        return self.path / "base"

    def tensorboard(self, stage: str) -> Path:
        return self.path / "tensorboard" / stage

    def stage(self, name: str) -> StageDir:
        return StageDir(self.path / name)

    def base_paths(self, model: ModelConfig) -> BasePaths:
        return BasePaths(
            vision_tower=Path(model.vision_tower.path) if model.vision_tower.path else self.base / "vision_tower",
            language_model=Path(model.language_model.path) if model.language_model.path else self.base / "language_model",
            projector_init=self.base / PROJECTOR_INIT_FILE,
        )

    def read_config(self) -> TrainConfig:
        """The run's resolved config (checked like a recipe, but without the file-system checks)."""
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path} is not a vdep run directory (no {CONFIG_FILE})")
        return config_from_dict(yaml.safe_load(self.config_file.read_text()) or {}, str(self.config_file))


def stage_weights(run: RunDir, config: TrainConfig, name: str, *, final: bool = True) -> list[Path]:
    """The weight files that make stage `name`'s model, in loading order, on top of the base weights.

    First what the stage starts from (`stages.<name>.init_from`: `previous` is every earlier stage of
    this run, each of which must be complete; `none` is nothing; a path names one stage result: its
    folder, its final/ folder or the file itself), then, with `final`, the stage's own final weights.
    """
    stage = config.stages[name]
    files: list[Path] = []
    if stage.init_from == "previous":
        for earlier in config.stages_before(name):
            earlier_dir = run.stage(earlier)
            if not earlier_dir.is_complete:
                raise CheckpointError(
                    f"stage {name} starts from the {earlier} stage's result, but {earlier_dir.final} has none; "
                    f"run stage={earlier} first, or set stages.{name}.init_from=none (or to another run's result)"
                )
            files.append(earlier_dir.final_weights)
    elif stage.init_from != "none":
        files.append(_stage_result(Path(stage.init_from), f"stages.{name}.init_from={stage.init_from}"))
    if final:
        own = run.stage(name)
        if not own.is_complete:
            raise CheckpointError(not_complete(run, own))
        files.append(own.final_weights)
    return files


def not_complete(run: RunDir, stage: StageDir) -> str:
    """Why a stage has no model yet, and what to pass or run instead."""
    message = f"{stage.path} has no final weights ({stage.final_weights.relative_to(stage.path)}): "
    latest = stage.latest_checkpoint()
    if latest is not None:
        return message + (f"the stage did not finish. Pass its checkpoints folder {stage.checkpoints} for its latest "
                          f"checkpoint (step {tag_step(latest.name)}), or finish the stage "
                          f"(vdep train {run.config_file} stage={stage.name})")
    return message + (f"the stage has not trained yet. Train it (vdep train {run.config_file} stage={stage.name}), "
                      "or pass the run directory or another stage")


def _stage_result(path: Path, where: str) -> Path:
    for candidate in (path, path / FINAL_WEIGHTS, path / "final" / FINAL_WEIGHTS):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{where}: no {FINAL_WEIGHTS} there (give a stage folder, its final/ folder or the file itself)")


def last_complete_stage(run: RunDir, config: TrainConfig) -> str | None:
    """The last stage, in recipe order, whose final weights exist: the model the run directory stands for."""
    complete = [name for name in config.stages if run.stage(name).is_complete]
    return complete[-1] if complete else None


# ------------------------------------------------------------------------------------- the resolver
def model_template(config: TrainConfig, stage: str | None) -> str:
    """The conversation template of a stage's model.

    With no stage trained (the base weights: a Llava folder just imported, or tiny random towers), the
    template of the recipe's last stage: the chat format the run trains the model for, and for an
    imported model the one its recipe continues it in (a vicuna_v1 model finetuned in vicuna_v1). The
    stage the run would train next is no better a guess: for the import that is usually align, whose
    `plain` captioning format the imported chat model was never prompted with. The recipe's stages, not
    the `stage=` of the last `vdep train`, so that the answer does not depend on how the run was invoked.
    """
    return config.stages[stage if stage is not None else config.last_stage].template


@dataclass(frozen=True)
class ModelSource:
    """One model of a run directory: its base weights, then `layers` on top of them, in order."""

    run: RunDir
    config: TrainConfig
    stage: str | None  # the stage whose model this is; None: the base weights (no stage trained)
    layers: tuple[WeightLayer, ...] = ()  # what the stage started from, then its own layer (the last)
    step: int | None = None  # the optimizer step, when the stage's own layer is a DeepSpeed checkpoint
    # The stage's LoRA settings when it is a LoRA stage: its adapters go in before its own layer, on top
    # of what it started from, as in training (model/loading.py).
    lora: LoraConfig | None = None

    @property
    def stages(self) -> list[str]:
        """The stages whose training the model holds, in order (a starting point from another run by its
        stage folder's name)."""
        return [layer_stage(layer) for layer in self.layers]

    @property
    def template(self) -> str:
        return model_template(self.config, self.stage)

    @property
    def description(self) -> str:
        if self.stage is None:
            return "base weights (no stage trained)"
        *earlier, last = self.stages
        last += f" at step {self.step}" if self.step is not None else " (final)"
        if self.lora is not None:
            last += f" with LoRA r={self.lora.r}" + (f", {self.lora.quantize} base" if self.lora.quantize != "none" else "")
        return " → ".join([*earlier, last])


def layer_stage(layer: WeightLayer) -> str:
    """The name of the stage folder a layer comes from (STAGE/final/FILE, STAGE/checkpoints/TAG)."""
    if isinstance(layer, SafetensorsLayer):
        return layer.path.parent.parent.name
    if isinstance(layer, ZeroCheckpointLayer):
        return layer.checkpoints.parent.name
    return layer.description


def resolve_model(path: Path) -> ModelSource:
    """The model `path` stands for; the run directory (the nearest folder above it with a config.yaml)
    gives the config, the tokenizer and the base weights.

    - a run directory: the last stage, in recipe order, whose final weights exist (with none, the base
      weights: an imported model or tiny random towers). A later stage's checkpoint is never taken, but
      named in a warning with the path that selects it;
    - a stage folder or anything inside it but its checkpoints (its final/ folder, the final file): that
      stage's final weights; a stage that did not finish is an error that names its checkpoints;
    - a stage's checkpoints/ folder (or its `latest` file): the checkpoint `latest` names; one step
      folder of it (or anything inside one): that checkpoint. Either on top of what the stage started from.
    """
    path = path.resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run = RunDir.containing(path)
    config = run.read_config()
    if path == run.path:
        return _run_model(run, config)
    stage_path = next((folder for folder in (path, *path.parents) if folder.parent == run.path), None)
    if stage_path is None or stage_path.name not in config.stages:
        raise CheckpointError(
            f"{path} is not inside a stage folder ({', '.join(config.stages)}) of {run.path}; pass the run "
            "directory, a stage folder, or a stage's checkpoints folder or one of its step folders"
        )
    stage = run.stage(stage_path.name)
    return stage_model(run, config, stage.name, _named_checkpoint(stage, path))


def stage_model(run: RunDir, config: TrainConfig, name: str, tag: str | None = None) -> ModelSource:
    """Stage `name`'s model: what it started from (`stage_weights`), then its final weights, or with
    `tag` that checkpoint's fp32 master weights."""
    stage = run.stage(name)
    if tag is None and not stage.is_complete:
        raise CheckpointError(not_complete(run, stage))
    starting = [SafetensorsLayer(path) for path in stage_weights(run, config, name, final=False)]
    own = SafetensorsLayer(stage.final_weights) if tag is None else ZeroCheckpointLayer(stage.checkpoints, tag)
    return ModelSource(run, config, name, (*starting, own), tag_step(tag) if tag is not None else None,
                       config.stages[name].lora)


def _run_model(run: RunDir, config: TrainConfig) -> ModelSource:
    chosen = last_complete_stage(run, config)
    newer = _newer_checkpoint(run, config, chosen)
    if newer is not None:
        name, latest = newer
        log.warning(
            "%s: using %s; stage %s has a newer checkpoint, %s (step %s), which a run directory never selects: "
            "pass %s to use it", run.path, f"stage {chosen}'s final weights" if chosen else "the base weights (no stage finished)",
            name, latest, tag_step(latest.name), run.stage(name).checkpoints,
        )
    return stage_model(run, config, chosen) if chosen is not None else ModelSource(run, config, None)


def _newer_checkpoint(run: RunDir, config: TrainConfig, chosen: str | None) -> tuple[str, Path] | None:
    """The latest checkpoint of the last stage after `chosen` (in recipe order) that has one written no
    earlier than `chosen`'s final weights: what a user who expects "the newest" would have wanted."""
    names = list(config.stages)
    later = names[names.index(chosen) + 1:] if chosen is not None else names
    since = run.stage(chosen).final_weights.stat().st_mtime_ns if chosen is not None else 0
    found = [(name, latest) for name in later
             if (latest := run.stage(name).latest_checkpoint()) is not None and latest.stat().st_mtime_ns >= since]
    return found[-1] if found else None


def _named_checkpoint(stage: StageDir, path: Path) -> str | None:
    """The checkpoint tag `path` names (None: it names the stage's final weights). Only checkpoints that
    every rank finished writing are taken: `latest`, or a step folder no newer than it."""
    if path != stage.checkpoints and stage.checkpoints not in path.parents:
        return None
    parts = path.relative_to(stage.checkpoints).parts
    latest = latest_tag(stage.checkpoints)
    written = sorted(folder.name for folder in stage.checkpoints.iterdir() if tag_step(folder.name) is not None)
    if not parts or parts[0] == LATEST:
        if latest is None:
            raise CheckpointError(
                f"{stage.checkpoints} has no complete checkpoint ({LATEST} is missing or names a folder that is gone)"
                + (f"; its step folders {', '.join(written)} were never confirmed complete" if written else "")
            )
        return latest
    tag = parts[0]
    folder = stage.checkpoints / tag
    if tag_step(tag) is None or not any(folder.glob("*model_states.pt")):
        raise CheckpointError(f"{folder} is not a DeepSpeed checkpoint of vdep (a step_N folder with *model_states.pt); "
                              f"pass {stage.checkpoints} for the latest checkpoint")
    if latest is None or tag_step(tag) > (tag_step(latest) or 0):  # type: ignore[operator]
        raise CheckpointError(
            f"{folder} was written after the last checkpoint every rank finished ({latest or 'none'}): a save "
            f"killed half-way is never used; pass {stage.checkpoints} for the latest complete one"
        )
    return tag
