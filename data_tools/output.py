"""Where a shard build writes: a local folder, or a remote prefix (`s3://BUCKET/PREFIX`, `gs://...`).

A local folder is written in place, each file atomically (`vdep.atomic`). A remote prefix is written
through a local staging folder: every file is written there completely, then uploaded whole (one
`put`, which S3 and GCS publish atomically when it completes: a failed upload leaves no object under the
final name), then removed locally. A shard is uploaded before its done mark, so a done mark always
means its shard is there. Credentials and the endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vdep.atomic import atomic_write
from vdep.data.remote import RemoteSettings, filesystem, is_remote, join, with_retries
from vdep.errors import DataError


class BuildOutput:
    def __init__(self, location: str | Path, staging: Path | None = None, settings: RemoteSettings | None = None):
        self.location = str(location)
        self.remote = is_remote(self.location)
        # Parts of an array job (and this build's own workers) add files meanwhile: no cached listings.
        self.settings = settings or RemoteSettings(storage_options={"use_listings_cache": False})
        if self.remote and self.location.startswith(("http://", "https://")):
            raise DataError(f"--out {self.location}: HTTP servers are read-only here; build into s3://, gs:// or a folder")
        if self.remote:
            self.local = staging or Path(tempfile.gettempdir()) / "vdep-build-staging" / self.location.replace("://", "/")
        else:
            self.local = Path(self.location)

    def __str__(self) -> str:
        return self.location

    def path(self, name: str) -> Path:
        """Where `name` is written (the file itself, or its copy in the staging folder)."""
        return self.local / name

    def url(self, name: str) -> str:
        return join(self.location, name) if self.remote else str(self.local / name)

    def prepare(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)

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
