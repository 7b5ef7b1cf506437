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

Training, evaluation and export all ask `stage_weights` which files to load on top of the base
weights, so the three always build the same model from the same run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ModelConfig, TrainConfig
from .errors import CheckpointError
from .structured import structure

CONFIG_FILE = "config.yaml"
FINAL_WEIGHTS = "trainable.safetensors"
SUMMARY_FILE = "summary.json"
PROJECTOR_INIT_FILE = "projector_init.safetensors"
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
        return structure(TrainConfig, yaml.safe_load(self.config_file.read_text()), source=str(self.config_file))


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
            raise CheckpointError(f"{own.path} has no final weights ({FINAL_WEIGHTS}): the stage is not complete")
        files.append(own.final_weights)
    return files


def _stage_result(path: Path, where: str) -> Path:
    for candidate in (path, path / FINAL_WEIGHTS, path / "final" / FINAL_WEIGHTS):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{where}: no {FINAL_WEIGHTS} there (give a stage folder, its final/ folder or the file itself)")


def last_complete_stage(run: RunDir, config: TrainConfig) -> str | None:
    """The last stage, in recipe order, whose final weights exist: the model the run directory stands for."""
    complete = [name for name in config.stages if run.stage(name).is_complete]
    return complete[-1] if complete else None
