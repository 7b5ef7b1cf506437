"""The documentation covers what the code offers (a config key without docs is a defect)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from vdep.config import TrainConfig
from vdep.structured import dotted_keys

ROOT = Path(__file__).resolve().parents[1]


def doc_sections(path: Path) -> dict[str, str]:
    """A markdown page's `## ` sections by heading text."""
    sections: dict[str, str] = {}
    heading = ""
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        sections[heading] = sections.get(heading, "") + line + "\n"
    return sections


def table_rows(section: str) -> dict[str, str]:
    """A section's table rows by the key in their first cell (`` `key` ``)."""
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([^`]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_config_key_is_documented_under_its_full_path():
    """Each config key has a row in its section's table (docs/config.md; the VDEP knobs in docs/vdep.md),
    or is named in its parent's row (the sizes of a tiny model)."""
    config_doc = doc_sections(ROOT / "docs" / "config.md")
    where = {
        "model": table_rows(config_doc["`model`"]),
        "data": table_rows(config_doc["`data`"]),
        "stages": table_rows(config_doc["`stages.<name>`"]),
        "deepspeed": table_rows(config_doc["`deepspeed`"]),
        "run": table_rows(config_doc["`run`"]),
        "vdep": table_rows(doc_sections(ROOT / "docs" / "vdep.md")["Knobs"]),
    }
    keys = dotted_keys(TrainConfig, names={"stages": ["align"]})  # every stage has the same keys
    leaves = [key for key in keys if not any(other.startswith(key + ".") for other in keys)]
    missing = []
    for key in leaves:
        section, _, rest = key.partition(".")
        if section == "stage":
            documented = "## `stage`" in (ROOT / "docs" / "config.md").read_text()
        else:
            if section == "stages":
                rest = rest.partition(".")[2]  # the same table for every stage
                if rest.startswith("vdep."):
                    section, rest = "vdep", rest.removeprefix("vdep.")
            rows = where[section]
            parent, _, leaf = rest.rpartition(".")
            documented = rest in rows or (parent in rows and f"`{leaf}`" in rows[parent])
        if not documented:
            missing.append(key)
    assert not missing, f"config keys without a row under their section in docs/config.md or docs/vdep.md: {missing}"


def test_readme_quickstart_is_two_make_targets_that_exist():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands = [line.strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE)
    # CI runs the README's own Quickstart block, command by command, in its order: what it extracts is these.
    ci = (ROOT / ".ci" / "run").read_text()
    extraction = re.search(r"mapfile -t quickstart < <\((awk .*? README\.md)\)", ci)
    assert extraction, "CI no longer takes its commands from the README's Quickstart"
    extracted = subprocess.run(["bash", "-c", extraction.group(1)], cwd=ROOT, check=True, capture_output=True, text=True)
    assert extracted.stdout.splitlines() == commands
