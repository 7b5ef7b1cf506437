"""`vdep demo` without its training: its data reused (and said so), its run continued by the recipe."""

from __future__ import annotations

from vdep.config import load_config, stage_fingerprint
from vdep.demo import DemoSizes, demo_paths, prepare_data, train_arguments
from vdep.rundir import RunDir
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
