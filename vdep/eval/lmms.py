"""`vdep eval --write-lmms-task DIR`: a local lmms-eval task for a LLaVA-format question set.

lmms-eval (the harness LLaVA-NeXT users run) then asks the same questions of an exported folder through
its `llava_hf` model, offline (docs/export.md has the command).
The task's NAME is `vdep_` and the folder's name. In it:
- NAME.jsonl: one row per question (id, question without its `<image>` marker, answer, absolute image path,
  category);
- NAME.yaml: the task (generate_until, greedy, the same max_new_tokens as `vdep eval`);
- utils.py: `doc_to_visual`, `doc_to_text`, and `process_results`, which scores with vdep's own answer
  normalisation (normalise.py's source is copied in), so the two tools' accuracies are comparable number
  for number, not only their answers.
Bad records are left out, named on the console, as `vdep eval` leaves them out.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from ..atomic import atomic_write
from ..errors import VdepError
from . import normalise
from .questions import QuestionSet

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  token: false
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  num_beams: 1
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_FUNCTIONS = '''

# ---------------------------------------------------------------- written by `vdep eval --write-lmms-task`
def doc_to_visual(doc):
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")] if doc.get("image") else []


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(answers_match(results[0].strip(), doc["answer"]))}
'''


def write_lmms_task(questions: QuestionSet, folder: Path, max_new_tokens: int, name: str | None = None) -> Path:
    """Write the task into `folder` (created); returns the task YAML."""
    # Never the folder's own name: `lmms_eval --tasks NAME` run where a folder NAME exists reads that folder's
    # YAMLs on another code path, which fails (lmms-eval 0.7.3: "'function' object has no attribute 'items'").
    name = name or "vdep_" + re.sub(r"[^A-Za-z0-9_]", "_", folder.resolve().name)
    if not questions.questions:
        raise VdepError("--write-lmms-task: the data holds no usable question")
    if folder.exists() and any(folder.iterdir()):
        raise VdepError(f"--write-lmms-task {folder} exists and is not empty; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for question in questions.questions:
        if len(question.image_files) != len(question.images):
            raise VdepError("--write-lmms-task needs a LLaVA .json/.jsonl file with image files, not a shard directory")
        if question.video is not None:
            raise VdepError(f"--write-lmms-task: record {question.id} shows a video; the task written here gives "
                            "llava_hf one image per question (vdep eval answers it)")
        if len(question.images) > 1:
            raise VdepError(f"--write-lmms-task: record {question.id} shows {len(question.images)} images; the task "
                            "written here gives llava_hf one image per question")
        rows.append(json.dumps({
            "id": question.id, "question": question.text, "answer": question.reference,
            "image": str(question.images[0].resolve()) if question.images else "", "category": question.category,  # type: ignore[union-attr]
        }))
    data = folder.resolve() / f"{name}.jsonl"
    atomic_write(data, "".join(row + "\n" for row in rows))
    atomic_write(folder / "utils.py", inspect.getsource(normalise) + TASK_FUNCTIONS)
    task = folder / f"{name}.yaml"
    atomic_write(task, TASK_YAML.format(name=name, data=data, max_new_tokens=max_new_tokens))
    return task
