"""Writing files and folders so that no reader ever sees half of one.

Everything vdep writes that another process (a resumed run, another rank, the exporter, a shard
reader) may read is written under a temporary name beside its target and renamed into place when
complete: a rename within one file system is atomic, so the target is either the old version, or
the whole new one. A process killed half-way leaves only a temporary file behind.

Temporary file names carry the process id, so concurrent writers of the same target (SLURM array
tasks rewriting a summary, ranks) never write into one another's temporary file. A folder has a
single writer by contract (rank 0, one export), so its temporary name is fixed and a stale one from
a killed writer is removed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; renamed onto `target` when the block ends
    normally, removed when it raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(target: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `target` atomically."""
    with atomic_path(target) as temporary:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)


def temporary_folder(target: Path) -> Path:
    return target.with_name(target.name + ".tmp")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder to fill; renamed onto `target` (absent or empty) when the block ends
    normally. If the block raises, the partial folder stays for inspection and is replaced by the next
    attempt."""
    temporary = temporary_folder(target)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    yield temporary
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    os.replace(temporary, target)
