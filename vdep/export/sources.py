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
from safetensors import safe_open

from ..config import LoraConfig, TrainConfig
from ..errors import CheckpointError
from ..rundir import FINAL_WEIGHTS, LATEST, RunDir, latest_tag, stage_weights, tag_step


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
    # The last stage's LoRA settings when it is a LoRA stage: its adapters are added before its own
    # layer (the last), on top of what it started from, as in training (model/lora.py).
    lora: LoraConfig | None = None

    @property
    def description(self) -> str:
        if not self.stages:
            return "base weights (no stage trained)"
        last = self.stages[-1] + (f" at step {self.step}" if self.step is not None else " (final)")
        if self.lora is not None:
            last += f" with LoRA r={self.lora.r}" + (f", {self.lora.quantize} base" if self.lora.quantize != "none" else "")
        return " → ".join(self.stages[:-1] + [last])


def _zero_checkpoint(path: Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) if `path` is a DeepSpeed checkpoint folder or one of its tags."""
    if (path / LATEST).is_file():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{path / LATEST} names a checkpoint that does not exist")
        return path, tag
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None


def _from_stage(run: RunDir, config: TrainConfig, name: str, zero: tuple[Path, str] | None) -> ExportSource:
    """Stage `name`'s final weights (zero=None), or one of its DeepSpeed checkpoints on top of what the
    stage started from."""
    source = ExportSource(run.path, config, lora=config.stages[name].lora)
    for path in stage_weights(run, config, name, final=zero is None):
        source.layers.append(SafetensorsLayer(path))
        source.stages.append(path.parent.parent.name)
    if zero is not None:
        source.layers.append(ZeroCheckpointLayer(*zero))
        source.stages.append(name)
        source.step = tag_step(zero[1])
    return source


def _from_run(run: RunDir, config: TrainConfig) -> ExportSource:
    """A run directory's newest result: its last complete stage, or a later stage's latest checkpoint."""
    source = ExportSource(run.path, config)  # no stage trained yet: the base weights
    for name in config.stages:
        stage_dir = run.stage(name)
        if stage_dir.is_complete:
            source = _from_stage(run, config, name, None)
            continue
        zero = _zero_checkpoint(stage_dir.checkpoints) if stage_dir.checkpoints.is_dir() else None
        if zero is not None:
            return _from_stage(run, config, name, zero)
        # this stage never ran: a run can start at a later one (`stage=finetune`)
    return source


def resolve_source(path: Path) -> ExportSource:
    path = path.resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run = RunDir.containing(path)
    config = run.read_config()
    if path == run.path:
        return _from_run(run, config)
    stage_path = next((folder for folder in (path, *path.parents) if folder.parent == run.path), None)
    if stage_path is None or stage_path.name not in config.stages:
        raise CheckpointError(f"{path} is not inside a stage folder ({', '.join(config.stages)}) of {run.path}")
    zero = _zero_checkpoint(path) if path.is_dir() else None
    if zero is None and not run.stage(stage_path.name).is_complete:
        raise CheckpointError(
            f"{stage_path} has no final weights ({FINAL_WEIGHTS}); export one of its checkpoints instead "
            f"(--checkpoint {stage_path / 'checkpoints'})"
        )
    return _from_stage(run, config, stage_path.name, zero)
