"""The documentation covers what the code offers (a config key without docs is a defect)."""

from __future__ import annotations

import re
from pathlib import Path

from vdep.config import TrainConfig
from vdep.structured import dotted_keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text() + (ROOT / "docs" / "vdep.md").read_text()
    leaves = {key.rsplit(".", 1)[-1] for key in dotted_keys(TrainConfig)}
    # documented as `key`, or as the first or last part of a dotted key such as `vision_tower.path`
    missing = sorted(leaf for leaf in leaves if not any(form in text for form in (f"`{leaf}`", f".{leaf}`", f"`{leaf}.")))
    assert not missing, f"config keys missing from docs/config.md: {missing}"


def test_readme_quickstart_is_two_make_targets_that_exist():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [line.strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
