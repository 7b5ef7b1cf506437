"""Resumable checkpoints: what is saved, how a checkpoint is found and checked, and a stage's final weights.

A checkpoint of a stage (RUN_DIR/<stage>/checkpoints/step_00000100/) holds
    DeepSpeed's files            trainable weights, optimizer state and LR schedule, written by
                                 `engine.save_checkpoint` (torch pickles: see docs/cluster.md)
    vdep_rank00000.json          per rank, written by vdep: the trainer's state, one entry per part
                                 (`Stateful`): "train" (`TrainState`), "skips" (the skip report),
                                 "data_position" (where this rank's loader stands) and "rng" (Python,
                                 NumPy and torch RNG states)
    manifest.json                every file of the checkpoint with its size, written by rank 0 once every
                                 rank finished its files
vdep's files load without unpickling anything. Every rank writes its own, so nothing is rank 0's alone.
`checkpoints/latest` names the newest complete checkpoint: rank 0 moves it (write, rename) only after
the manifest, so a save killed half-way leaves the previous checkpoint selected.

Save and restore cannot drift apart: the trainer hands `save` its parts by name, and a restore gives
each part back what its own `state_dict` wrote (`load_state_dict`). The checkpoint to resume is decided
once, on rank 0, and told to the others (`find_resume_point`): ranks reading a shared file system at
different moments never disagree on it. Before anything is loaded, every file the manifest lists is
checked, so a checkpoint with a missing optimizer partition is refused by name instead of restarting
Adam from zero.

Checkpoints leave out frozen parameters: they are the base weights, which a resumed run loads again.
At the end of a stage its trainable weights are gathered into final/trainable.safetensors (rundir.py).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, atomic_write
from ..errors import CheckpointError, VdepError
from ..log import get_logger
from ..model.loading import gathered
from ..rundir import LATEST, StageDir, checkpoint_tag, latest_tag
from .distributed import broadcast_from_rank_zero, current_rank
from .faults import Faults
from .together import together

log = get_logger("checkpoint")

STATE_FORMAT = 2
MANIFEST = "manifest.json"
# For tests, never set in normal use: load through the universal checkpoint on the same number of ranks
# too (elastic.py). The data position is then the usual one, so the losses must equal an uninterrupted
# run's: this shows that the conversion and the load carry weights and optimizer state exactly.
UNIVERSAL_ENV = "VDEP_UNIVERSAL_RESUME"


class Stateful(Protocol):
    """A part of the trainer whose state a checkpoint holds (as torchtitan's `Stateful`): JSON-able values."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where one rank's training of a stage stands."""

    stage: str
    step: int  # optimizer steps completed
    epoch: int
    micro_batches_in_epoch: int  # consumed by this rank in `epoch`
    world_size: int
    config_fingerprint: str
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (no update)
    nonfinite_in_a_row: int = 0  # of which the latest in a row (run.max_nonfinite_steps stops the run)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key not in known:
                raise CheckpointError(f"a checkpoint's train state holds '{key}', which this vdep does not know")
            setattr(self, key, value)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class ProcessRng:
    """This process's random number generators: Python's, NumPy's, torch's (and CUDA's)."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "torch": _encode(torch.get_rng_state()),
        }
        if torch.cuda.is_available():
            state["cuda"] = _encode(torch.cuda.get_rng_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(_decode(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_decode(state["cuda"]))


def state_file(folder: Path, rank: int) -> Path:
    return folder / f"vdep_rank{rank:05d}.json"


def _legacy_rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank:05d}.safetensors"


# ------------------------------------------------------------------------------------ finding one
@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a stage continues from, checked complete: its folder, how many ranks wrote it and the
    first rank's train state. Each rank reads the states it needs itself (`state`, `states`): broadcasting
    every rank's data position to every rank would not scale."""

    folder: Path
    written_by: int
    train: dict[str, Any]  # rank 0's train state

    @property
    def step(self) -> int:
        return int(self.train["step"])

    def on_other_ranks(self, world_size: int) -> bool:
        """Whether this run continues it through DeepSpeed's universal checkpoint (elastic.py)."""
        return self.written_by != world_size or bool(os.environ.get(UNIVERSAL_ENV))

    def check_fingerprint(self, fingerprint: str) -> None:
        if self.train["config_fingerprint"] != fingerprint:
            raise CheckpointError(f"{self.folder} was written with a different model or data config; use a new run.name")

    def state(self, rank: int) -> dict[str, Any]:
        """The vdep state rank `rank` wrote (format STATE_FORMAT)."""
        return _read_state(self.folder, rank)

    def states(self) -> list[dict[str, Any]]:
        return [self.state(rank) for rank in range(self.written_by)]


def find_resume_point(checkpoints: Path, device: torch.device) -> ResumePoint | None:
    """Collective: the checkpoint `checkpoints/latest` names (None: none yet), decided and checked on rank 0
    and told to every rank; a checkpoint that is incomplete or unreadable is refused on every rank."""
    point: ResumePoint | None = None
    with together(device):
        if current_rank() == 0:
            point = read_resume_point(checkpoints)
    return broadcast_from_rank_zero(point)


def read_resume_point(checkpoints: Path) -> ResumePoint | None:
    tag = latest_tag(checkpoints) if checkpoints.is_dir() else None
    if tag is None:
        return None
    folder = checkpoints / tag
    train = _read_state(folder, 0)["train"]
    written_by = int(train["world_size"])
    for rank in range(1, written_by):
        if not state_file(folder, rank).is_file():
            raise CheckpointError(f"{state_file(folder, rank)} is missing: the checkpoint is incomplete; remove "
                                  f"{folder} (an older checkpoint is then resumed) or restore the file")
    check_complete(folder, written_by)
    return ResumePoint(folder, written_by, train)


def check_complete(folder: Path, written_by: int) -> None:
    """Every file the checkpoint needs is there, at its size; else a CheckpointError that names them."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed: dict[str, int] = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest} is unreadable ({exc}); remove {folder} to resume from the one before") from None
        missing = [name for name, size in sorted(listed.items())
                   if not (folder / name).is_file() or (folder / name).stat().st_size != size]
    else:  # written before vdep listed its files: DeepSpeed's partitions by their names
        optimizer = sorted(folder.glob("*optim_states.pt"))
        missing = [f"{written_by} optimizer partitions (*optim_states.pt; found {len(optimizer)})"] \
            if len(optimizer) != written_by else []
        if not any(folder.glob("*model_states.pt")):
            missing.append("the model states (*model_states.pt)")
    if missing:
        raise CheckpointError(
            f"{folder} is incomplete: {', '.join(missing[:8])}{' and more' if len(missing) > 8 else ''} "
            f"{'is' if len(missing) == 1 else 'are'} missing or of another size than written. Resuming it would "
            "restart the optimizer or the weights without a word. Restore the files, or remove the folder (and "
            "point checkpoints/latest at an earlier step) to resume from an earlier checkpoint"
        )


def _read_state(folder: Path, rank: int) -> dict[str, Any]:
    path = state_file(folder, rank)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        if rank == 0 and any(folder.glob("*model_states.pt")):
            raise CheckpointError(
                f"{folder} holds no {path.name}: it was written by a vdep that kept its state in DeepSpeed's client "
                "state. Resume it with that version, or start a new run.name"
            ) from None
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; remove {folder} (an older "
                              "checkpoint is then resumed) or restore the file") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); remove {folder} or restore the file") from None
    return _upgraded(saved, folder, rank)


def _upgraded(saved: dict[str, Any], folder: Path, rank: int) -> dict[str, Any]:
    """A state in this version's layout. Format 1 kept the skip counts inside "train" and the torch RNG state
    in rng_rankNNNNN.safetensors."""
    if saved.get("format") == STATE_FORMAT:
        return saved
    if saved.get("format") != 1:
        raise CheckpointError(f"{state_file(folder, rank)} has state format {saved.get('format')!r}, which this "
                              "vdep cannot read; resume with the vdep that wrote it")
    train = dict(saved["train"])
    skips = {"counts": train.pop("skipped_samples", {}), "shortfalls": train.pop("shortfalls", {})}
    rng = dict(saved["rng"])
    tensors = load_file(str(_legacy_rng_file(folder, rank)))
    rng["torch"] = _encode(tensors["torch"])
    if "cuda" in tensors:
        rng["cuda"] = _encode(tensors["cuda"])
    return {"format": STATE_FORMAT, "train": train, "skips": skips, "data_position": saved["data_position"], "rng": rng}


# ----------------------------------------------------------------------------------------- saving
class CheckpointManager:
    """Saves a stage's checkpoints and keeps the newest `keep_last` (0: all); remembers the step of the
    newest complete one in memory (`saved_step`), so no rank asks the file system whether it exists."""

    def __init__(self, stage_dir: StageDir, keep_last: int, device: torch.device, faults: Faults | None = None):
        self.folder = stage_dir.checkpoints
        self.keep_last = keep_last
        self.device = device
        self.faults = faults
        self.saved_step: int | None = None

    def save(self, engine, step: int, parts: Mapping[str, Stateful]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        tag = checkpoint_tag(step)
        engine.save_checkpoint(
            str(self.folder), tag=tag, exclude_frozen_parameters=True,
            save_latest=False,  # vdep moves the pointer itself, once every rank is done
        )
        folder = self.folder / tag
        rank = current_rank()
        with together(self.device):  # also the barrier: every rank's files are written after it
            state = {"format": STATE_FORMAT, **{name: part.state_dict() for name, part in parts.items()}}
            atomic_write(state_file(folder, rank), json.dumps(state))
            if self.faults is not None:
                self.faults.kill_in_save(step, rank, int(state["train"]["world_size"]))
        with together(self.device):
            if rank == 0:
                files = {str(path.relative_to(folder)): path.stat().st_size
                         for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}
                atomic_write(folder / MANIFEST, json.dumps({"files": files}, indent=0))
                atomic_write(self.folder / LATEST, tag)
                self._remove_old(keep=tag)
        self.saved_step = step
        return folder

    def _remove_old(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        tags = sorted(p.name for p in self.folder.glob("step_*") if p.is_dir())
        for old in tags[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(self.folder / old, ignore_errors=True)


def load_engine_checkpoint(engine, folder: Path) -> None:
    """DeepSpeed's part of a checked checkpoint, written on this run's number of ranks."""
    try:
        loaded, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    except VdepError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever DeepSpeed raises: one message that names the folder)
        raise CheckpointError(
            f"DeepSpeed could not load {folder} ({type(exc).__name__}: {str(exc)[:300]}). Remove it (and point "
            "checkpoints/latest at an earlier step) to resume from an earlier checkpoint"
        ) from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {folder}; remove it to resume from an earlier one")


# --------------------------------------------------------------------------------- final weights
def save_final_weights(engine, stage_dir: StageDir, summary: dict, device: torch.device) -> Path:
    """Collective: every trainable parameter, gathered one at a time from the optimizer's fp32 master copy
    (what a checkpoint holds and `vdep export-hf` of a checkpoint reads), so the final weights equal the last
    checkpoint's in any precision; rank 0 writes the file."""
    from deepspeed.utils import safe_get_full_fp32_param

    model: nn.Module = engine.module
    tensors = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        master = safe_get_full_fp32_param(param)  # collective under ZeRO-3
        if master is None:  # not handled by a ZeRO optimizer: the module's own value
            with gathered([param]):
                master = param.detach().float()
        if current_rank() == 0:
            tensors[name] = master.to("cpu", copy=True).contiguous()
    with together(device):  # rank 0 writes; a failure there (a full disk) stops every rank with it
        if current_rank() == 0:
            atomic_write(stage_dir.summary_file, json.dumps(summary, indent=1))
            with atomic_path(stage_dir.final_weights) as temporary:  # last: its presence means the stage is complete
                save_file(tensors, str(temporary), metadata={"stage": str(summary.get("stage", ""))})
    return stage_dir.final_weights
