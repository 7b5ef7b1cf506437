"""Launch detection (plain, torchrun, deepspeed, SLURM), DeepSpeed config filling, LR schedule, groups."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from vdep.errors import ConfigError
from vdep.train.deepspeed_config import fill_config, load_preset, resolve_precision, zero_stage
from vdep.train.distributed import detect_launch, first_slurm_host
from vdep.train.schedule import lr_factor, warmup_steps


def test_plain_process_is_a_world_of_one():
    launch = detect_launch({})
    assert (launch.rank, launch.world_size, launch.launcher, launch.master_addr) == (0, 1, "plain", "127.0.0.1")
    assert launch.master_port > 0


def test_torchrun_and_deepspeed_launcher_variables():
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.local_world_size) == (3, 8, 1, 2)
    assert torchrun.launcher == "torchrun"
    ds = detect_launch({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                        "CROSS_RANK": "0", "LOCAL_SIZE": "2"})
    assert ds.launcher == "deepspeed" and ds.local_world_size == 2
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})


def test_srun_task_per_rank_variables():
    env = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (9, 16, 1, 8)
    assert launch.master_addr == "gpu017" and launch.master_port == 20000 + 4242 and launch.launcher == "slurm"
    # The batch script itself (no job step) is one plain process even inside an allocation.
    assert detect_launch({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}).world_size == 1
    assert first_slurm_host("node7") == "node7"


def test_presets_get_every_auto_value_filled():
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        preset, path = load_preset(name)
        config = fill_config(preset, path, micro_batch_size=4, grad_accum_steps=2, world_size=8, grad_clip=1.0,
                             precision="bf16", hidden_size=4096)
        assert zero_stage(config) == stage
        assert "auto" not in json.dumps(config)
        assert (config["train_batch_size"], config["gradient_clipping"], config["bf16"]["enabled"]) == (64, 1.0, True)
        assert config["bf16"]["check_grad_overflow"] is True  # non-finite steps are skipped, not applied
        assert config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
        if stage == 3:
            assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
            assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 40960


def test_user_json_cannot_contradict_the_recipe(tmp_path):
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    preset, path = load_preset(str(custom))
    with pytest.raises(ConfigError, match="gradient_clipping=0.5.*stages.<stage>.grad_clip"):
        fill_config(preset, path, micro_batch_size=1, grad_accum_steps=1, world_size=1, grad_clip=1.0,
                    precision="fp32", hidden_size=8)
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="defines 'optimizer'"):
        load_preset(str(custom))
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}))
    preset, path = load_preset(str(custom))
    with pytest.raises(ConfigError, match="cannot fill.*allgather_bucket_size"):
        fill_config(preset, path, micro_batch_size=1, grad_accum_steps=1, world_size=1, grad_clip=1.0,
                    precision="fp32", hidden_size=8)
    with pytest.raises(ConfigError, match="presets: zero2, zero3, zero3_offload"):
        load_preset("zero4")


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # DeepSpeed's CPU accelerator runs it (the tests do)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)


def test_cosine_schedule_with_warmup():
    total = 100
    warmup = warmup_steps(total, 0.03)
    assert warmup == 3
    assert [lr_factor(s, warmup, total) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(3, warmup, total) == pytest.approx(1.0)
    middle = 3 + (total - 3) // 2
    assert lr_factor(middle, warmup, total) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 48 / 97)).item()))
    assert lr_factor(total - 1, warmup, total) < 0.001
    factors = [lr_factor(s, warmup, total) for s in range(3, total)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_param_groups_separate_the_projector_lr(tiny_model):
    from vdep.train.freezing import apply_trainable, param_groups, trainable_table

    built = tiny_model
    model = built.model
    apply_trainable(model, ["projector"])
    rows = {r.module: r for r in trainable_table(model)}
    assert rows["language_model"].trainable == 0 and rows["multi_modal_projector"].frozen == 0
    assert rows["vision_tower"].trainable == 0
    apply_trainable(model, ["projector", "language_model"])
    groups = {g["name"]: g for g in param_groups(model, lr=2e-5, projector_lr=1e-4, weight_decay=0.0)}
    assert groups["projector"]["lr"] == 1e-4 and groups["language_model"]["lr"] == 2e-5
    decayed = {g["name"]: g for g in param_groups(model, lr=2e-5, projector_lr=None, weight_decay=0.1)}
    assert decayed["language_model"]["weight_decay"] == 0.1 and decayed["language_model_no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in decayed["language_model_no_decay"]["params"])
    assert decayed["projector"]["lr"] == 2e-5


def test_ops_build_with_the_ninja_beside_the_interpreter_so_another_on_path_rebuilds_nothing(tmp_path):
    """A process whose PATH finds another ninja first (the system's, outside the venv) still loads the op
    the venv's ninja built, without rebuilding it (two versions' build logs make each rebuild)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    venv_ninja = Path(sys.executable).parent / "ninja"
    other = next((Path(p) / "ninja" for p in os.environ["PATH"].split(os.pathsep)
                  if (Path(p) / "ninja").is_file() and Path(p) != venv_ninja.parent), None)
    if not venv_ninja.is_file() or other is None:
        pytest.skip("needs a ninja beside the interpreter and another on PATH")
    extensions = tmp_path / "extensions"
    build = ("from vdep.train.ds import prebuild_ops; prebuild_ops(); import os, glob; "
             "print(os.stat(glob.glob(os.path.join(os.environ['TORCH_EXTENSIONS_DIR'], '**', '*.so'), recursive=True)[0]).st_mtime_ns)")
    stamps = []
    for first in (venv_ninja.parent, other.parent):  # built with the venv's, then loaded with the other first
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu",
               "PATH": f"{first}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run([sys.executable, "-c", build], env=env, check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        stamps.append(result.stdout.strip().splitlines()[-1])
    assert stamps[0] == stamps[1], "the op was rebuilt"
    assert shutil.which("ninja") is not None
