"""`vdep eval`: answer a question set with a model, score it, write every answer.

Accuracy is exact match after `normalise.normalise_answer` (the VQA convention), over the questions that
could be asked; records that could not (`questions.BadRecord`) are counted and named beside it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..data.conversation import SampleError
from ..data_tools.media import VideoSampling
from ..errors import VdepError
from .answerers import HFAnswerer, VdepAnswerer, make_answerer, prepare
from .normalise import answers_match
from .questions import BUILD_VIDEO_SAMPLING, BadRecord, QuestionSet, load_questions

Answerer = VdepAnswerer | HFAnswerer

# Bad records named on the console; all of them are in the answers file's summary line.
MAX_NAMED_BAD = 10


@dataclass
class EvalReport:
    model: str
    answers: list[dict] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def correct(self) -> int:
        return sum(answer["correct"] for answer in self.answers)

    @property
    def accuracy(self) -> float:
        return self.correct / max(len(self.answers), 1)

    def by_category(self) -> dict[str, tuple[int, int]]:
        """category → (correct, questions), for answers whose record has a category."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for answer in self.answers:
            if answer.get("category") is not None:
                counts[answer["category"]][0] += answer["correct"]
                counts[answer["category"]][1] += 1
        return {name: (hit, total) for name, (hit, total) in sorted(counts.items())}

    def summary(self) -> str:
        lines = [f"model: {self.model}",
                 f"accuracy: {100 * self.accuracy:.1f}% ({len(self.answers)} questions)"]
        for name, (hit, total) in self.by_category().items():
            lines.append(f"  {name}: {100 * hit / total:.1f}% ({total} questions)")
        if self.bad:
            lines.append(f"bad records (not asked): {len(self.bad)}")
            lines += [f"  {bad.describe()}" for bad in self.bad[:MAX_NAMED_BAD]]
            if len(self.bad) > MAX_NAMED_BAD:
                lines.append(f"  ... and {len(self.bad) - MAX_NAMED_BAD} more (all in the answers file)")
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def evaluate(model: Path, questions: QuestionSet, batch_size: int = 16, max_new_tokens: int = 16,
             device: torch.device | None = None) -> EvalReport:
    if batch_size < 1:
        raise VdepError(f"--batch-size must be at least 1, not {batch_size}")
    started = time.monotonic()
    report = answer_all(make_answerer(model, device or default_device(), max_new_tokens), questions, batch_size)
    report.seconds = time.monotonic() - started
    return report


def answer_all(answerer: Answerer, questions: QuestionSet, batch_size: int) -> EvalReport:
    """Every question answered in batches and scored; images or videos that do not decode, and questions the
    model cannot be asked, become bad records."""
    report = EvalReport(answerer.description, bad=list(questions.bad))
    pending = questions.questions
    for start in range(0, len(pending), batch_size):
        batch = []
        for question in pending[start : start + batch_size]:
            try:
                item = prepare(question)
                answerer.check(item)  # e.g. a video for an export whose class takes none
                batch.append(item)
            except SampleError as exc:
                report.bad.append(BadRecord(question.where, question.id, f"{exc.reason}: {exc}"))
        if not batch:
            continue
        for item, answer in zip(batch, answerer.answer(batch)):
            question = item.question
            report.answers.append({
                "id": question.id, "question": question.question, "answer": answer, "reference": question.reference,
                "correct": answers_match(answer, question.reference), "category": question.category,
            })
    return report


def write_answers(report: EvalReport, path: Path) -> None:
    """One JSON line per answer, then nothing else: a bad record is a line with `bad` instead of an answer."""
    lines = [json.dumps(answer) for answer in report.answers]
    lines += [json.dumps({"id": bad.record_id, "bad": bad.reason, "where": bad.where}) for bad in report.bad]
    atomic_write(path, "".join(line + "\n" for line in lines))


def run_eval(model: Path, data: Path, image_root: Path | None, out: Path | None, batch_size: int,
             max_new_tokens: int, video: VideoSampling = BUILD_VIDEO_SAMPLING) -> EvalReport:
    report = evaluate(model, load_questions(data, image_root, video), batch_size, max_new_tokens)
    if out is not None:
        write_answers(report, out)
    return report
