"""Resumable checkpoints (`CheckpointManager`) and a stage's final weights.

A checkpoint of a stage (RUN_DIR/<stage>/checkpoints/step_00000100/) holds
    DeepSpeed's files            trainable weights, optimizer state and LR schedule, written by
                                 `engine.save_checkpoint` (torch pickles: see docs/cluster.md)
    vdep_rank00000.json          per rank, written by vdep: where training stands (`TrainState`, with
                                 this rank's skip counts), this rank's data position, and its Python and
                                 NumPy RNG states
    rng_rank00000.safetensors    per rank: the torch (and CUDA) RNG states
vdep's files load without unpickling anything. Every rank writes its own, so nothing is rank 0's
alone (DeepSpeed's client state is written by rank 0 only under ZeRO-2). `checkpoints/latest` names
the newest complete checkpoint: rank 0 moves it (write, rename) only after every rank finished its
files, so a save killed half-way leaves the previous checkpoint selected.

Checkpoints leave out frozen parameters: they are the base weights, which a resumed run loads again.
At the end of a stage its trainable weights are gathered into final/trainable.safetensors (rundir.py).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, atomic_write
from ..data.loader import DataPosition
from ..errors import CheckpointError
from ..log import get_logger
from ..model.build import gathered
from ..rundir import LATEST, StageDir, checkpoint_tag, latest_tag, tag_step
from .distributed import barrier, current_rank
from .faults import Faults

log = get_logger("checkpoint")

STATE_FORMAT = 1


@dataclass
class TrainState:
    """Where one rank's training of a stage stands."""

    stage: str
    step: int  # optimizer steps completed
    epoch: int
    micro_batches_in_epoch: int  # consumed by this rank in `epoch`
    world_size: int
    config_fingerprint: str
    skipped_samples: dict[str, int] = field(default_factory=dict)  # by this rank, by reason
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (no update)
    # Shards this rank found shorter than sizes.json says: location → [samples listed, samples held].
    shortfalls: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RestoredState:
    train: TrainState
    data_position: DataPosition | None  # None: a checkpoint written before vdep recorded positions
    folder: Path


def state_file(folder: Path, rank: int) -> Path:
    return folder / f"vdep_rank{rank:05d}.json"


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank:05d}.safetensors"


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, torch state tensors) of this process."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --------------------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves and restores a stage's checkpoints; keeps the newest `keep_last` (0: all)."""

    def __init__(self, stage_dir: StageDir, keep_last: int, faults: Faults | None = None):
        self.folder = stage_dir.checkpoints
        self.keep_last = keep_last
        self.faults = faults

    @property
    def latest_step(self) -> int | None:
        tag = latest_tag(self.folder)
        return tag_step(tag) if tag is not None else None

    def save(self, engine, state: TrainState, position: DataPosition) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        tag = checkpoint_tag(state.step)
        engine.save_checkpoint(
            str(self.folder), tag=tag, exclude_frozen_parameters=True,
            save_latest=False,  # vdep moves the pointer itself, once every rank is done
        )
        folder = self.folder / tag
        rank = current_rank()
        plain_rng, tensor_rng = rng_state()
        with atomic_path(rng_file(folder, rank)) as temporary:
            save_file(tensor_rng, str(temporary))
        atomic_write(state_file(folder, rank), json.dumps({
            "format": STATE_FORMAT, "train": asdict(state), "data_position": position.to_json(), "rng": plain_rng,
        }))
        if self.faults is not None:
            self.faults.kill_in_save(state.step, rank, state.world_size)
        barrier()  # every rank's files are written
        if rank == 0:
            atomic_write(self.folder / LATEST, tag)
            self._remove_old(keep=tag)
        barrier()
        return folder

    def _remove_old(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        tags = sorted(p.name for p in self.folder.glob("step_*") if p.is_dir())
        for old in tags[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(self.folder / old, ignore_errors=True)

    def restore(self, engine, world_size: int, fingerprint: str) -> RestoredState | None:
        """Load the latest checkpoint into `engine` and this process (None: there is none).

        vdep's own files are read and checked first, so a resume that cannot work (another number of
        ranks, another model or data) is refused before DeepSpeed tries to load its partitions.
        """
        tag = latest_tag(self.folder)
        if tag is None:
            return None
        folder = self.folder / tag
        rank = current_rank()
        own = state_file(folder, rank)
        if not own.is_file() and not state_file(folder, 0).is_file():
            return self._restore_legacy(engine, folder)
        written_by = json.loads(state_file(folder, 0).read_text())["train"]["world_size"]
        if written_by != world_size:
            raise CheckpointError(
                f"{folder} was written by {written_by} rank(s); this run has {world_size}. "
                "Resume with the same number of processes"
            )
        saved = json.loads(own.read_text())
        train = TrainState(**saved["train"])
        if train.config_fingerprint != fingerprint:
            raise CheckpointError(f"{folder} was written with a different model or data config; use a new run.name")
        engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=False)
        set_rng_state(saved["rng"], load_file(str(rng_file(folder, rank))))
        return RestoredState(train, DataPosition.from_json(saved["data_position"]), folder)

    def _restore_legacy(self, engine, folder: Path) -> RestoredState:
        """A checkpoint of vdep 0.1: the train state in DeepSpeed's client state (rank 0's under ZeRO-2),
        the data position beside it, the RNG state in a pickle (not read: it would have to be unpickled)."""
        _, client_state = engine.load_checkpoint(str(self.folder), tag=folder.name, load_module_strict=False)
        if client_state is None or "vdep" not in client_state:
            raise CheckpointError(f"{folder} is not a vdep checkpoint (no vdep_rank*.json, no vdep client state)")
        position_file = folder / f"data_rank{current_rank():05d}.json"
        position = DataPosition.from_json(json.loads(position_file.read_text())) if position_file.is_file() else None
        log.warning("%s was written by vdep 0.1: its RNG state is not restored (it is a pickle)", folder)
        return RestoredState(TrainState(**client_state["vdep"]), position, folder)


def save_final_weights(model: nn.Module, stage_dir: StageDir, summary: dict) -> Path:
    """Collective: gathers every trainable parameter (one at a time); rank 0 writes the file."""
    tensors = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with gathered([param]):
            if current_rank() == 0:
                tensors[name] = param.detach().to("cpu", copy=True).contiguous()
    if current_rank() == 0:
        atomic_write(stage_dir.summary_file, json.dumps(summary, indent=1))
        with atomic_path(stage_dir.final_weights) as temporary:  # last: its presence means the stage is complete
            save_file(tensors, str(temporary), metadata={"stage": str(summary.get("stage", ""))})
    barrier()
    return stage_dir.final_weights
