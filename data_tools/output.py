"""Where a shard build writes: a local folder, or a remote prefix (`s3://BUCKET/PREFIX`, `gs://...`).

A local folder is written in place, each file atomically (`vdep.atomic`). A remote prefix is written
through a local staging folder: every file is written there completely, then uploaded whole (one
`put`, which S3 and GCS publish atomically when it completes: a failed upload leaves no object under the
final name), then removed locally. A shard is uploaded before its done mark, so a done mark always
means its shard is there. Credentials and the endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).

Staging. Each process stages in its own area of the staging folder, `HOST-PID/`, beside a lock file
`HOST-PID.lock` that it holds (flock) while it lives: the parts of an array job on one node, and a
build's worker processes, never share a staged file (their summaries have the same names), and an area
whose lock nobody holds is a dead process's. A build removes such stale areas when it starts (what a
killed build left, whatever it was doing) and when it ends (its workers'), and its own area then too,
whether it succeeded or failed. A live process's area is never touched; on a filesystem without
`flock` no area can be told stale, and none is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO

from vdep.atomic import atomic_write
from vdep.data.remote import RemoteSettings, filesystem, is_remote, join, with_retries
from vdep.errors import DataError

LOCK_SUFFIX = ".lock"


class StagingArea:
    """This process's folder in a staging root, `ROOT/HOST-PID/`, and the lock `ROOT/HOST-PID.lock` it holds."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        base = f"{socket.gethostname()}-{os.getpid()}"
        for attempt in itertools.count():
            # A name is taken while its lock is held: by a live process of an earlier pid's owner (its workers
            # inherit its lock), or by a build removing that stale area right now. Then the next name.
            self.name = base if attempt == 0 else f"{base}-{attempt}"
            self.lock_path = root / (self.name + LOCK_SUFFIX)
            self._lock = _try_lock(self.lock_path)
            if self._lock is not None:
                break
        self.folder = root / self.name
        shutil.rmtree(self.folder, ignore_errors=True)  # a dead earlier owner of the name left it: stale
        self.folder.mkdir()

    def remove(self) -> None:
        """Remove the area (the build is over), then let the lock go."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        self._lock.close()


def _try_lock(path: Path) -> IO | None:
    """The lock file at `path`, open and locked for as long as it stays open; None when another process holds
    it. On a filesystem without flock, the file unlocked: such an area is never told stale (never removed by
    another process)."""
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:
        return handle
    try:
        if os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
            return handle
    except FileNotFoundError:
        pass
    handle.close()  # a build removed this stale lock file between our open and our lock: a fresh one
    return _try_lock(path)


def remove_stale_areas(root: Path, keep: Path | None = None) -> list[str]:
    """Remove the areas in `root` whose lock no process holds (their processes died); returns their names."""
    removed = []
    for lock_path in sorted(root.glob("*" + LOCK_SUFFIX)) if root.is_dir() else []:
        if lock_path == keep:
            continue
        try:
            handle = lock_path.open("rb")
        except FileNotFoundError:  # removed meanwhile by the process itself, or another build
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its process lives (or no flock here: cannot tell, so leave it)
                continue
            name = lock_path.name[: -len(LOCK_SUFFIX)]
            shutil.rmtree(root / name, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(name)
    return removed


_AREAS: dict[tuple[Path, int], StagingArea] = {}  # (staging root, pid) → this process's area (forked workers make their own)


class BuildOutput:
    def __init__(self, location: str | Path, staging: Path | None = None, settings: RemoteSettings | None = None):
        self.location = str(location)
        self.remote = is_remote(self.location)
        # Parts of an array job (and this build's own workers) add files meanwhile: no cached listings.
        self.settings = settings or RemoteSettings(storage_options={"use_listings_cache": False})
        if self.remote and self.location.startswith(("http://", "https://")):
            raise DataError(f"--out {self.location}: HTTP servers are read-only here; build into s3://, gs:// or a folder")
        self.staging_root = (staging or Path(tempfile.gettempdir()) / "vdep-build-staging" /
                             self.location.replace("://", "/")) if self.remote else None
        self._default_staging = staging is None

    def __str__(self) -> str:
        return self.location

    @property
    def local(self) -> Path:
        """The folder files are written in: the output itself, or this process's staging area."""
        if self.staging_root is None:
            return Path(self.location)
        key = (self.staging_root, os.getpid())
        if key not in _AREAS:
            _AREAS[key] = StagingArea(self.staging_root)
        return _AREAS[key].folder

    def path(self, name: str) -> Path:
        """Where `name` is written (the file itself, or its copy in the staging folder)."""
        return self.local / name

    def url(self, name: str) -> str:
        return join(self.location, name) if self.remote else str(self.local / name)

    def prepare(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)

    def remove_stale_staging(self) -> list[str]:
        """Remove the staging areas of dead processes (a killed build's, a finished build's workers'); a
        local output has none. Returns the areas removed."""
        if self.staging_root is None:
            return []
        own = _AREAS.get((self.staging_root, os.getpid()))
        return remove_stale_areas(self.staging_root, own.lock_path if own is not None else None)

    def end_staging(self) -> None:
        """The build is over (done or failed): remove this process's staging area and the dead ones."""
        if self.staging_root is None:
            return
        own = _AREAS.pop((self.staging_root, os.getpid()), None)
        if own is not None:
            own.remove()
        self.remove_stale_staging()
        if self._default_staging:  # (a --staging folder is the user's: it stays)
            with contextlib.suppress(OSError):  # empty now, unless another process stages there
                self.staging_root.rmdir()

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.local / name).is_file()
        fs = filesystem(self.location, self.settings)
        return bool(with_retries(self.settings, self.url(name), "looking it up", lambda: fs.exists(self.url(name))))

    def read_text(self, name: str) -> str | None:
        if not self.remote:
            path = self.local / name
            return path.read_text() if path.is_file() else None
        if not self.exists(name):
            return None
        fs = filesystem(self.location, self.settings)
        return with_retries(self.settings, self.url(name), "reading", lambda: fs.cat_file(self.url(name))).decode()

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path(name), text)
        self.publish(name)

    def publish(self, name: str) -> None:
        """Upload `name` from the staging folder (a no-op for a local folder, where it is in place)."""
        if not self.remote:
            return
        local, url = self.path(name), self.url(name)
        fs = filesystem(self.location, self.settings)
        with_retries(self.settings, url, "uploading", lambda: fs.put_file(str(local), url))
        local.unlink()

    def listing(self, pattern: str) -> set[str]:
        """Names (relative to the output, e.g. `shard_stats/000001.json`) of the files matching a glob pattern."""
        if not self.remote:
            return {str(p.relative_to(self.local)) for p in self.local.glob(pattern) if p.is_file()}
        fs = filesystem(self.location, self.settings)
        found = with_retries(self.settings, self.location, "listing", lambda: fs.glob(join(self.location, pattern)))
        prefix = self.location.partition("://")[2].rstrip("/") + "/"
        return {str(path).partition(prefix)[2] or str(path) for path in found}
