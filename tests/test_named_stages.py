"""Named stages: a recipe lists any number of stages, in the order they run."""

from __future__ import annotations

import json

import pytest
import yaml

from vdep.config import RECIPES_DIR, config_to_yaml, load_config
from vdep.errors import CheckpointError, ConfigError
from vdep.evaluate import load_trained_model
from vdep.export.hf import export_hf
from vdep.rundir import RunDir, stage_weights
from vdep.train.launch import launch_local
from vdep.train.prepare import check_resume_changes, save_resolved_config


def three_stage_recipe(small_data, folder, **polish) -> str:
    """demo-tiny with its stages renamed and a third one (LLaVA-NeXT style: caption, instruct, polish),
    each two steps long, on the small test data."""
    recipe = yaml.safe_load((RECIPES_DIR / "demo-tiny.yaml").read_text())
    align, finetune = recipe["stages"]["align"], recipe["stages"]["finetune"]
    align["shards"], finetune["shards"] = [str(small_data.align_shards)], [str(small_data.finetune_shards)]
    last = {**finetune, "trainable": ["projector"], "lr": 5.0e-4, **polish}
    recipe["stages"] = {"caption": align, "instruct": finetune, "polish": last}
    for stage in recipe["stages"].values():
        stage["max_steps"] = 2
    path = folder / "three-stages.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def overrides(small_data, run_dir) -> list[str]:
    """small_data's overrides without the ones that name align and finetune."""
    return [item for item in small_data.overrides(run_dir) if not item.startswith("stages.")]


def test_stages_run_in_the_recipes_order_under_any_names(small_data, tmp_path):
    recipe = three_stage_recipe(small_data, tmp_path)
    base = overrides(small_data, tmp_path / "run")
    config = load_config(recipe, base)
    assert [name for name, _ in config.stages_to_run()] == ["caption", "instruct", "polish"]
    assert config.stages_before("polish") == ["caption", "instruct"] and config.last_stage == "polish"
    assert [name for name, _ in load_config(recipe, [*base, "stage=instruct"]).stages_to_run()] == ["instruct"]
    assert list(load_config(recipe, [*base, "stages.polish=null"]).stages) == ["caption", "instruct"]
    assert load_config(recipe, [*base, "stages.polish.lr=1e-5"]).stages["polish"].lr == 1e-5
    with pytest.raises(ConfigError, match=r"no stage named 'align'; this recipe's stages are caption, instruct, polish"):
        load_config(recipe, [*base, "stage=align"])
    with pytest.raises(ConfigError, match=r"unknown key 'stages.polsh.lr'.*did you mean 'stages.polish.lr'"):
        load_config(recipe, [*base, "stages.polsh.lr=1e-5"])
    # The resolved config keeps the order, so a run directory's config.yaml loads into the same stages.
    assert list(yaml.safe_load(config_to_yaml(config))["stages"]) == ["caption", "instruct", "polish"]


@pytest.mark.parametrize("name", ["base", "tokenizer", "all", "Align", "2nd", "fine-tune"])
def test_a_stage_name_that_cannot_be_a_folder_or_a_key_is_refused(small_data, tmp_path, name):
    recipe = yaml.safe_load((RECIPES_DIR / "demo-tiny.yaml").read_text())
    recipe["stages"] = {name: recipe["stages"]["align"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=rf"'stages.{name}' in {path}: '{name}' cannot name a stage; use lower-case"):
        load_config(str(path), overrides(small_data, tmp_path / "run"), files=False)


def test_a_recipe_without_stages_is_refused(small_data, tmp_path):
    path = tmp_path / "empty.yaml"
    recipe = yaml.safe_load((RECIPES_DIR / "demo-tiny.yaml").read_text())
    recipe["stages"] = {}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"'stages' in .*empty.yaml: no stage is defined"):
        load_config(str(path), overrides(small_data, tmp_path / "run"), files=False)


def test_a_resume_refuses_a_new_order_of_the_stages(small_data, tmp_path):
    run_dir = tmp_path / "run"
    recipe = three_stage_recipe(small_data, tmp_path)
    run = RunDir(run_dir)
    save_resolved_config(load_config(recipe, overrides(small_data, run_dir)), run)
    reordered = yaml.safe_load((tmp_path / "three-stages.yaml").read_text())
    stages = reordered["stages"]
    reordered["stages"] = {"instruct": stages["instruct"], "caption": stages["caption"], "polish": stages["polish"]}
    (tmp_path / "reordered.yaml").write_text(yaml.safe_dump(reordered, sort_keys=False))
    config = load_config(str(tmp_path / "reordered.yaml"), overrides(small_data, run_dir))
    with pytest.raises(CheckpointError, match=r"stages \(their order\): \['caption', 'instruct', 'polish'\] → \['instruct'"):
        check_resume_changes(run, config)


def test_a_run_directory_of_the_two_llava_stages_still_loads(small_data, tmp_path):
    """A config.yaml written before stages were named (align and finetune as fields) reads the same."""
    run = RunDir(tmp_path / "run")
    save_resolved_config(load_config("demo-tiny", small_data.overrides(run.path)), run)
    config = run.read_config()
    assert list(config.stages) == ["align", "finetune"] and config.stages["finetune"].template == "vicuna_v1"


def test_three_named_stages_train_chain_and_export(small_data, tmp_path):
    """One process trains caption → instruct → polish; each starts from the earlier ones' results, and
    evaluation and export take the last stage's model (the same files)."""
    run_dir = tmp_path / "run"
    recipe = three_stage_recipe(small_data, tmp_path)
    assert launch_local(1, ["train", recipe, *overrides(small_data, run_dir)]) == 0
    run = RunDir(run_dir)
    config = run.read_config()
    assert list(config.stages) == ["caption", "instruct", "polish"]
    for name in config.stages:
        summary = run.stage(name).read_summary()
        assert summary["steps"] == 2, name
        lines = (run.stage(name).path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines][-1] == 2
    finals = [run.stage(name).final_weights for name in config.stages]
    assert stage_weights(run, config, "polish") == finals
    assert [layer.path for layer in load_trained_model(run_dir).source.layers] == finals
    result = export_hf(run_dir, tmp_path / "hf", dtype="fp32")
    assert result.source.stages == ["caption", "instruct", "polish"] and result.template == "vicuna_v1"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert all(f"| {name} |" in card for name in config.stages)
    # Run again: every stage is complete, nothing retrains (the finals stay the same files).
    before = [path.stat().st_mtime_ns for path in finals]
    assert launch_local(1, ["train", recipe, *overrides(small_data, run_dir)]) == 0
    assert [path.stat().st_mtime_ns for path in finals] == before
