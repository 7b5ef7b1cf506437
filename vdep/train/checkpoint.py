"""Resumable checkpoints and the stage's final weights.

Layout of a stage directory (RUN_DIR/<stage>/):
    checkpoints/step_00000100/   DeepSpeed engine state (trainable weights, optimizer, LR schedule),
                                 vdep's client state, and one RNG file per rank
    checkpoints/latest           the tag of the newest complete checkpoint: written by rank 0 (tmp file,
                                 then rename) only after every rank finished its files, so a save
                                 killed half-way leaves the previous checkpoint selected
    final/trainable.safetensors  the stage's trainable weights, gathered (what the next stage, the
                                 evaluation and the exporter read)
    final/summary.json           steps, final losses, skipped samples

Checkpoints leave out frozen parameters: they are the base weights, which a resumed run loads again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..config import STAGE_NAMES, TrainConfig
from ..errors import CheckpointError
from ..model.build import gathered
from .distributed import barrier
from .faults import Faults

FINAL_WEIGHTS = "trainable.safetensors"
SUMMARY = "summary.json"


@dataclass
class TrainState:
    """vdep's part of a checkpoint: where training stands."""

    stage: str
    step: int  # optimizer steps completed
    epoch: int
    micro_batches_in_epoch: int  # consumed by this rank in `epoch`
    world_size: int
    config_fingerprint: str
    skipped_samples: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (no update)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(checkpoints: Path) -> str | None:
    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoints / tag).is_dir() else None


def data_position_file(folder: Path, rank: int) -> Path:
    return folder / f"data_rank{rank:05d}.json"


def read_data_position(folder: Path) -> dict | None:
    """This rank's loader position in a checkpoint (None for a checkpoint written without one)."""
    path = data_position_file(folder, _rank())
    return json.loads(path.read_text()) if path.is_file() else None


def save_checkpoint(engine, checkpoints: Path, state: TrainState, keep_last: int, faults: Faults | None = None,
                    data_position: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = checkpoint_tag(state.step)
    engine.save_checkpoint(
        str(checkpoints), tag=tag, client_state={"vdep": asdict(state)}, exclude_frozen_parameters=True,
        save_latest=False,  # vdep moves the pointer itself, once every rank is done
    )
    folder = checkpoints / tag
    torch.save(_rng_state(), folder / f"rng_rank{_rank():05d}.pt")
    if data_position is not None:
        data_position_file(folder, _rank()).write_text(json.dumps(data_position))
    if faults is not None:
        faults.kill_in_save(state.step, _rank(), state.world_size)
    barrier()  # every rank's files are written
    if _rank() == 0:
        pointer = checkpoints / "latest"
        tmp = pointer.with_name("latest.tmp")
        tmp.write_text(tag)
        os.replace(tmp, pointer)
        if keep_last > 0:
            tags = sorted(p.name for p in checkpoints.glob("step_*") if p.is_dir())
            for old in tags[:-keep_last]:
                if old != tag:
                    shutil.rmtree(checkpoints / old, ignore_errors=True)
    barrier()
    return folder


def load_checkpoint(engine, checkpoints: Path, tag: str) -> TrainState:
    _, client_state = engine.load_checkpoint(str(checkpoints), tag=tag, load_module_strict=False)
    if client_state is None or "vdep" not in client_state:
        raise CheckpointError(f"{checkpoints / tag} is not a vdep checkpoint (no vdep client state)")
    rng_file = checkpoints / tag / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(**client_state["vdep"])


def save_final_weights(model: nn.Module, final_dir: Path, summary: dict) -> Path:
    """Collective: gathers every trainable parameter (one at a time); rank 0 writes the file."""
    tensors = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with gathered([param]):
            if _rank() == 0:
                tensors[name] = param.detach().to("cpu", copy=True).contiguous()
    path = final_dir / FINAL_WEIGHTS
    if _rank() == 0:
        final_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"stage": str(summary.get("stage", ""))})
        (final_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)  # the weights file appears last: its presence means the stage is complete
    barrier()
    return path


def stage_is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "final" / FINAL_WEIGHTS).is_file()


def read_summary(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "final" / SUMMARY).read_text())


def starting_weights(config: TrainConfig, run_dir: Path, name: str) -> list[Path]:
    """Final weights to load, in order, on top of the base model before stage `name` starts.

    `init_from: previous` means every earlier stage of this run (each must be complete), `none` means
    nothing, and a path names one stage result (its folder, its final/ folder or the file itself).
    """
    stage = getattr(config.stages, name)
    if stage.init_from == "none":
        return []
    if stage.init_from == "previous":
        files = []
        for earlier in STAGE_NAMES[: STAGE_NAMES.index(name)]:
            if getattr(config.stages, earlier) is None:
                continue
            stage_dir = run_dir / earlier
            if not stage_is_complete(stage_dir):
                raise CheckpointError(
                    f"stage {name} starts from the {earlier} stage's result, but {stage_dir / 'final'} has none; "
                    f"run stage={earlier} first, or set stages.{name}.init_from=none (or to another run's result)"
                )
            files.append(stage_dir / "final" / FINAL_WEIGHTS)
        return files
    path = Path(stage.init_from)
    for candidate in (path, path / FINAL_WEIGHTS, path / "final" / FINAL_WEIGHTS):
        if candidate.is_file():
            return [candidate]
    raise CheckpointError(
        f"stages.{name}.init_from={stage.init_from}: no {FINAL_WEIGHTS} there (give a stage folder, its final/ "
        "folder or the file itself)"
    )
