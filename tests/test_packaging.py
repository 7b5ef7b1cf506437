"""A non-editable install works: the wheel carries the presets and the shard tools, and runs a recipe.

The wheel is built from this checkout and installed into a fresh virtualenv that sees the test
environment's dependencies (torch, DeepSpeed, ...) through a path entry, but not its editable vdep;
every command runs outside the checkout, so nothing can come from the source tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import read_metrics

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh virtualenv with vdep installed from a wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(ROOT)], root)
    [wheel] = root.glob("vdep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"vdep/ds_configs/zero2.json", "vdep/ds_configs/zero3.json", "vdep/recipes/demo-tiny.yaml",
            "vdep/data_tools/build_shards.py"} <= set(names)
    assert not any(name.startswith(("data_tools/", "ds_configs/", "tests/")) for name in names)
    packages = {str(path.parent.relative_to(ROOT)) for path in (ROOT / "vdep").rglob("*.py")}
    shipped = {name.rsplit("/", 1)[0] for name in names if name.endswith(".py")}
    assert packages <= shipped, f"subpackages missing from pyproject's package list: {packages - shipped}"
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # A path entry (not a site dir): the test environment's packages, without running its .pth files,
    # so its editable vdep stays out of sight.
    (purelib / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], root)
    return venv / "bin"


def test_the_wheel_installs_the_presets_and_runs_the_demo_recipe(installed, small_data, tmp_path):
    located = run([str(installed / "python"), "-c", "import vdep, vdep.data_tools; print(vdep.__file__)"], tmp_path)
    assert str(installed.parent) in located.stdout  # the installed copy, not the checkout
    shards = tmp_path / "shards"
    records = json.loads((small_data.raw / "align.json").read_text())[:16]
    (tmp_path / "align.json").write_text(json.dumps(records))
    run([str(installed / "vdep"), "build-shards", str(tmp_path / "align.json"), "--image-root",
         str(small_data.raw / "images"), "--out", str(shards), "--samples-per-shard", "8", "--no-progress"], tmp_path)
    run_dir = tmp_path / "run"
    overrides = [*small_data.overrides(run_dir), f"stages.align.shards=[{shards}]", "stage=align",
                 "stages.align.max_steps=2", "stages.align.global_batch_size=4", "stages.align.micro_batch_size=4",
                 "run.log_every=1"]
    run([str(installed / "vdep"), "train", "demo-tiny", *overrides], tmp_path)  # demo-tiny trains under ZeRO-3
    assert [m["step"] for m in read_metrics(run_dir, "align")] == [1, 2]
    assert (run_dir / "align" / "final" / "trainable.safetensors").is_file()
