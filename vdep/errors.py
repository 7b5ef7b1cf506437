"""User-facing errors.

A `VdepError` is a problem with something the user gave us (a config, a file, a shard, a CLI argument).
Its message names the file, key or sample and says what to do; the CLI prints it without a traceback.
Anything else that escapes is a bug in vdep and keeps its traceback.
"""

from __future__ import annotations


class VdepError(Exception):
    """An error caused by user input, with a message that says how to fix it."""


class ConfigError(VdepError):
    """An invalid recipe, override or combination of settings."""


class DataError(VdepError):
    """Unusable training data (shards, sizes.json, tokenizer/template combination)."""


class CheckpointError(VdepError):
    """A missing, incomplete or incompatible checkpoint or stage artefact."""


class TrainingHalted(VdepError):
    """Training stopped itself on purpose (e.g. repeated non-finite steps), after writing a checkpoint."""


class RanksFailed(VdepError):
    """One rank met an error the others did not; every rank stops with it (train/together.py)."""


class PeerLost(VdepError):
    """A collective failed because another rank went away (its node crashed, was killed or cut off)."""


# EX_TEMPFAIL, "try again later": a stop signal made training save a checkpoint and exit; running the
# same command again continues the run. slurm/train.sbatch requeues the job on it.
EXIT_PREEMPTED = 75


class TrainingPreempted(Exception):
    """A stop signal ended training after a checkpoint; the CLI exits with EXIT_PREEMPTED."""
