"""Loading a trained run for inference, and exact-match question answering accuracy.

`load_trained_model` rebuilds the model from the run directory alone (its resolved config, tokenizer,
base weights and the last complete stage's weights), in one process without DeepSpeed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import STAGE_NAMES, TrainConfig
from .data.conversation import Turn, parse_conversation
from .data.images import ImageProcessing, decode_image, preprocess_image
from .data.templates import ConversationTemplate, TemplateTokenizer, make_template
from .errors import CheckpointError
from .model.attention import AttentionChoice
from .model.build import build_model, load_image_processing, load_stage_weights, model_spec
from .model.generate import greedy_generate
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
            return getattr(self.config.stages, self.stage).template
        defined = [name for name in STAGE_NAMES if getattr(self.config.stages, name) is not None]
        return getattr(self.config.stages, defined[-1]).template


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
    if stage not in STAGE_NAMES or getattr(config.stages, stage) is None:
        raise CheckpointError(f"{path} is not inside a stage folder ({', '.join(STAGE_NAMES)}) of {run.path}")
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
    lora = getattr(config.stages, stage).lora if stage is not None else None
    model = build_model(config.model, spec, tokenizer, base, AttentionChoice(attention, "evaluation"), torch.float32,
                        lora=lora)
    weights = stage_weights(run, config, stage) if stage is not None else []
    if weights:
        load_stage_weights(model, weights, lora, config.model.init_seed, f"stages.{stage}.lora")
    model.to(device or torch.device("cpu")).eval()
    image_processing = load_image_processing(base, config.data.pad_to_square)
    return TrainedModel(model, tokenizer, spec, image_processing, config, stage, weights)


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@dataclass
class QAResult:
    correct: int = 0
    total: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    answers: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def _prompt(template: ConversationTemplate, encoder: TemplateTokenizer, turns: list[Turn], has_image: bool) -> list[int]:
    return encoder.encode(template.prompt_segments(turns, has_image)).input_ids


def answer_questions(
    trained: TrainedModel,
    records: list[dict],
    image_root: Path,
    template_name: str,
    batch_size: int = 32,
    max_new_tokens: int = 10,
) -> QAResult:
    """Greedy answers to the last user turn of each record, scored by exact match with the reference."""
    tokenizer = trained.tokenizer
    template = make_template(template_name, tokenizer)
    encoder = TemplateTokenizer(tokenizer, trained.spec.image_token_id, trained.spec.num_image_tokens)
    device = next(trained.model.parameters()).device
    result = QAResult()
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts, images = [], []
        for record in chunk:
            turns = parse_conversation(record["conversations"])
            has_image = "image" in record
            prompts.append(_prompt(template, encoder, turns[:-1], has_image))
            if has_image:
                image = decode_image((image_root / record["image"]).read_bytes(), record["image"])
                images.append(preprocess_image(image, trained.image_processing))
        pixel_values = torch.stack(images) if images else torch.zeros((1, 3, *trained.image_processing.output_size))
        outputs = greedy_generate(
            trained.model, prompts, pixel_values.to(device), len(images), max_new_tokens,
            template.stop_token_ids, tokenizer.pad_token_id,
        )
        for record, output in zip(chunk, outputs):
            text = tokenizer.decode(output, skip_special_tokens=True)
            if template.stop_text:
                text = text.split(template.stop_text)[0]
            reference = record["conversations"][-1]["value"]
            hit = normalise_answer(text) == normalise_answer(reference)
            kind = record.get("kind", "all")
            result.correct += hit
            result.total += 1
            result.by_kind[kind][0] += hit
            result.by_kind[kind][1] += 1
            result.answers.append({"id": record.get("id"), "kind": kind, "answer": text, "reference": reference, "correct": hit})
    return result


def write_answers(result: QAResult, path: Path) -> None:
    path.write_text(json.dumps({
        "accuracy": result.accuracy,
        "by_kind": {k: v[0] / v[1] for k, v in result.by_kind.items()},
        "answers": result.answers,
    }, indent=1))
