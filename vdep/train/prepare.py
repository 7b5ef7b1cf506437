"""Preparing the run directory (rank 0, before any stage): the resume checks, the resolved config, the
tokenizer and the base weights (train/base_weights.py, which also imports a Llava folder)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import yaml

from ..atomic import atomic_write
from ..config import TrainConfig, config_from_dict, config_to_yaml
from ..errors import CheckpointError
from ..log import get_logger
from ..rundir import RunDir
from .base_weights import prepare_base
from .validation import prepare_validation_shards

log = get_logger("run")

# What a resumed run may change: how it logs and reports, saves and stops, which of its stages it runs, and how it
# talks to a remote store (the bytes it reads are the same whatever the retries, waits, request size and
# timeout: a TransportError's advice is to raise them and run again), not what it computes. Any other
# difference (model, data, objective, optimisation, precision, seed; and data.remote.storage_options,
# which can point at another store) would make the continued run a different run than the one
# checkpointed, so the resume is refused with the list of differences.
CHANGEABLE_ON_RESUME = (
    "stages.*.save_every", "run.log_every", "run.keep_last", "run.resume", "run.stop_timeout_s",
    "run.max_nonfinite_steps", "run.max_missing_fraction", "deepspeed.timeout_minutes", "stage",
    "stages.*.eval", "stages.*.eval.*", "run.report_to", "run.wandb.*", "run.mlflow.*", "run.alerts.*",
    "data.remote.retries", "data.remote.backoff_s", "data.remote.max_backoff_s", "data.remote.request_mb",
    "data.remote.timeout_s",
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


def check_resume_changes(run: RunDir, config: TrainConfig) -> None:
    """Refuse a resume whose config changed what the run computes; log the changes it may make."""
    # Read through the loader, so that a key added to vdep since the run began counts as its default.
    old = yaml.safe_load(config_to_yaml(config_from_dict(yaml.safe_load(run.config_file.read_text()) or {},
                                                         str(run.config_file))))
    new = yaml.safe_load(config_to_yaml(config))
    for settings in (old.get("run", {}), new.get("run", {})):  # where the run lives is not a change of it
        settings.pop("name", None)
        settings.pop("output_dir", None)
    changes = config_changes(old, new)
    old_order, new_order = list(old.get("stages") or {}), list(new.get("stages") or {})
    if set(old_order) == set(new_order) and old_order != new_order:  # the order decides what `previous` means
        changes.append(("stages (their order)", old_order, new_order))
    refused = [c for c in changes if not any(fnmatch.fnmatchcase(c[0], pattern) for pattern in CHANGEABLE_ON_RESUME)]
    if refused:
        raise CheckpointError(
            f"{run.path} holds a run with different settings, so it cannot be resumed:\n  "
            + "\n  ".join(f"{key}: {a!r} → {b!r}" for key, a, b in refused[:20])
            + "\nUse a new run.name, or restore those settings (only "
            + ", ".join(CHANGEABLE_ON_RESUME) + " may change on resume)"
        )
    for key, a, b in changes:
        log.info("resume: %s changed from %r to %r", key, a, b)


def has_results(run: RunDir, config: TrainConfig) -> bool:
    """Whether any stage of the recipe has a checkpoint or final weights in the run directory."""
    stages = [run.stage(name) for name in config.stages]
    return any(stage.is_complete or stage.latest_checkpoint() is not None for stage in stages)


def save_resolved_config(config: TrainConfig, run: RunDir) -> Path:
    atomic_write(run.config_file, (
        "# Fully resolved vdep config: every setting of this run, defaults included.\n"
        "# `vdep train THIS_FILE` reproduces the run.\n" + config_to_yaml(config)
    ))
    return run.config_file


def prepare_run_dir(config: TrainConfig, run: RunDir) -> None:
    """Rank 0: check the run directory may be (re)used, write the config, tokenizer and base weights."""
    resuming = has_results(run, config)
    if resuming and config.run.resume == "never":
        raise CheckpointError(
            f"{run.path} already holds checkpoints of this run and run.resume=never; choose a new run.name "
            "or set run.resume=auto to continue it"
        )
    if resuming and run.config_file.is_file():
        check_resume_changes(run, config)
    save_resolved_config(config, run)
    prepare_base(config.model, run, trained=resuming)
    prepare_validation_shards(config, run)
