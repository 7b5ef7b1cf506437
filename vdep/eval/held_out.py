"""The demo's held-out accuracy: LLaVA records in memory, answered by a model already loaded, scored as
`vdep eval` scores them and summarised by question kind (`vdep demo`, benchmarks/vdep_ablation.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate import TrainedModel
from .answerers import VdepAnswerer
from .questions import questions_from_records
from .run import answer_all


@dataclass
class QAResult:
    """The demo's summary of an evaluation (`eval.run.EvalReport` holds every answer)."""

    correct: int = 0
    total: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    answers: list[dict] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def answer_questions(
    trained: TrainedModel,
    records: list[dict],
    image_root: Path,
    template_name: str,
    batch_size: int = 32,
    max_new_tokens: int = 10,
) -> QAResult:
    """Greedy answers to the first user turn of each record, scored as `vdep eval` scores them (VQA-normalised
    exact match with the first assistant turn); records that cannot be asked are counted in `bad`."""
    answerer = VdepAnswerer(trained, max_new_tokens, template_name)
    report = answer_all(answerer, questions_from_records(records, image_root), batch_size)
    kinds = {name: [hit, total] for name, (hit, total) in report.by_category().items()}
    if any(answer["category"] is None for answer in report.answers):
        uncategorised = [a for a in report.answers if a["category"] is None]
        kinds["all"] = [sum(a["correct"] for a in uncategorised), len(uncategorised)]
    return QAResult(report.correct, len(report.answers), kinds, report.answers, [bad.describe() for bad in report.bad])


def write_answers(result: QAResult, path: Path) -> None:
    path.write_text(json.dumps({
        "accuracy": result.accuracy,
        "by_kind": {k: v[0] / v[1] for k, v in result.by_kind.items()},
        "answers": result.answers,
        "bad_records": result.bad,
    }, indent=1))
