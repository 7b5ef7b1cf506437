"""A record of the samples every step trained on, for tests that count them (never set in normal use).

With VDEP_SAMPLE_LOG=FOLDER, each rank appends one JSON line per optimizer step to
FOLDER/rankNNNNN.jsonl: {"stage", "step", "epoch", "keys"} with the keys of the samples of this rank's
micro-batches of that step (a packed row's samples included). The elastic-resume tests use it to show
that every sample of an epoch is trained on exactly once across a change of the number of ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.batch import Batch

ENV = "VDEP_SAMPLE_LOG"


@dataclass(frozen=True)
class SampleLog:
    file: Path | None  # None: not recording

    @classmethod
    def from_env(cls, rank: int) -> SampleLog:
        folder = os.environ.get(ENV, "").strip()
        if not folder:
            return cls(None)
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"rank{rank:05d}.jsonl")

    def record(self, stage: str, step: int, epoch: int, batches: list[Batch]) -> None:
        if self.file is None:
            return
        keys = [key for batch in batches for key in batch.keys]
        with self.file.open("a") as handle:  # a line per step: a killed rank leaves whole lines before it
            handle.write(json.dumps({"stage": stage, "step": step, "epoch": epoch, "keys": keys}) + "\n")
