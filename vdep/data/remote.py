"""Shards in object storage: `https://HOST/PREFIX/`, `s3://BUCKET/PREFIX/`, `gs://BUCKET/PREFIX/`.

Remote files are read through fsspec (the optional extra `vdep[remote]`: fsspec's HTTP filesystem,
s3fs, gcsfs) in ranged requests of `data.remote.request_mb`, each retried on its own. A transport
fault (a timeout, a refused or dropped connection, HTTP 5xx, a throttling answer, a body cut short) is
retried with exponential backoff, from the first byte the failed request was to deliver, so the bytes a
reader sees are exactly the file's; when the retries are spent the run stops with a `TransportError`
that names the URL, the byte and the cause. A shard that does not exist or may not be read (404,
access denied) is a `MissingShardError` at once: a shard the manifest names is never skipped. Only
corrupt data inside a well-transferred shard becomes a counted skip (the tar reader's business).

Credentials and endpoints come from each filesystem's standard environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...) and the non-secret
`data.remote.storage_options`; a secret in the config file is refused.
"""

from __future__ import annotations

import errno
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError

REMOTE_SCHEMES = ("http", "https", "s3", "gs")
# storage_options keys that hold secrets: they belong in the environment, not in a config file that is
# copied into every run directory.
SECRET_OPTIONS = ("key", "secret", "token", "password", "client_secret", "secret_access_key", "access_key_id",
                  "session_token", "aws_secret_access_key", "aws_access_key_id", "aws_session_token", "headers")


class TransportError(DataError):
    """A remote file could not be read after every retry: the run stops (it never skips the data)."""


class MissingShardError(DataError):
    """A file the shard manifest names does not exist or may not be read."""


def is_remote(location: str) -> bool:
    return location.partition("://")[0] in REMOTE_SCHEMES and "://" in location


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


@dataclass(frozen=True)
class RemoteSettings:
    """How remote files are read: the config's `data.remote` section."""

    # A transport fault (timeout, refused or dropped connection, HTTP 5xx, throttling, a cut transfer) is
    # retried this many times, waiting backoff_s, 2·backoff_s, ... (at most max_backoff_s) in between.
    retries: int = 8
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # Size of one ranged request; a failed request is fetched again whole.
    request_mb: float = 8.0
    # A request that receives nothing for this long (connecting, waiting for the answer, or between two reads
    # of its body) is a transport fault, retried as above; a slow transfer that keeps moving is not cut.
    timeout_s: float = 60.0
    # Passed to fsspec's filesystem (e.g. endpoint_url, client_kwargs); never credentials (use the
    # environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def request_bytes(self) -> int:
        return max(1, int(self.request_mb * 2**20))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (from 1)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))

    def filesystem_options(self, scheme: str) -> dict[str, Any]:
        """`storage_options` with `timeout_s` set where each filesystem takes it: aiohttp's ClientTimeout for
        HTTP (fsspec's `client_kwargs`) and GCS (gcsfs' `session_kwargs`), botocore's connect and read
        timeouts for S3 (s3fs' `config_kwargs`). Without it, aiohttp waits up to 300 s for a stalled request."""
        options = dict(self.storage_options)
        if scheme in ("http", "https", "gs"):
            import aiohttp

            # No `total`: a large request that keeps receiving is slow, not stalled.
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_connect=self.timeout_s,
                                            sock_read=self.timeout_s)
            key = "session_kwargs" if scheme == "gs" else "client_kwargs"
            options[key] = {**options.get(key, {}), "timeout": timeout}
        elif scheme == "s3":
            options["config_kwargs"] = {**options.get("config_kwargs", {}), "connect_timeout": self.timeout_s,
                                        "read_timeout": self.timeout_s}
        return options


# Where a filesystem's own timeouts would go in storage_options: data.remote.timeout_s sets them all.
TIMEOUT_OPTIONS = {"timeout": (), "requests_timeout": (), "client_kwargs": ("timeout",),
                   "session_kwargs": ("timeout",), "config_kwargs": ("connect_timeout", "read_timeout")}


def check_storage_options(options: dict[str, Any], where: str) -> None:
    secrets = sorted(key for key in options if key.lower() in SECRET_OPTIONS)
    if secrets:
        raise ConfigError(
            f"'{where}' holds {', '.join(secrets)}: credentials never go into a config file (it is copied into the "
            "run directory); set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, ...) or the filesystem's own config files"
        )
    for key, inner in TIMEOUT_OPTIONS.items():
        if key not in options:
            continue
        value = options[key]
        named = [f"{key}.{name}" for name in inner if isinstance(value, dict) and name in value] if inner else [key]
        if named:
            raise ConfigError(
                f"'{where}' sets {', '.join(named)}: the request timeout is data.remote.timeout_s, which vdep passes "
                "to every filesystem (HTTP, S3, GCS); set that instead"
            )


# -------------------------------------------------------------------------------------- classifying
_TRANSIENT_NAMES = {
    "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError", "ServerDisconnectedError",  # aiohttp
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",  # botocore
    "ResponseStreamingError", "IncompleteReadError",
}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH}


def is_transient(exc: BaseException) -> bool:
    """A fault of the transport (worth retrying), as opposed to a missing or forbidden file."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        # fsspec's HTTP filesystem reports a 503 or a refused connection while asking a file's size as
        # FileNotFoundError too, with the real error as its cause.
        cause = exc.__cause__
        return cause is not None and cause is not exc and is_transient(cause)
    status = getattr(exc, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if {cls.__name__ for cls in type(exc).__mro__} & _TRANSIENT_NAMES:
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__
    # fsspec's HTTP filesystem reports a 503 while asking a size as FileNotFoundError(url): the cause says what it was.
    because = f" (from {type(cause).__name__}: {str(cause).strip()[:200]})" if cause is not None and cause is not exc else ""
    return f"{type(exc).__name__}: {text[:200]}{because}"


# --------------------------------------------------------------------------------------- filesystems
def filesystem(url: str, settings: RemoteSettings):
    """The fsspec filesystem of `url`. fsspec keeps one instance per arguments and process (it starts
    afresh in a forked DataLoader worker, whose parent's event-loop thread does not exist there)."""
    scheme = url.partition("://")[0]
    try:
        import fsspec

        return fsspec.filesystem(scheme, **settings.filesystem_options(scheme))
    except ImportError as exc:
        raise ConfigError(f"reading {url} needs fsspec and its {scheme} filesystem ({exc}); pip install 'vdep[remote]'") from None


def with_retries(settings: RemoteSettings, url: str, what: str, action):
    """`action()`, retried on transport faults; a missing file or the last failure becomes a DataError."""
    for attempt in range(settings.retries + 1):
        try:
            return action()
        except Exception as exc:  # classified below: transport faults are retried, the rest are errors
            if not is_transient(exc):
                if isinstance(exc, (FileNotFoundError, PermissionError)) or getattr(exc, "status", 0) in (401, 403, 404):
                    raise MissingShardError(f"{url}: {what} failed: {describe(exc)} (does it exist, and may this job "
                                            "read it?)") from None
                raise
            if attempt == settings.retries:
                raise TransportError(
                    f"{url}: {what} failed {settings.retries + 1} times; the last error: {describe(exc)}. The data "
                    "was not skipped: fix the connection and run the same command to continue from the last "
                    "checkpoint (adding data.remote.retries=N, or another data.remote.timeout_s or backoff_s, if "
                    "the store needs more patience: these may change on resume)"
                ) from None
            time.sleep(settings.delay(attempt + 1))
    raise AssertionError("unreachable")


def read_text(url: str, settings: RemoteSettings) -> str:
    """A small remote file (sizes.json, a shard's stats), whole."""
    fs = filesystem(url, settings)
    return with_retries(settings, url, "reading", lambda: fs.cat_file(url)).decode()


class RemoteFile(io.RawIOBase):
    """Read-only, seekable view of a remote file, one ranged request per `read` (at most `request_bytes`).

    Wrapped in an `io.BufferedReader` of `request_bytes`, every buffer fill is one request; a failed
    request is retried from its first byte, so a dropped connection costs at most one request's bytes.
    Reading on from where the last request ended, the next request is already under way (one request
    ahead, in a thread), so the transfer overlaps the decoding of what was read.
    """

    def __init__(self, url: str, settings: RemoteSettings):
        super().__init__()
        self.url = url
        self.settings = settings
        self.fs = filesystem(url, settings)
        self._size: int | None = None  # asked once, when first needed (ranged reads of known bytes never need it)
        self.position = 0
        self._ahead: tuple[int, int, Future] | None = None  # (start, end, the request in flight)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        super().close()

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = int(with_retries(self.settings, self.url, "asking its size", lambda: self.fs.size(self.url)))
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        start = self.position
        end = min(self.size, start + len(buffer), start + self.settings.request_bytes)
        if end <= start:
            return 0
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, end):
            data = ahead[2].result()  # its errors, retries included, surface here
        else:
            if ahead is not None:
                ahead[2].cancel()
            data = self.read_range(start, end)
        buffer[: len(data)] = data
        self.position = end
        self.read_ahead()
        return len(data)

    def read_ahead(self) -> None:
        """Start the request for the bytes after the current position (if any are left)."""
        following = (self.position, min(self.size, self.position + self.settings.request_bytes))
        if following[1] > following[0]:
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="vdep-read-ahead")
            self._ahead = (*following, self._pool.submit(self.read_range, *following))

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) exactly: a short or oversized answer counts as a failed transfer."""
        def fetch() -> bytes:
            data = self.fs.cat_file(self.url, start=start, end=end)
            if len(data) != end - start:
                raise ConnectionError(f"asked for bytes {start}-{end - 1}, received {len(data)} bytes")
            return data

        return with_retries(self.settings, self.url, f"reading bytes {start}-{end - 1}", fetch)


def open_remote(url: str, settings: RemoteSettings, offset: int = 0) -> io.BufferedReader:
    """A buffered stream from `offset` on, its first request already under way."""
    raw = RemoteFile(url, settings)
    raw.seek(offset)
    raw.read_ahead()
    return io.BufferedReader(raw, buffer_size=settings.request_bytes)
