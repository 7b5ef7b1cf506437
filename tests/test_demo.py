"""`vdep demo` without its training: its data reused (and said so), its run continued by the recipe."""

from __future__ import annotations

import json

from safetensors import safe_open

from tests.conftest import TINY_MODEL_OVERRIDES
from vdep.config import load_config, stage_fingerprint
from vdep.demo import DemoSizes, demo_paths, prepare_data, prepare_text_data, train_arguments
from vdep.rundir import RunDir, stage_weights
from vdep.train.launch import launch_local
from vdep.train.prepare import check_resume_changes, save_resolved_config


def test_vdep_train_demo_tiny_continues_the_run_vdep_demo_made(tmp_path, monkeypatch):
    """demo-tiny.yaml: "after `vdep demo` has created the data: vdep train demo-tiny"."""
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "vdep-demo").resolve()  # `vdep demo`'s default --out, as run_demo resolves it
    arguments = train_arguments(demo_paths(out / "data"), out, "vdep", seed=0, vdep_enabled=True, overrides=[])
    demo = load_config(arguments[1], arguments[2:], files=False)
    recipe = load_config("demo-tiny", files=False)
    assert demo.run.directory.resolve() == recipe.run.directory.resolve()
    run = RunDir(demo.run.directory)
    save_resolved_config(demo, run)
    check_resume_changes(run, recipe)  # the recipe's paths are the demo's: no change of the run
    assert all(stage_fingerprint(demo, stage) == stage_fingerprint(recipe, stage) for stage in ("align", "finetune"))


def test_a_second_demo_reuses_its_data_and_says_so(tmp_path, capsys):
    sizes = DemoSizes(align=16, finetune=16, held_out=4, samples_per_shard=16, vocab_size=300)
    first = prepare_data(tmp_path / "data", seed=0, sizes=sizes)
    assert "[1/3] data: generating" in capsys.readouterr().out
    stamp = (tmp_path / "data" / "demo-data.json").stat().st_mtime_ns
    assert prepare_data(tmp_path / "data", seed=0, sizes=sizes) == first
    printed = capsys.readouterr().out
    assert printed.startswith(f"[1/3] data: reusing the shapes images, shards and tokenizer in {tmp_path / 'data'}")
    assert "generating" not in printed and (tmp_path / "data" / "demo-data.json").stat().st_mtime_ns == stamp


def test_vdep_train_demo_tiny_paper_continues_the_paper_regime_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "vdep-demo").resolve()
    arguments = train_arguments(demo_paths(out / "data"), out, "paper-vdep", 0, True, [], regime="paper")
    demo = load_config(arguments[1], arguments[2:], files=False)
    recipe = load_config("demo-tiny-paper", files=False)
    assert list(recipe.stages) == ["text", "align", "finetune"]
    assert recipe.stages["text"].trainable == ["language_model"] and recipe.stages["align"].trainable == ["projector"]
    assert demo.run.directory.resolve() == recipe.run.directory.resolve()
    run = RunDir(demo.run.directory)
    save_resolved_config(demo, run)
    check_resume_changes(run, recipe)


def test_the_paper_regime_pretrains_on_text_then_aligns_with_the_llm_frozen(tmp_path, monkeypatch):
    """Three stages on tiny data: the text stage trains the LLM alone on conversations without images,
    align the projector alone (the LLM stays the text stage's), finetune both."""
    monkeypatch.chdir(tmp_path)
    sizes = DemoSizes(align=32, finetune=32, held_out=4, samples_per_shard=16, vocab_size=300, text=32)
    paths = prepare_data(tmp_path / "data", seed=0, sizes=sizes)
    prepare_text_data(tmp_path / "data", seed=0, sizes=sizes)
    corpus = json.loads((tmp_path / "data" / "raw" / "text.json").read_text())
    assert len(corpus) == 32 and not any("image" in record for record in corpus)
    arguments = train_arguments(paths, tmp_path / "runs", "paper-vdep", 0, True, [
        *TINY_MODEL_OVERRIDES, *(f"stages.{name}.max_steps=2" for name in ("text", "align", "finetune")),
    ], regime="paper")
    assert launch_local(1, arguments) == 0
    run = RunDir(tmp_path / "runs" / "paper-vdep")
    trained = {name: safe_open(str(run.stage(name).final_weights), "pt").keys() for name in ("text", "align", "finetune")}
    assert trained["text"] and all(key.startswith("language_model.") or key == "lm_head.weight" for key in trained["text"])
    assert trained["align"] and all(key.startswith("multi_modal_projector.") for key in trained["align"])
    assert {key.partition(".")[0] for key in trained["finetune"]} >= {"multi_modal_projector", "language_model"}
    assert stage_weights(run, run.read_config(), "align", final=False) == [run.stage("text").final_weights]
