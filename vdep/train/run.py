"""`vdep train`: set up the process group and the run directory, then run the stages in order.

RUN_DIR (run.output_dir/run.name) holds:
    config.yaml       the fully resolved config
    logs/train.log    rank 0's log
    tokenizer/        the prepared tokenizer (with <image> and pad)
    base/             random-init base weights (tiny models) and the projector's initial weights
    tensorboard/<stage>/  event files
    <stage>/checkpoints/, <stage>/final/   see checkpoint.py
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ..config import TrainConfig, check_batch_geometry, config_to_yaml, save_resolved_config
from ..errors import CheckpointError, VdepError
from ..log import get_logger, setup_logging
from ..model.build import BasePaths, load_image_processing, materialize_base
from ..model.tokenizer import load_tokenizer, prepare_tokenizer
from .checkpoint import latest_tag, stage_is_complete
from .deepspeed_config import resolve_precision
from .distributed import all_reduce_max, barrier, detect_launch, init_distributed
from .faults import Faults
from .preemption import StopRequest
from .stage import RunContext, run_stage

log = get_logger("run")


def on_rank_zero(action: Callable[[], None], rank: int, device: torch.device) -> None:
    """Run `action` on rank 0 only; if it fails, every rank fails (none is left waiting at a barrier)."""
    error: BaseException | None = None
    if rank == 0:
        try:
            action()
        except Exception as exc:  # re-raised below, after the other ranks know
            error = exc
    failed = all_reduce_max(1.0 if error is not None else 0.0, device)
    if error is not None:
        raise error
    if failed:
        raise VdepError("rank 0 failed while preparing the run directory (its error is above)")


# What a resumed run may change: how it logs, saves and stops, not what it computes. Any other
# difference (model, data, objective, optimisation, precision, seed) would make the continued run
# a different run than the one checkpointed, so the resume is refused with the list of differences.
CHANGEABLE_ON_RESUME = (
    "stages.*.save_every", "run.log_every", "run.keep_last", "run.resume", "run.stop_timeout_s",
    "run.max_nonfinite_steps", "deepspeed.timeout_minutes", "stage",
)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every leaf that differs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append((f"{prefix}{key}", a, b))
    return changed


def check_resume_changes(previous: Path, config: TrainConfig) -> None:
    """Refuse a resume whose config changed what the run computes; log the changes it may make."""
    old = yaml.safe_load(previous.read_text()) or {}
    new = yaml.safe_load(config_to_yaml(config))
    for settings in (old.get("run", {}), new.get("run", {})):  # where the run lives is not a change of it
        settings.pop("name", None)
        settings.pop("output_dir", None)
    changes = config_changes(old, new)
    refused = [c for c in changes if not any(fnmatch.fnmatchcase(c[0], pattern) for pattern in CHANGEABLE_ON_RESUME)]
    if refused:
        raise CheckpointError(
            f"{previous.parent} holds a run with different settings, so it cannot be resumed:\n  "
            + "\n  ".join(f"{key}: {a!r} → {b!r}" for key, a, b in refused[:20])
            + "\nUse a new run.name, or restore those settings (only "
            + ", ".join(CHANGEABLE_ON_RESUME) + " may change on resume)"
        )
    for key, a, b in changes:
        log.info("resume: %s changed from %r to %r", key, a, b)


def prepare_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Rank 0: check the run directory may be (re)used, write the config, tokenizer and base weights."""
    stage_dirs = [run_dir / name for name, _ in config.stages_to_run()]
    has_results = any(stage_is_complete(d) or latest_tag(d / "checkpoints") for d in stage_dirs)
    previous = run_dir / "config.yaml"
    if has_results and config.run.resume == "never":
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of this run and run.resume=never; choose a new run.name "
            "or set run.resume=auto to continue it"
        )
    if has_results and previous.is_file():
        check_resume_changes(previous, config)
    save_resolved_config(config, run_dir)
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer = prepare_tokenizer(config.model.tokenizer_source())  # type: ignore[arg-type]
        tmp = tokenizer_dir.with_name("tokenizer.tmp")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, tokenizer_dir)
    materialize_base(config.model, load_tokenizer(tokenizer_dir), run_dir)


def train(config: TrainConfig) -> list[dict]:
    # From the start, SIGUSR1/SIGTERM only raise a flag: training stops with a checkpoint at the next
    # step boundary (a signal during setup stops after the first step), never half-way through a save.
    with StopRequest(config.run.stop_timeout_s) as stop:
        return _train(config, stop)


def _train(config: TrainConfig, stop: StopRequest) -> list[dict]:
    launch = detect_launch()
    device = init_distributed(launch, config.deepspeed.timeout_minutes)
    run_dir = config.run.directory
    setup_logging(launch.rank, launch.world_size, run_dir / "logs" / "train.log" if launch.rank == 0 else None)
    for name, stage in config.stages_to_run():
        check_batch_geometry(name, stage, launch.world_size)  # fail before anything heavy
    precision = resolve_precision(config.deepspeed.precision, device)
    faults = Faults.from_env()
    log.info(
        "vdep train: %d rank(s) via %s, device %s, precision %s, run directory %s",
        launch.world_size, launch.launcher, device, precision, run_dir,
    )
    on_rank_zero(lambda: prepare_run_dir(config, run_dir), launch.rank, device)
    barrier()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    base = BasePaths.for_run(config.model, run_dir)
    context = RunContext(
        config=config,
        launch=launch,
        device=device,
        run_dir=run_dir,
        tokenizer=tokenizer,
        base=base,
        image_processing=load_image_processing(base, config.data.pad_to_square),
        precision=precision,
        stop=stop,
        faults=faults,
    )
    summaries = [run_stage(context, name, stage) for name, stage in config.stages_to_run()]
    barrier()
    log.info("vdep train: finished; run directory %s", run_dir)
    return summaries
