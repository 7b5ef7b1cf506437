"""What `vdep export-hf --checkpoint PATH` exports: the run it belongs to and the weights on top of its base.

PATH may be
- a run directory: every completed stage, then the newest DeepSpeed checkpoint of the first
  incomplete stage, if any (with no stage trained at all, the base weights alone);
- a stage directory, its `final/` folder or its `final/trainable.safetensors`: that stage's result,
  on top of what the stage started from;
- a DeepSpeed checkpoint (a stage's `checkpoints/` folder, which names its latest tag, or one tag
  folder), ZeRO-2 or ZeRO-3, written by any number of ranks.
The run directory (the nearest folder above PATH with a `config.yaml`) provides the model config, the
tokenizer and the base weights. Weights are read one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..config import STAGE_NAMES, TrainConfig
from ..errors import CheckpointError
from ..structured import structure
from ..train.checkpoint import FINAL_WEIGHTS, latest_tag, stage_is_complete, starting_weights


class WeightLayer:
    """Named tensors applied on top of the model, read lazily."""

    description: str

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class SafetensorsLayer(WeightLayer):
    path: Path

    @property
    def description(self) -> str:  # type: ignore[override]
        return str(self.path)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(self.path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, weights.get_tensor(name)


@dataclass
class ZeroCheckpointLayer(WeightLayer):
    """The fp32 master weights of a DeepSpeed checkpoint, merged from any number of ranks' partitions."""

    checkpoints: Path
    tag: str

    @property
    def description(self) -> str:  # type: ignore[override]
        return str(self.checkpoints / self.tag)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        from ..train.ds import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoints), tag=self.tag, lazy_mode=True)
        for name in list(state):
            yield name, state.pop(name).contiguous()  # materialises one parameter at a time


@dataclass
class ExportSource:
    run_dir: Path
    config: TrainConfig
    layers: list[WeightLayer] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # stages whose training the export contains
    step: int | None = None  # optimizer step of a DeepSpeed checkpoint export

    @property
    def description(self) -> str:
        if not self.stages:
            return "base weights (no stage trained)"
        last = self.stages[-1] + (f" at step {self.step}" if self.step is not None else " (final)")
        return " → ".join(self.stages[:-1] + [last])


def find_run_dir(path: Path) -> Path:
    for folder in (path, *path.parents):
        if (folder / "config.yaml").is_file():
            return folder
    raise CheckpointError(
        f"no vdep run directory (a folder with config.yaml) contains {path}; the exporter needs the run's config, "
        "tokenizer and base weights"
    )


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    return structure(TrainConfig, yaml.safe_load(path.read_text()), source=str(path))


def _zero_checkpoint(path: Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) if `path` is a DeepSpeed checkpoint folder or one of its tags."""
    if (path / "latest").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{path / 'latest'} names a checkpoint that does not exist")
        return path, tag
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None


def resolve_source(path: Path) -> ExportSource:
    path = path.resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run_dir = find_run_dir(path)
    config = read_run_config(run_dir)
    source = ExportSource(run_dir, config)

    def add_stage(name: str, final: bool) -> None:
        for earlier in starting_weights(config, run_dir, name):
            if not any(isinstance(layer, SafetensorsLayer) and layer.path == earlier for layer in source.layers):
                source.layers.append(SafetensorsLayer(earlier))
                source.stages.append(earlier.parent.parent.name)
        if final:
            source.layers.append(SafetensorsLayer(run_dir / name / "final" / FINAL_WEIGHTS))
        source.stages.append(name)

    if path == run_dir:
        for name in STAGE_NAMES:
            if getattr(config.stages, name) is None:
                continue
            if stage_is_complete(run_dir / name):
                source.layers.clear()
                source.stages.clear()
                add_stage(name, final=True)
                continue
            zero = _zero_checkpoint(run_dir / name / "checkpoints") if (run_dir / name / "checkpoints").is_dir() else None
            if zero is None:
                continue  # this stage never ran: a run can start at a later one (`stage=finetune`)
            source.layers.clear()
            source.stages.clear()
            add_stage(name, final=False)
            source.layers.append(ZeroCheckpointLayer(*zero))
            source.step = int(zero[1].rsplit("_", 1)[-1]) if zero[1].startswith("step_") else None
            break
        return source
    stage_dir = next((folder for folder in (path, *path.parents) if folder.parent == run_dir), None)
    if stage_dir is None or stage_dir.name not in STAGE_NAMES:
        raise CheckpointError(f"{path} is not inside a stage folder ({', '.join(STAGE_NAMES)}) of {run_dir}")
    zero = _zero_checkpoint(path) if path.is_dir() else None
    if zero is not None:
        add_stage(stage_dir.name, final=False)
        source.layers.append(ZeroCheckpointLayer(*zero))
        source.step = int(zero[1].rsplit("_", 1)[-1]) if zero[1].startswith("step_") else None
        return source
    if not stage_is_complete(stage_dir):
        raise CheckpointError(
            f"{stage_dir} has no final weights ({FINAL_WEIGHTS}); export one of its checkpoints instead "
            f"(--checkpoint {stage_dir / 'checkpoints'})"
        )
    add_stage(stage_dir.name, final=True)
    return source
