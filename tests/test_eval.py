"""`vdep eval`: answers of a run directory, of its Hugging Face export, and of transformers' own generate agree;
VQA normalisation; bad records counted and named; the lmms-eval task it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vdep.config import load_config
from vdep.eval.lmms import write_lmms_task
from vdep.eval.normalise import normalise_answer
from vdep.eval.questions import load_questions
from vdep.eval.run import evaluate, run_eval
from vdep.export.hf import export_hf
from vdep.rundir import RunDir
from vdep.train.prepare import prepare_run_dir


@pytest.fixture(scope="module")
def untrained_run(small_data, tmp_path_factory) -> Path:
    """A prepared run directory of the tiny model (random weights, no stage trained: eval reads its base
    weights, export writes them), made without training so the test needs no DeepSpeed ranks."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    prepare_run_dir(load_config("demo-tiny", small_data.overrides(run_dir)), RunDir(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def exported(untrained_run, tmp_path_factory) -> Path:
    return export_hf(untrained_run, tmp_path_factory.mktemp("eval-export") / "hf", dtype="fp32").out


def transformers_answers(folder: Path, records: list[dict], image_root: Path, max_new_tokens: int) -> list[str]:
    """transformers' own generate on the export, one question at a time (no padding), as a user runs it."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    answers = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(message, add_generation_prompt=True)
        image = Image.open(image_root / record["image"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0]
        new = tokens[inputs["input_ids"].shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def test_vqa_normalisation():
    assert normalise_answer("Two.") == normalise_answer("2") == "2"
    assert normalise_answer("A red  Circle!") == "red circle"
    assert normalise_answer("The top-left") == "top left"
    assert normalise_answer("1,000") == "1000" and normalise_answer("2.5") == "2.5"
    assert normalise_answer("don't") == normalise_answer("dont") == "don't"
    assert normalise_answer("blue") != normalise_answer("blues")


def test_eval_of_an_export_equals_transformers_generate_and_the_run_directory(untrained_run, exported, small_data,
                                                                            tmp_path, capsys):
    records = json.loads((small_data.raw / "eval.json").read_text())[:6]
    image_root = small_data.raw / "images"
    expected = transformers_answers(exported, records, image_root, max_new_tokens=6)
    # References: transformers' answer for the first half (so accuracy is neither 0 nor 100%), a wrong one after.
    for index, record in enumerate(records):
        record["conversations"][1]["value"] = expected[index] if index < 3 else "no such answer"
        record["category"] = "even" if index % 2 == 0 else "odd"
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    questions = load_questions(data, image_root)
    on_export = evaluate(exported, questions, batch_size=4, max_new_tokens=6)  # batched: left padding
    assert [answer["answer"] for answer in on_export.answers] == expected
    assert on_export.correct == 3 and on_export.accuracy == 0.5
    assert on_export.by_category() == {"even": (2, 3), "odd": (1, 3)}
    on_run = evaluate(untrained_run, questions, batch_size=4, max_new_tokens=6)  # vdep's own model and decoding
    assert [answer["answer"] for answer in on_run.answers] == expected

    from vdep.cli import main

    out = tmp_path / "answers.jsonl"
    assert main(["eval", "--model", str(exported), "--data", str(data), "--image-root", str(image_root),
                 "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy: 50.0% (6 questions)" in printed and "even: 66.7% (3 questions)" in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["answer"] for line in lines] == expected
    assert set(lines[0]) >= {"id", "question", "answer", "reference", "correct"}


def test_bad_records_are_counted_and_named_never_fatal(untrained_run, small_data, tmp_path):
    good = json.loads((small_data.raw / "eval.json").read_text())[:2]
    broken_image = tmp_path / "images" / "broken.png"
    broken_image.parent.mkdir()
    broken_image.write_bytes(b"not a png")
    for record in good:
        shutil.copy(small_data.raw / "images" / record["image"], tmp_path / "images" / record["image"])
    lines = [json.dumps(good[0]), "{not json", json.dumps({"id": "no-turns", "image": good[0]["image"]}),
             json.dumps({**good[1], "id": "missing", "image": "absent.png"}),
             json.dumps({**good[1], "id": "undecodable", "image": "broken.png"}), json.dumps(good[1])]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    report = run_eval(untrained_run, data, tmp_path / "images", tmp_path / "out.jsonl", batch_size=8, max_new_tokens=2)
    assert len(report.answers) == 2
    named = {bad.record_id or bad.where: bad.reason for bad in report.bad}
    assert set(named) == {f"{data}:2", "no-turns", "missing", "undecodable"}
    assert named["missing"].startswith("missing_image") and named["undecodable"].startswith("bad_image")
    summary = report.summary()
    assert "bad records (not asked): 4" in summary and "absent.png" in summary
    assert sum(1 for line in (tmp_path / "out.jsonl").read_text().splitlines() if '"bad"' in line) == 4


def test_eval_reads_a_shard_directory(untrained_run, small_data):
    questions = load_questions(small_data.finetune_shards, None)
    assert len(questions.questions) == 64 - sum(1 for q in questions.bad) and not questions.bad
    with_image = [q for q in questions.questions if q.has_image][:3]
    assert with_image and all(len(q.images) == 1 and isinstance(q.images[0], bytes) for q in with_image)
    from vdep.eval.questions import QuestionSet

    report = evaluate(untrained_run, QuestionSet(with_image), batch_size=3, max_new_tokens=2)
    assert len(report.answers) == 3


def test_the_lmms_task_scores_with_vdeps_normalisation(small_data, tmp_path):
    questions = load_questions(small_data.raw / "eval.json", small_data.raw / "images")
    task = write_lmms_task(questions, tmp_path / "task", max_new_tokens=6)
    assert task.name == "vdep_task.yaml" and "task: vdep_task\n" in task.read_text()
    rows = [json.loads(line) for line in (tmp_path / "task" / "vdep_task.jsonl").read_text().splitlines()]
    assert len(rows) == len(questions.questions) and Path(rows[0]["image"]).is_file()
    assert "<image>" not in rows[0]["question"] and "max_new_tokens: 6" in task.read_text()
    spec = importlib.util.spec_from_file_location("lmms_task_utils", tmp_path / "task" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)  # as lmms-eval imports it, without vdep on the path
    assert utils.process_results({"answer": "Two"}, ["2."]) == {"exact_match": 1.0}
    assert utils.process_results({"answer": "red"}, ["blue"]) == {"exact_match": 0.0}
    assert utils.doc_to_visual(rows[0])[0].mode == "RGB" and utils.doc_to_text(rows[0]) == rows[0]["question"]


def lmms_python() -> str | None:
    python = os.environ.get("VDEP_LMMS_PYTHON")
    return python if python and Path(python).is_file() else None


@pytest.mark.lmms
@pytest.mark.skipif(lmms_python() is None, reason="VDEP_LMMS_PYTHON names no Python with lmms-eval installed")
def test_lmms_eval_gives_the_answers_vdep_eval_gives(exported, small_data, tmp_path):
    questions = load_questions(small_data.raw / "eval.json", small_data.raw / "images")
    write_lmms_task(questions, tmp_path / "task", max_new_tokens=6, name="vdep_check")
    ours = evaluate(exported, questions, batch_size=4, max_new_tokens=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    env.pop("PYTHONPATH", None)
    command = [lmms_python(), "-m", "lmms_eval", "--model", "llava_hf", "--model_args",
               f"pretrained={exported},device=cpu,device_map=cpu", "--tasks", "vdep_check", "--include_path",
               str(tmp_path / "task"), "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    samples = sorted((tmp_path / "out").rglob("*vdep_check*.jsonl"))
    assert samples, f"lmms-eval wrote no samples (it exits 0 on failure): {result.stderr[-3000:]}"
    logged = sorted((json.loads(line) for line in samples[0].read_text().splitlines()), key=lambda row: row["doc_id"])
    theirs = [row["filtered_resps"][0] if isinstance(row["filtered_resps"], list) else row["filtered_resps"]
              for row in logged]
    assert [answer["answer"] for answer in ours.answers] == [answer.strip() for answer in theirs]
    scored = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert scored["results"]["vdep_check"]["exact_match,none"] == pytest.approx(ours.accuracy)
