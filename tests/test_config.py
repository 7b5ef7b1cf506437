"""Config loading, overrides, validation messages, the resolved config, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vdep.config import (
    KEY_ALIASES,
    TrainConfig,
    check_batch_geometry,
    config_to_yaml,
    find_recipe,
    load_config,
)
from vdep.errors import ConfigError
from vdep.rundir import RunDir
from vdep.structured import closest_key, dotted_keys, structure
from vdep.train.prepare import save_resolved_config


def fake_hf_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.fixture
def llava_paths(tmp_path) -> list[str]:
    """Overrides that make the LLaVA-1.5 recipe's paths exist (folders only; nothing is loaded)."""
    (tmp_path / "align").mkdir()
    (tmp_path / "finetune").mkdir()
    return [
        f"model.vision_tower.path={fake_hf_folder(tmp_path / 'clip')}",
        f"model.language_model.path={fake_hf_folder(tmp_path / 'vicuna')}",
        f"stages.align.shards=[{tmp_path / 'align'}]",
        f"stages.finetune.shards=[{tmp_path / 'finetune'}]",
    ]


def test_llava_recipe_states_the_llava15_hyperparameters(llava_paths):
    config = load_config("llava15-7b-vdep", llava_paths)
    align, finetune = config.stages["align"], config.stages["finetune"]
    assert (align.lr, align.global_batch_size, align.zero, align.trainable) == (1e-3, 256, "zero2", ["projector"])
    assert (finetune.lr, finetune.global_batch_size, finetune.zero) == (2e-5, 128, "zero3")
    assert finetune.trainable == ["projector", "language_model"]
    for stage in (align, finetune):
        assert (stage.warmup_ratio, stage.weight_decay, stage.grad_clip, stage.epochs) == (0.03, 0.0, 1.0, 1.0)
    assert (align.template, finetune.template) == ("plain", "vicuna_v1")
    assert config.model.vision_tower.feature_layer == -2
    assert config.model.projector == "mlp2x_gelu"
    assert config.data.pad_to_square


def test_recipes_are_addressable_by_name_and_path():
    assert find_recipe("demo-tiny").name == "demo-tiny.yaml"
    assert find_recipe(str(find_recipe("llava15-7b-vdep"))).is_file()
    shipped = ["demo-tiny", "demo-tiny-paper", "llava-next-vdep", "llava15-7b-vdep", "llava15-7b-vdep-lora",
               "onevision-vdep"]
    with pytest.raises(ConfigError, match=f"shipped recipes: {', '.join(shipped)}$"):
        find_recipe("llava-nope")
    for name in shipped:  # every shipped recipe's values check (its weights and shards are the user's)
        assert load_config(name, files=False).stages, name


def test_unknown_key_names_the_closest_valid_key(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'stages.align.learning_rate'.*did you mean 'stages.align.lr'"):
        load_config("demo-tiny", small_data.overrides(tmp_path / "r") + ["stages.align.learning_rate=1e-3"])
    recipe = tmp_path / "typo.yaml"
    raw = yaml.safe_load(find_recipe("demo-tiny").read_text())
    raw["vdep"]["mode_ratoi"] = 0.5
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"unknown key 'vdep.mode_ratoi' in {recipe}.*'vdep.mode_ratio'"):
        load_config(str(recipe), small_data.overrides(tmp_path / "r"))


def test_trainer_names_at_the_top_level_suggest_the_stage_key(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"^unknown key 'learning_rate' in the command-line override 'learning_rate=1'; "
                                          r"did you mean 'stages.<stage>.lr'\?$"):
        load_config("demo-tiny", base + ["learning_rate=1"])
    valid = dotted_keys(TrainConfig, names={"stages": ["align", "finetune"]})
    assert closest_key("num_train_epochs", valid, KEY_ALIASES) == "stages.<stage>.epochs"
    assert closest_key("batch_size", valid, KEY_ALIASES) == "stages.<stage>.global_batch_size"  # not patch_size
    assert closest_key("save_steps", valid, KEY_ALIASES) == "stages.<stage>.save_every"  # not max_steps
    assert closest_key("stages.align.model_max_length", valid, KEY_ALIASES) == "data.max_length"
    assert closest_key("model.path", valid, KEY_ALIASES) == "model.<vision_tower|language_model>.path"
    assert closest_key("seed", valid, KEY_ALIASES) == "run.seed"


def test_a_bad_value_names_the_override_it_came_from(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "r")
    with pytest.raises(ConfigError) as error:
        load_config("demo-tiny", base + ["stages.align.lr=abc"])
    assert str(error.value) == (
        "'stages.align.lr' (from the command-line override 'stages.align.lr=abc'): expected a number, got 'abc'"
    )
    # The top-level vdep section's value, copied into each stage; a key inside an overridden mapping.
    with pytest.raises(ConfigError, match=r"^'stages.align.vdep.mode_ratio' \(from the command-line override "
                                          r"'vdep.mode_ratio=1.5'\): must be within \[0, 1\]"):
        load_config("demo-tiny", base + ["vdep.mode_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"^missing required key 'stages.finetune.lora.alpha' \(from the command-line "
                                          r"override 'stages.finetune.lora=\{r: 8\}'\)"):
        load_config("demo-tiny", base + ["stages.finetune.lora={r: 8}"])
    # A value from the recipe names the recipe.
    recipe = tmp_path / "bad-lr.yaml"
    raw = yaml.safe_load(find_recipe("demo-tiny").read_text())
    raw["stages"]["align"]["lr"] = "abc"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^'stages.align.lr' in {recipe}: expected a number, got 'abc'"):
        load_config(str(recipe), base)


def test_settings_are_checked_without_the_files_the_files_before_training(tmp_path, monkeypatch):
    # The recipe's shard paths are relative: resolved in an empty folder, not in a checkout where `make demo`
    # left vdep-demo/ (where they exist and nothing would be raised).
    monkeypatch.chdir(tmp_path)
    imported = ["model.init_from=/no/such/llava-folder", "model.vision_tower.tiny=null", "model.language_model.tiny=null",
                "model.tokenizer=null"]
    config = load_config("demo-tiny", imported, files=False)  # nor do the recipe's shards exist
    assert config.model.init_from == "/no/such/llava-folder"
    with pytest.raises(ConfigError, match=r"'model.init_from' \(from the command-line override "
                                          r"'model.init_from=/no/such/llava-folder'\): /no/such/llava-folder does not exist"):
        load_config("demo-tiny", imported)
    with pytest.raises(ConfigError, match="a Llava folder provides the vision_tower"):  # values are checked all the same
        load_config("demo-tiny", ["model.init_from=/no/such/llava-folder"], files=False)
    with pytest.raises(ConfigError, match="'stages.align.shards' in .*demo-tiny.yaml: vdep-demo/data/shards/align does not"):
        load_config("demo-tiny", [f"model.tokenizer={tmp_path}"])


def test_wrong_types_and_values_are_named(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "r")
    with pytest.raises(ConfigError, match="'stages.align.lr'.*expected a number, got 'fast'"):
        load_config("demo-tiny", base + ["stages.align.lr=fast"])
    with pytest.raises(ConfigError, match="'vdep.layout'.*'text_last' is not allowed.*did you mean 'text_first'"):
        load_config("demo-tiny", base + ["vdep.layout=text_last"])
    with pytest.raises(ConfigError, match=r"'stages.align.vdep.mode_ratio'.*within \[0, 1\]"):
        load_config("demo-tiny", base + ["vdep.mode_ratio=1.5"])
    with pytest.raises(ConfigError, match="the vision tower is always frozen"):
        load_config("demo-tiny", base + ["stages.align.trainable=[vision_tower]"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("demo-tiny", base + ["stage"])


def test_missing_files_are_named(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "r")
    with pytest.raises(ConfigError, match="'stages.align.shards'.*/nowhere does not exist.*vdep build-shards"):
        load_config("demo-tiny", base + ["stages.align.shards=[/nowhere]"])
    with pytest.raises(ConfigError, match="model.language_model.*/no/llm does not exist.*never downloads"):
        load_config("demo-tiny", base + ["model.language_model.path=/no/llm", "model.language_model.tiny=null"])
    with pytest.raises(ConfigError, match="exactly one of 'model.language_model.path'"):
        load_config("demo-tiny", base + [f"model.language_model.path={fake_hf_folder(tmp_path / 'llm')}"])


def test_global_batch_must_split_over_ranks_and_micro_batches(small_data, tmp_path):
    config = load_config("demo-tiny", small_data.overrides(tmp_path / "r"))
    stage = config.stages["align"]  # global 32, micro 16
    assert check_batch_geometry("align", stage, 1) == 2
    assert check_batch_geometry("align", stage, 2) == 1
    with pytest.raises(ConfigError, match=r"32 is not divisible by micro_batch_size × world size = 16 × 3 = 48"):
        check_batch_geometry("align", stage, 3)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        load_config("demo-tiny", small_data.overrides(tmp_path / "r") + ["stages.align.global_batch_size=30"])


def test_vdep_section_applies_to_both_stages_and_stages_override_single_keys(small_data, tmp_path):
    config = load_config(
        "demo-tiny",
        small_data.overrides(tmp_path / "r") + ["vdep.alpha=0.25", "stages.finetune.vdep.mode_ratio=1.0"],
    )
    assert config.stages["align"].vdep.alpha == 0.25 and config.stages["finetune"].vdep.alpha == 0.25
    assert config.stages["align"].vdep.mode_ratio == 0.5  # demo-tiny's
    assert config.stages["finetune"].vdep.mode_ratio == 1.0
    # Recipe values that the override did not touch stay (demo-tiny sets these two).
    assert config.stages["finetune"].vdep.target_norm == "layernorm" and config.stages["finetune"].vdep.detach_input


def test_stage_selection(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "r")
    assert [n for n, _ in load_config("demo-tiny", base).stages_to_run()] == ["align", "finetune"]
    assert [n for n, _ in load_config("demo-tiny", base + ["stage=finetune"]).stages_to_run()] == ["finetune"]
    with pytest.raises(ConfigError, match="no stage named 'pretrain'; this recipe's stages are align, finetune"):
        load_config("demo-tiny", base + ["stage=pretrain"])


def test_resolved_config_round_trips_with_every_vdep_knob(small_data, tmp_path):
    config = load_config("demo-tiny", small_data.overrides(tmp_path / "r") + ["stages.align.vdep.head=linear"])
    path = save_resolved_config(config, RunDir(tmp_path / "run"))
    text = path.read_text()
    for knob in ("enabled", "alpha", "mode_ratio", "text_loss_in_vdep_mode", "layout", "detach_target",
                 "detach_input", "head", "target_norm", "skip_first_image_token", "kernel"):
        assert f"    {knob}:" in text, knob  # recorded for the top level and for each stage
    reloaded = structure(TrainConfig, yaml.safe_load(text))
    assert reloaded == config
    assert config_to_yaml(reloaded) == config_to_yaml(config)
    assert load_config(str(path)) == config  # `vdep train RUN_DIR/config.yaml` reproduces the run


def test_a_resume_may_change_how_it_logs_and_saves_but_not_what_it_computes(small_data, tmp_path, caplog):
    import logging

    from vdep.config import load_config
    from vdep.errors import CheckpointError
    from vdep.train.prepare import check_resume_changes

    run_dir = tmp_path / "run"
    save_resolved_config(load_config("demo-tiny", small_data.overrides(run_dir)), RunDir(run_dir))
    previous = RunDir(run_dir)
    allowed = load_config("demo-tiny", small_data.overrides(run_dir) + ["run.log_every=1", "stages.finetune.save_every=7"])
    with caplog.at_level(logging.INFO):
        check_resume_changes(previous, allowed)
    assert "resume: run.log_every changed from 10 to 1" in caplog.text
    assert "stages.finetune.save_every changed" in caplog.text
    # Moving the run directory is not a change of the run.
    check_resume_changes(previous, load_config("demo-tiny", small_data.overrides(tmp_path / "elsewhere" / "run")))
    refused = load_config("demo-tiny", small_data.overrides(run_dir) + ["stages.finetune.lr=0.5", "vdep.alpha=2", "run.seed=3"])
    with pytest.raises(CheckpointError) as error:
        check_resume_changes(previous, refused)
    message = str(error.value)
    assert "stages.finetune.lr: 0.001 → 0.5" in message and "\n  vdep.alpha: 1.0 → 2.0" in message
    assert "run.seed: 0 → 3" in message and "Use a new run.name" in message


def test_remote_options_take_fsspec_settings_but_never_a_secret(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "run")
    config = load_config("demo-tiny", base + ["data.remote.storage_options={endpoint_url: 'http://10.0.0.5:9000'}",
                                              "stages.finetune.shards=[s3://bucket/shards/]", "data.remote.retries=3"])
    assert config.data.remote.storage_options == {"endpoint_url": "http://10.0.0.5:9000"}
    assert config.stages["finetune"].shards == ["s3://bucket/shards/"]  # not checked on disk
    with pytest.raises(ConfigError, match="holds key, secret: credentials never go into a config file.*AWS_SECRET_ACCESS_KEY"):
        load_config("demo-tiny", base + ["data.remote.storage_options={key: AKIA, secret: s3cr3t}"])
    with pytest.raises(ConfigError, match="'data.remote.storage_options'.*expected a mapping"):
        load_config("demo-tiny", base + ["data.remote.storage_options=[a]"])
    with pytest.raises(ConfigError, match="'data.remote'.*request_mb positive"):
        load_config("demo-tiny", base + ["data.remote.request_mb=0"])


# ------------------------------------------------------------------------------------ image aspect ratio
def test_image_aspect_ratio_and_the_older_pad_to_square_are_one_setting(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "run")
    assert load_config("demo-tiny", base).model.image_aspect_ratio == "pad"
    square = load_config("demo-tiny", base + ["model.image_aspect_ratio=square"])
    assert (square.model.image_aspect_ratio, square.data.pad_to_square) == ("square", False)  # the mirror follows
    older = load_config("demo-tiny", base + ["model.image_aspect_ratio=null", "data.pad_to_square=false"])
    assert older.model.image_aspect_ratio == "square"  # the older key alone still decides
    anyres = load_config("demo-tiny", base + ["model.image_aspect_ratio=anyres_max_9",
                                              'model.image_grid_pinpoints="(1x1),...,(3x3)"',
                                              "model.mm_patch_merge_type=spatial_unpad"])
    assert anyres.data.pad_to_square is None
    with pytest.raises(ConfigError) as error:
        load_config("demo-tiny", base + ["data.pad_to_square=false"])
    message = str(error.value)  # names both keys, where each came from, and the way out
    assert "'model.image_aspect_ratio' in" in message and "demo-tiny.yaml is 'pad'" in message
    assert "'data.pad_to_square' (from the command-line override 'data.pad_to_square=false')" in message
    assert "data.pad_to_square=null" in message
    with pytest.raises(ConfigError, match="'model.image_aspect_ratio'.*'anyres_max_0' is not an aspect ratio mode"):
        load_config("demo-tiny", base + ["model.image_aspect_ratio=anyres_max_0"])


def test_anyres_settings_are_checked_where_they_are_set(small_data, tmp_path):
    base = small_data.overrides(tmp_path / "run")
    with pytest.raises(ConfigError, match="'model.image_grid_pinpoints'.*set it, e.g. LLaVA-NeXT's"):
        load_config("demo-tiny", base + ["model.image_aspect_ratio=anyres"])
    with pytest.raises(ConfigError, match="'model.image_grid_pinpoints'.*are for model.image_aspect_ratio=anyres"):
        load_config("demo-tiny", base + ["model.image_grid_pinpoints=[[64,128]]"])
    with pytest.raises(ConfigError, match="'model.mm_patch_merge_type'.*use flat, or anyres"):
        load_config("demo-tiny", base + ["model.mm_patch_merge_type=spatial_unpad"])
    for bad in ("[[64,0]]", "[[64]]", '"(2x2),...,(1x1)"', '"1x1,6x6"'):
        with pytest.raises(ConfigError, match="'model.image_grid_pinpoints'"):
            load_config("demo-tiny", base + ["model.image_aspect_ratio=anyres", f"model.image_grid_pinpoints={bad}"])


def test_the_range_form_expands_as_llava_next_and_onevision_do():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from vdep.config import grid_pinpoints

    # OneVision's recipe says "(1x1),...,(6x6)" with SigLIP-384; transformers' OneVision processor holds the expansion.
    assert grid_pinpoints("(1x1),...,(6x6)", 384) == LlavaOnevisionImageProcessorPil.image_grid_pinpoints
    assert grid_pinpoints("(1x2), ..., (2x3)", 10) == [[10, 20], [10, 30], [20, 20], [20, 30]]
    assert grid_pinpoints([[64, 128], [128, 64]], 64) == [[64, 128], [128, 64]]


def test_a_run_directory_written_before_anyres_resumes_unchanged(small_data, tmp_path):
    """config.yaml of a run written by vdep before these keys existed: no image_aspect_ratio, image_grid_pinpoints
    or mm_patch_merge_type, and data.pad_to_square (true or false). It reads as the same config, resumes, and its
    checkpoints' fingerprints are the ones that vdep wrote (pinned from the version before, commit ec7a26e)."""
    from vdep.config import stage_fingerprint
    from vdep.train.base_weights import BaseStamp
    from vdep.train.prepare import check_resume_changes

    overrides = ["model.tokenizer=/tmp/tok", "stages.align.shards=[/tmp/a]", "stages.finetune.shards=[/tmp/f]",
                 "run.output_dir=/tmp/runs"]
    config = load_config("demo-tiny", overrides, files=False)
    assert {s: stage_fingerprint(config, s) for s in config.stages} == {"align": "023c8c1c97535c9c",
                                                                          "finetune": "a35a83b634e67da5"}
    for pad_to_square in (True, False):
        written = yaml.safe_load(config_to_yaml(config))
        for key in ("image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type"):
            del written["model"][key]
        written["data"]["pad_to_square"] = pad_to_square
        run = RunDir(tmp_path / f"old-{pad_to_square}")
        run.path.mkdir(parents=True)
        run.config_file.write_text(yaml.safe_dump(written, sort_keys=False))
        old = run.read_config()
        assert old.model.image_aspect_ratio == ("pad" if pad_to_square else "square")
        recipe = old if not pad_to_square else config
        check_resume_changes(run, recipe)  # nothing changed
        assert BaseStamp.of(old.model) == BaseStamp.of(config.model)  # base/ is not rebuilt, nor refused
        assert {s: stage_fingerprint(old, s) for s in old.stages} == {s: stage_fingerprint(config, s) for s in config.stages}
