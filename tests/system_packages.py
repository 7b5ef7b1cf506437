"""Debian packages the system tests need (SLURM's daemons, nginx), installed when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or Path(f"/usr/sbin/{binary}").exists()


def install_packages(binaries: tuple[str, ...], packages: tuple[str, ...]) -> str | None:
    """Install `packages` unless every one of `binaries` exists; returns why they cannot be had, or None."""
    if all(have(binary) for binary in binaries):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(binaries)} missing, and installing {' '.join(packages)} needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"{' '.join(command)} failed: {result.stderr[-2000:]}"
    return None


def require_packages(binaries: tuple[str, ...], packages: tuple[str, ...], required_by: str) -> None:
    """Install the packages or skip the test; with `required_by`=1 in the environment (CI), fail instead:
    a skipped system test would hide a failure."""
    reason = install_packages(binaries, packages)
    if reason is None:
        return
    if os.environ.get(required_by) == "1":
        pytest.fail(reason)
    pytest.skip(reason)
