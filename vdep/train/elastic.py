"""Resuming a stage on another number of ranks than its checkpoint was written on (elastic resume).

It happens by itself: when the latest checkpoint (checkpoint.find_resume_point) was written on another
number of ranks than this run has, the stage is built to load DeepSpeed's universal checkpoint
(setup.build_stage, `elastic_geometry`), and the trainer's one restore path converts and loads it
(`convert_to_universal`, `load_universal`) and gives each part of the trainer this rank's share of the old
ranks' states (`rank_state`), with these semantics (docs/cluster.md, "Resuming on a different number of ranks"):
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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import StageConfig, check_batch_geometry
from ..data.loader import DataPosition, RankGeometry, StageLoader
from ..data.remainder import epoch_remainder
from ..data.shards import resolve_split
from ..errors import CheckpointError, ConfigError, VdepError
from ..log import get_logger
from .checkpoint import ResumePoint
from .distributed import current_rank
from .together import together

log = get_logger("checkpoint")

UNIVERSAL = "universal"  # the converted copy, inside the checkpoint's folder (removed with it)
CONVERTER_OUTPUT_LINES = 15  # of ds_to_universal's output, in the error when it fails


@dataclass(frozen=True)
class ElasticGeometry:
    """How the checkpoint's run split its batches: its ranks and accumulation steps."""

    old_world: int
    old_grad_accum: int

    def geometry(self, split: str, num_shards: int, workers: int) -> RankGeometry:
        """How the checkpoint's run split its data (data.split as it resolved it for its consumers)."""
        return RankGeometry(self.old_world, self.old_grad_accum,
                            resolve_split(split, num_shards, self.old_world * max(workers, 1)))  # type: ignore[arg-type]


def elastic_geometry(point: ResumePoint, name: str, stage: StageConfig, world_size: int) -> ElasticGeometry:
    """The old run's batch geometry; refuses a global batch that does not split over this run's ranks,
    before anything is built."""
    try:
        check_batch_geometry(name, stage, world_size)
    except ConfigError as exc:
        raise CheckpointError(
            f"{point.folder} was written on {point.written_by} rank(s); continuing it on {world_size} keeps its global "
            f"batch of {stage.global_batch_size} samples, which does not split: {exc}. Run on a number of ranks that "
            "divides it (as micro-batches), or start a new run.name with other batch settings"
        ) from None
    return ElasticGeometry(point.written_by, check_batch_geometry(name, stage, point.written_by))


# ----------------------------------------------------------------------------------- the conversion
def convert_to_universal(folder: Path, device: torch.device) -> Path:
    """Collective: rank 0 converts the checkpoint into folder/universal (once); the others wait. Every
    rank raises the same error if the conversion failed."""
    target = folder / UNIVERSAL
    with together(device):
        if current_rank() == 0 and not target.is_dir():
            _convert(folder, target)
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
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(args)  # one worker: no process pool inside a process with gloo's threads
    except Exception as exc:  # noqa: BLE001 (DeepSpeed's converter raises assertions, ValueErrors, ...: one message)
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line for line in output.getvalue().splitlines() if line.strip()][-CONVERTER_OUTPUT_LINES:]
        said = "\n    ".join(lines) if lines else "(it printed nothing)"
        raise CheckpointError(
            f"{folder} could not be converted to DeepSpeed's universal checkpoint, which a resume on another number "
            f"of ranks needs ({type(exc).__name__}: {str(exc)[:300] or 'no message'}). The converter's last output:\n"
            f"    {said}\nResume on the number of ranks it was written on"
        ) from None
    partial.rename(target)
    log.info("converted %s to a universal checkpoint in %s", folder, target)


def load_universal(engine, folder: Path, universal: Path) -> None:
    """Load the universal checkpoint into `engine` (built with checkpoint.load_universal)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3's universal load gives every parameter group the settings of the first (its LR and weight
    # decay): they are put back from the groups as built (the config is unchanged on resume), the LR
    # as the restored schedule left it.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        loaded, _ = engine.load_checkpoint(str(folder), tag=universal.name, load_module_strict=False)
    except VdepError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever DeepSpeed raises, on every rank: one message)
        raise CheckpointError(
            f"DeepSpeed could not load the universal checkpoint {universal} ({type(exc).__name__}: {exc}). Remove "
            f"{universal} to convert it again, or resume on the number of ranks {folder} was written on"
        ) from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found nothing to load in {universal}; remove it to convert {folder} again")
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


# --------------------------------------------------------------------------------- the trainer's state
def rank_state(point: ResumePoint, old: ElasticGeometry, loader: StageLoader, split: str, world: int, rank: int,
               grad_accum: int) -> dict[str, Any]:
    """This rank's share of the old ranks' states, part by part (checkpoint.Stateful): the step, epoch and
    counts of the old run; new rank 0 carries every old rank's skip counts and short shards (the totals over
    ranks stay); the RNG of old rank `rank` (none beyond the old number: a fresh start's seeding); and the
    data: the epoch's samples no old consumer consumed, dealt to this run's consumers."""
    if old.old_world == world:  # UNIVERSAL_ENV: the same consumers, each rank's own state and position
        return point.state(rank)
    states = point.states()
    first = states[0]["train"]
    steps_in_epoch = first["micro_batches_in_epoch"] // old.old_grad_accum
    train = {**first, "world_size": world, "micro_batches_in_epoch": steps_in_epoch * grad_accum}
    counts: dict[str, int] = {}
    shortfalls: dict[str, list[int]] = {}
    for state in states:
        for reason, count in state["skips"]["counts"].items():
            counts[reason] = counts.get(reason, 0) + count
        shortfalls.update(state["skips"]["shortfalls"])
    skips = {"counts": counts, "shortfalls": shortfalls} if rank == 0 else {"counts": {}, "shortfalls": {}}
    position = DataPosition(train["epoch"])
    if first["micro_batches_in_epoch"]:  # mid-epoch: deal the epoch's rest to this run's consumers
        old_positions = [DataPosition.from_json(state["data_position"]) for state in states]
        geometry = old.geometry(split, len(loader.stream.shards), loader.num_workers)
        remainder = epoch_remainder(loader.stream, train["epoch"], old.old_world, geometry.split, old_positions,
                                    str(point.folder))
        position = DataPosition(train["epoch"], train["micro_batches_in_epoch"], 0, {}, remainder)
    log.info("%s (written on %d rank(s)) continues on %d: %d accumulation step(s) instead of %d, %d of the epoch's "
             "samples read but not consumed are dealt first", point.folder, old.old_world, world, grad_accum,
             old.old_grad_accum, len(position.remainder.pending) if position.remainder else 0)
    state = {"train": train, "skips": skips, "data_position": position.to_json()}
    if rank < old.old_world:
        state["rng"] = states[rank]["rng"]
    return state
