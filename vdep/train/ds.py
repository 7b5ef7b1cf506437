"""Importing DeepSpeed the same way everywhere.

DeepSpeed chooses its accelerator when it is first imported, so the choice is made here, before that
import: CUDA when a GPU is visible, otherwise the CPU accelerator (gloo). Its CPU communication op is
compiled on first use into a vdep-owned extensions folder; `prebuild_ops` compiles it once under a file
lock, so ranks started together do not race on the build ("cannot open shared object file").
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path


def default_extensions_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "vdep" / "torch_extensions"


def configure_environment() -> None:
    """Set DS_ACCELERATOR and TORCH_EXTENSIONS_DIR unless the user already did."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))


def import_deepspeed():
    configure_environment()
    import deepspeed

    return deepspeed


def load_op(builder) -> object:
    """Compile (or load) a DeepSpeed op, one process at a time (ranks started together would race)."""
    configure_environment()
    extensions = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    extensions.mkdir(parents=True, exist_ok=True)
    prefer_interpreters_ninja()
    with open(extensions / ".vdep-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # torch marks a build in progress with a `lock` file in the op's folder and waits, forever, for it
            # to go; a build killed half-way (a SIGKILLed rank) leaves it behind. Every vdep build holds the
            # flock above, so while we hold it, such a file is stale.
            (extensions / builder.name / "lock").unlink(missing_ok=True)
            return builder.load(verbose=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prefer_interpreters_ninja() -> None:
    """Build with the ninja installed beside this Python (pip's, in a venv) rather than another one on
    PATH: two ninja versions do not read each other's build log, so each rebuilds the op the other built
    (minutes on a small machine, for every process that started with the other PATH)."""
    bin_dir = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (bin_dir / "ninja").is_file() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}"


def prebuild_ops() -> None:
    """Build the CPU accelerator's communication op before any rank initialises its process group."""
    configure_environment()
    if os.environ["DS_ACCELERATOR"] != "cpu":
        return
    import_deepspeed()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    load_op(ShareMemCommBuilder())
