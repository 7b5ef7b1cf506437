"""Loading a trained run for inference, and the demo's question answering accuracy.

`load_trained_model` rebuilds the model from the run directory alone (its resolved config, tokenizer,
base weights and the last complete stage's weights), in one process without DeepSpeed. `answer_questions`
is `vdep eval`'s evaluation (vdep/eval/) of a model already loaded, summarised for the demo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .data.images import ImageProcessing
from .errors import CheckpointError
from .model.attention import AttentionChoice
from .model.build import build_model, load_image_processing, load_stage_weights, model_spec
from .model.llava import MultimodalSpec, VdepLlava
from .model.tokenizer import load_tokenizer
from .rundir import FINAL_WEIGHTS, RunDir, last_complete_stage, stage_weights


@dataclass
class TrainedModel:
    model: VdepLlava
    tokenizer: object
    spec: MultimodalSpec
    image_processing: ImageProcessing
    config: TrainConfig
    stage: str | None  # the stage whose model this is (None: the base weights)
    weights: list[Path]  # loaded on top of the base weights, in order

    @property
    def template(self) -> str:
        """The stage's conversation template; for the base weights the recipe's last stage's, as in export."""
        if self.stage is not None:
            return self.config.stages[self.stage].template
        return self.config.stages[self.config.last_stage].template


def resolve_stage(path: Path) -> tuple[RunDir, TrainConfig, str | None]:
    """The run directory `path` is or lies in, and the stage whose model it stands for: a stage folder
    (or anything inside it) names its stage; a run directory its last complete stage, or None when no
    stage is trained yet (the base weights: tiny random towers, or an imported Llava folder)."""
    path = path.resolve()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run = RunDir.containing(path)
    config = run.read_config()
    if path == run.path:
        return run, config, last_complete_stage(run, config)
    stage = next((folder.name for folder in (path, *path.parents) if folder.parent == run.path), None)
    if stage not in config.stages:
        raise CheckpointError(f"{path} is not inside a stage folder ({', '.join(config.stages)}) of {run.path}")
    return run, config, stage


def load_trained_model(path: Path, device: torch.device | None = None, *, allow_base: bool = False,
                       attention: str = "sdpa") -> TrainedModel:
    """The model of a run directory's last complete stage, or of the stage folder `path` names: the same
    files the exporter reads (`rundir.stage_weights`), so evaluating a run and evaluating its export see
    one model. With `allow_base`, a run with no trained stage gives its base weights (in the chat format
    of the recipe's last stage, as its export does). `attention`: the LLM's attn_implementation (`eager` returns
    attention weights, for `vdep attention-map`)."""
    run, config, stage = resolve_stage(path)
    if stage is None and not allow_base:
        raise CheckpointError(f"{path} has no completed stage (no */final/{FINAL_WEIGHTS})")
    tokenizer = load_tokenizer(run.tokenizer)
    base = run.base_paths(config.model)
    spec = model_spec(config.model, base, tokenizer)
    lora = config.stages[stage].lora if stage is not None else None
    model = build_model(config.model, spec, tokenizer, base, AttentionChoice(attention, "evaluation"), torch.float32,
                        lora=lora)
    weights = stage_weights(run, config, stage) if stage is not None else []
    if weights:
        load_stage_weights(model, weights, lora, config.model.init_seed, f"stages.{stage}.lora")
    model.to(device or torch.device("cpu")).eval()
    image_processing = load_image_processing(base, config.data.pad_to_square)
    return TrainedModel(model, tokenizer, spec, image_processing, config, stage, weights)


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
    from .eval.answerers import VdepAnswerer
    from .eval.questions import questions_from_records
    from .eval.run import answer_all

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
