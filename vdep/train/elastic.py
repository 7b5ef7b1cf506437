"""Resuming a stage on another number of ranks than its checkpoint was written on (elastic resume).

It happens by itself: when the latest checkpoint's ranks (vdep_rank*.json) differ from this run's,
`find_elastic_resume` (before the engine is built) and `restore_elastic` (instead of the usual restore)
continue the stage with these semantics (docs/cluster.md, "Resuming on a different number of ranks"):
- weights and optimizer state exactly, through DeepSpeed's universal checkpoint: rank 0 converts the
  checkpoint once (ds_to_universal) into its `universal/` folder (written aside, then renamed, so a
  conversion killed half-way is redone), the other ranks wait, every rank loads its new partition
  (`checkpoint.load_universal`);
- the global batch is kept: accumulation steps follow from the new number of ranks, and a global
  batch that does not split is refused; the step count, the LR schedule and the stage's planned
  length continue as the checkpoint's run planned them;
- the data: the epoch's samples that no old consumer consumed are dealt to the new consumers
  (data/remainder.py), so none is lost or seen twice; the order differs from the uninterrupted run's;
- RNG: new rank r continues old rank r's RNG states where there was one; a rank beyond the old number
  keeps the seeding of a fresh start (setup.seed_torch: the run's seed, the stage, the rank);
- skip counts and short shards of every old rank are carried by new rank 0, so the run's totals stay.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import StageConfig, check_batch_geometry
from ..data.loader import DataPosition, RankGeometry, StageLoader
from ..data.remainder import epoch_remainder
from ..data.shards import resolve_split
from ..errors import CheckpointError, ConfigError, VdepError
from ..log import get_logger
from ..rundir import latest_tag
from .checkpoint import RestoredState, TrainState, rng_file, set_rng_state, state_file
from .distributed import all_reduce_max, current_rank, current_world_size

log = get_logger("checkpoint")

UNIVERSAL = "universal"  # the converted copy, inside the checkpoint's folder (removed with it)
# For tests, never set in normal use: load through the universal checkpoint on the same number of ranks
# too. The data position is then the usual one, so the losses must equal an uninterrupted run's: this
# shows that the conversion and the load carry weights and optimizer state exactly.
UNIVERSAL_ENV = "VDEP_UNIVERSAL_RESUME"


@dataclass(frozen=True)
class ElasticResume:
    """A latest checkpoint written on another number of ranks than this run has."""

    folder: Path
    old_world: int
    old_grad_accum: int

    def geometry(self, split: str, num_shards: int, workers: int) -> RankGeometry:
        """How the checkpoint's run split its data (data.split as it resolved it for its consumers)."""
        return RankGeometry(self.old_world, self.old_grad_accum,
                            resolve_split(split, num_shards, self.old_world * max(workers, 1)))  # type: ignore[arg-type]


def find_elastic_resume(checkpoints: Path, name: str, stage: StageConfig, world_size: int) -> ElasticResume | None:
    """The elastic resume this stage needs (None: no checkpoint, or one of this many ranks). Refuses a
    global batch that does not split over this run's ranks, before anything is built."""
    tag = latest_tag(checkpoints)
    if tag is None or not state_file(checkpoints / tag, 0).is_file():
        return None  # nothing to resume, or a vdep 0.1 checkpoint (CheckpointManager refuses it)
    folder = checkpoints / tag
    old_world = int(_read_state(folder, 0)["train"]["world_size"])
    if old_world == world_size and not os.environ.get(UNIVERSAL_ENV):
        return None
    try:
        check_batch_geometry(name, stage, world_size)
    except ConfigError as exc:
        raise CheckpointError(
            f"{folder} was written on {old_world} rank(s); continuing it on {world_size} keeps its global batch "
            f"of {stage.global_batch_size} samples, which does not split: {exc}. Run on a number of ranks that "
            "divides it (as micro-batches), or start a new run.name with other batch settings"
        ) from None
    return ElasticResume(folder, old_world, check_batch_geometry(name, stage, old_world))


def _read_state(folder: Path, rank: int) -> dict:
    path = state_file(folder, rank)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; remove {folder} (an older "
                              "checkpoint is then resumed) or restore the file") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); remove {folder} or restore the file") from None


# ----------------------------------------------------------------------------------- the conversion
def convert_to_universal(folder: Path, device: torch.device) -> Path:
    """Collective: rank 0 converts the checkpoint into folder/universal (once); the others wait. Every
    rank raises the same CheckpointError if the conversion failed."""
    target = folder / UNIVERSAL
    error = ""
    if current_rank() == 0 and not target.is_dir():
        try:
            _convert(folder, target)
        except Exception as exc:  # noqa: BLE001 (DeepSpeed's converter raises assertions, ValueErrors, ...: one message)
            error = f"{type(exc).__name__}: {exc}"
            log.error("converting %s to a universal checkpoint failed: %s", folder, error)
    if all_reduce_max(1.0 if error else 0.0, device):
        raise CheckpointError(
            f"{folder} could not be converted to DeepSpeed's universal checkpoint, which a resume on another number "
            f"of ranks needs ({error or 'on rank 0: see its log'}). Resume on the number of ranks it was written on"
        )
    return target


def _convert(folder: Path, target: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a conversion killed half-way
    # vdep writes no tensor- or pipeline-parallel layout: the universal info DeepSpeed asks the client
    # for would only hold its version, which `inject_missing_state` adds.
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        ds_to_universal(args)  # one worker: no process pool inside a process with gloo's threads
    partial.rename(target)
    log.info("converted %s to a universal checkpoint in %s", folder, target)


# -------------------------------------------------------------------------------------- restoring
def restore_elastic(engine, resume: ElasticResume, loader: StageLoader, split: str, fingerprint: str,
                    grad_accum: int, device: torch.device) -> RestoredState:
    """Collective: load the checkpoint written on `resume.old_world` ranks into this run's ranks."""
    folder, world, rank = resume.folder, current_world_size(), current_rank()
    states = [_read_state(folder, old) for old in range(resume.old_world)]
    first = TrainState(**states[0]["train"])
    if first.config_fingerprint != fingerprint:
        raise CheckpointError(f"{folder} was written with a different model or data config; use a new run.name")
    universal = convert_to_universal(folder, device)
    load_universal(engine, folder, universal)
    if rank < resume.old_world:
        set_rng_state(states[rank]["rng"], load_file(str(rng_file(folder, rank))))
    if resume.old_world == world:  # UNIVERSAL_ENV: the same consumers, each rank's own state and position
        own = states[rank]
        position = DataPosition.from_json(own["data_position"]) if own.get("data_position") else None
        return RestoredState(TrainState(**own["train"]), position, folder)
    train = _merged_train_state(first, [TrainState(**s["train"]) for s in states], resume, world, rank, grad_accum)
    position = DataPosition(train.epoch)
    if first.micro_batches_in_epoch:  # mid-epoch: deal the epoch's rest to this run's consumers
        if any(s.get("data_position") is None for s in states):
            raise CheckpointError(f"{folder} records no data position (vdep 0.1); resume on {resume.old_world} rank(s)")
        old_positions = [DataPosition.from_json(s["data_position"]) for s in states]
        geometry = resume.geometry(split, len(loader.stream.shards), loader.num_workers)
        remainder = epoch_remainder(loader.stream, train.epoch, resume.old_world, geometry.split, old_positions, str(folder))
        position = DataPosition(train.epoch, train.micro_batches_in_epoch, 0, {}, remainder)
    log.info("%s (written on %d rank(s)) continues on %d: %d accumulation step(s) instead of %d, %d of the epoch's "
             "samples read but not consumed are dealt first", folder, resume.old_world, world, grad_accum,
             resume.old_grad_accum, len(position.remainder.pending) if position.remainder else 0)
    return RestoredState(train, position, folder)


def load_universal(engine, folder: Path, universal: Path) -> None:
    """Load the universal checkpoint into `engine` (built with checkpoint.load_universal)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3's universal load gives every parameter group the settings of the first (its LR and weight
    # decay): they are put back from the groups as built (the config is unchanged on resume), the LR
    # as the restored schedule left it.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        engine.load_checkpoint(str(folder), tag=universal.name, load_module_strict=False)
    except VdepError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever DeepSpeed raises, on every rank: one message)
        raise CheckpointError(
            f"DeepSpeed could not load the universal checkpoint {universal} ({type(exc).__name__}: {exc}). Remove "
            f"{universal} to convert it again, or resume on the number of ranks {folder} was written on"
        ) from None
    last_lrs = engine.lr_scheduler.get_last_lr()
    for group, built, lr in zip(optimizer.param_groups, settings, last_lrs, strict=True):
        group.update(built)
        group["lr"] = lr
    # ZeRO-3's universal load gives every parameter group the same `step` tensor, which torch's Adam
    # increments in place once per group: the second group's bias correction would run a step ahead
    # (measured: losses 2e-3 off the uninterrupted run's after one step). A tensor of its own for each.
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _merged_train_state(first: TrainState, old: list[TrainState], resume: ElasticResume, world: int, rank: int,
                        grad_accum: int) -> TrainState:
    """This rank's train state: the step, epoch and counts of the old run; new rank 0 carries every old
    rank's skip counts and short shards (the totals over ranks stay the same)."""
    skipped: dict[str, int] = {}
    shortfalls: dict[str, list[int]] = {}
    for state in old:
        for reason, count in state.skipped_samples.items():
            skipped[reason] = skipped.get(reason, 0) + count
        shortfalls.update(state.shortfalls)
    steps_in_epoch = first.micro_batches_in_epoch // resume.old_grad_accum
    return replace(first, world_size=world, micro_batches_in_epoch=steps_in_epoch * grad_accum,
                   skipped_samples=skipped if rank == 0 else {}, shortfalls=shortfalls if rank == 0 else {})
