"""Held-out losses during a stage (`stages.<name>.eval`).

Every `eval.every` steps and at the stage's end, every rank runs its share of the held-out set through
the model twice, without gradients: once with every sample in LLaVA mode (the text loss of every
answer) and once with every image sample in VDEP mode (the image term at every image position). So
both losses are measured on all the set's image samples whatever the stage's `mode_ratio` (with VDEP
off too), and two runs' curves compare. They are normalised like training's, by the global counts
of supervised text tokens and image positions.

Collective and ZeRO-3-safe: the ranks agree, before each forward, whether any of them still has a
micro-batch; one that has run out repeats its first micro-batch with weight zero, so every rank runs
the same forwards. A LLaVA-format file is made into shards once, by rank 0 while it prepares the run
directory, through `vdep build-shards` (its rejected records counted and named in the log, never
fatal): the held-out samples are then read, templated and preprocessed exactly as training's.

With `eval.qa` the same set's questions (first user turn) are also answered by greedy decoding in the
stage's template and scored as `vdep eval` scores them (`val/accuracy`): each rank answers its share,
every rank decodes the same number of batches and steps (`greedy_generate(synced=True)`), a rank
whose share has ended answers a question again without counting it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import StageConfig, StageEvalConfig, TrainConfig, validation_source_is_file
from ..data.batch import Batch
from ..data.conversation import SampleError
from ..data.shards import discover_shards
from ..errors import DataError
from ..eval.answerers import Prepared, VdepAnswerer, prepare
from ..eval.normalise import answers_match
from ..eval.questions import Question, load_questions
from ..log import get_logger
from ..objectives.objective import VdepObjective
from ..rundir import RunDir
from .distributed import all_reduce_max, all_reduce_sum, current_world_size
from .together import raise_together

log = get_logger("train")

STAMP_FILE = "source.json"


def prepare_validation_shards(config: TrainConfig, run: RunDir) -> None:
    """Rank 0: shards for every stage whose `eval.data` is a LLaVA file, rebuilt only when the file (or its
    image root) changed."""
    for name, stage in config.stages_to_run():
        if stage.eval is None or not validation_source_is_file(stage.eval):
            continue
        folder = validation_folder(run, name)
        wanted = _source_stamp(stage.eval)
        stamp = folder / STAMP_FILE
        if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
            continue
        from vdep.data_tools.build_shards import BuildOptions, build_shards

        shutil.rmtree(folder, ignore_errors=True)
        report = build_shards(BuildOptions(
            [Path(stage.eval.data)], Path(stage.eval.image_root), folder,  # type: ignore[arg-type]
            samples_per_shard=1000, max_error_rate=1.0, progress=False,
        ))
        log.info("stage %s: validation shards from %s in %s: %s", name, stage.eval.data, folder, report.summary())
        stamp.write_text(json.dumps(wanted))


def validation_folder(run: RunDir, stage: str) -> Path:
    return run.path / "validation" / stage


def _source_stamp(settings: StageEvalConfig) -> dict:
    data = Path(settings.data)
    return {
        "data": str(data.resolve()),
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "image_root": str(Path(settings.image_root).resolve()),  # type: ignore[arg-type]
    }


def validation_shard_dirs(run: RunDir, name: str, settings: StageEvalConfig) -> list[str]:
    return [str(validation_folder(run, name) if validation_source_is_file(settings) else Path(settings.data))]


@dataclass(frozen=True)
class ValidationResult:
    text: float  # summed text CE / supervised text tokens, every sample in LLaVA mode
    vdep: float  # summed image term / image positions, every image sample in VDEP mode
    samples: int
    text_tokens: int
    image_positions: int
    correct: int | None = None  # QA: questions answered right, of `questions` (None without eval.qa)
    questions: int = 0

    def scalars(self) -> dict[str, float]:
        scalars = {"val/loss_text": self.text, "val/loss_vdep": self.vdep, "val/samples": float(self.samples)}
        if self.correct is not None:
            scalars["val/accuracy"] = self.correct / max(self.questions, 1)
            scalars["val/questions"] = float(self.questions)
        return scalars


class ValidationQuestions:
    """This rank's share of the held-out questions (of the first `max_samples`), answered in batches."""

    def __init__(self, name: str, settings: StageEvalConfig, questions: list[Question], template: str, trained,
                 rank: int, world: int, batch_size: int):
        chosen = questions[: settings.max_samples] if settings.max_samples else questions
        self.name, self.settings, self.share, self.batch_size = name, settings, chosen[rank::world], batch_size
        self.answerer = VdepAnswerer(trained, settings.max_new_tokens, template, synced=True)

    def run(self, device: torch.device) -> tuple[int, int]:
        """Collective: (correct, questions) over every rank."""
        rounds = math.ceil(len(self.share) / self.batch_size)
        ranks_with_questions = all_reduce_sum(torch.tensor([int(rounds > 0)], dtype=torch.long, device=device))
        if int(ranks_with_questions.item()) < current_world_size():  # the same answer on every rank: all raise together
            raise DataError(f"stage {self.name}: some rank has no validation question ({self.settings.data} holds "
                            f"fewer usable questions than there are ranks, {current_world_size()})")
        most = int(all_reduce_max(float(rounds), device))
        correct = total = 0
        filler = self._prepared(self.share[:1])
        for index in range(most):
            batch = self._prepared(self.share[index * self.batch_size : (index + 1) * self.batch_size])
            answers = self.answerer.answer(batch or filler)  # every rank decodes, counted or not
            if batch:
                correct += sum(answers_match(a, item.question.reference) for a, item in zip(answers, batch))
                total += len(batch)
        summed = all_reduce_sum(torch.tensor([correct, total], dtype=torch.long, device=device)).cpu()
        return int(summed[0]), int(summed[1])

    def _prepared(self, questions: list[Question]) -> list[Prepared]:
        """Questions whose image decodes and that the model can be asked (one that cannot was named when the set
        was loaded, or is left out here: the losses' shards reject it the same way, e.g. `unsupported_video`)."""
        prepared = []
        for question in questions:
            try:
                item = prepare(question)
                self.answerer.check(item)
                prepared.append(item)
            except SampleError:
                continue
        return prepared


class Validator:
    """One stage's held-out set on this rank (its share, capped for `max_samples`), and the pass over it."""

    def __init__(self, name: str, settings: StageEvalConfig, loader, objective: VdepObjective, rank: int, world: int,
                 questions: ValidationQuestions | None = None):
        self.name, self.settings, self.loader, self.objective = name, settings, loader, objective
        self.questions = questions
        cap = settings.max_samples
        # split=samples gives this rank samples rank, rank+W, ...: of the set's first `cap`, these many.
        self.share = None if cap is None else max(0, math.ceil((cap - rank) / world))

    def due(self, step: int) -> bool:
        return bool(self.settings.every) and step % self.settings.every == 0

    def micro_batches(self) -> Iterator[Batch]:
        """This rank's micro-batches, until its share of `max_samples` is reached (whole micro-batches)."""
        taken = 0
        for batch in self.loader.micro_batches(0):
            if self.share is not None and taken >= self.share:
                return
            taken += batch.num_samples
            yield batch

    @torch.no_grad()
    def run(self, engine, device: torch.device, dtype: torch.dtype) -> ValidationResult:
        """Collective: the held-out losses of the engine's current weights."""
        engine.eval()
        try:
            totals = self._totals(engine, device, dtype)
            correct, questions = self.questions.run(device) if self.questions is not None else (None, 0)
        finally:
            engine.train()
        text_sum, text_tokens, vdep_sum, image_positions, samples = totals.tolist()
        return ValidationResult(
            text=text_sum / max(text_tokens, 1), vdep=vdep_sum / max(image_positions, 1), samples=int(samples),
            text_tokens=int(text_tokens), image_positions=int(image_positions), correct=correct, questions=questions,
        )

    def _totals(self, engine, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        totals = torch.zeros(5, dtype=torch.float64)
        batches = self.micro_batches()
        first: Batch | None = None
        while True:
            error: BaseException | None = None
            batch = None
            try:
                batch = next(batches, None)
            except Exception as exc:  # noqa: BLE001 (every rank stops with it, below)
                error = exc
            first = first or batch
            have = all_reduce_sum(torch.tensor([batch is not None, first is not None, error is not None],
                                               dtype=torch.long, device=device))
            if int(have[2]):
                raise_together(error)
            if int(have[1]) < current_world_size():  # the same answer on every rank: all raise together
                raise DataError(
                    f"stage {self.name}: some rank has no validation sample: {self.settings.data} holds fewer samples "
                    f"than there are ranks ({current_world_size()}), or stages.{self.name}.eval.max_samples is below that"
                )
            if int(have[0]) == 0:
                return all_reduce_sum(totals.to(device)).cpu()
            weight = 0.0 if batch is None else 1.0
            totals += weight * self._losses(engine, batch or first, device, dtype)  # type: ignore[arg-type]

    def _losses(self, engine, batch: Batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        llava = self.objective.prepare(batch, torch.zeros(batch.num_samples, dtype=torch.bool))
        vdep = self.objective.prepare(batch, batch.has_image.clone())
        text = engine(llava.to(device, dtype)).text
        image = engine(vdep.to(device, dtype)).vdep
        return torch.tensor([float(text), llava.num_text_targets, float(image), vdep.num_image_targets,
                             batch.num_samples], dtype=torch.float64)


def build_validator(ctx, name: str, stage: StageConfig, objective: VdepObjective, engine) -> Validator | None:
    """The stage's validator (None without `eval`): a loader over the held-out shards, every sample once,
    in order, on one consumer per rank."""
    if stage.eval is None:
        return None
    from ..model.build import model_spec
    from .setup import make_loader

    spec = model_spec(ctx.config.model, ctx.base, ctx.tokenizer)
    shards = validation_shard_dirs(ctx.run, name, stage.eval)
    discover_shards(shards, ctx.config.data.remote)  # an empty or unreadable set fails here, on every rank
    loader = make_loader(ctx, stage, spec, grad_accum_steps=1, shards=shards, validation=True)
    questions = None
    if stage.eval.qa:
        from ..evaluate import TrainedModel

        found = load_questions(Path(stage.eval.data), Path(stage.eval.image_root) if stage.eval.image_root else None)
        for bad in found.bad[:5]:
            log.info("stage %s: validation question left out: %s", name, bad.describe())
        trained = TrainedModel(engine_module(engine), ctx.tokenizer, spec, ctx.image_processing, ctx.config, name)
        questions = ValidationQuestions(name, stage.eval, found.questions, stage.template, trained, ctx.launch.rank,
                                        ctx.launch.world_size, stage.micro_batch_size)
    log.info("stage %s: validation on %s%s, every %s", name, stage.eval.data,
             f" (first {stage.eval.max_samples} samples)" if stage.eval.max_samples else "",
             f"{stage.eval.every} steps and at the end" if stage.eval.every else "stage's end")
    return Validator(name, stage.eval, loader, objective, ctx.launch.rank, ctx.launch.world_size, questions)


def engine_module(engine) -> torch.nn.Module:
    """The model inside a DeepSpeed engine (a plain module is its own)."""
    return getattr(engine, "module", engine)
