"""Real servers on 127.0.0.1 for the remote-data tests, started and stopped by the tests.

- `Nginx`: Debian's nginx with a private config (daemon off, its own pid, logs and temp folders):
  HTTP with Range, an optional rate limit, and an access log of the body bytes of every request.
- `FaultyHTTP`: a small threaded server of our own that serves a folder with Range and, on a schedule
  keyed by the request number, answers 503 or 429 (throttled), drops the connection part-way through
  the body, or stalls after the headers; it can also add a latency to every request and limit each
  connection's rate. It counts the requests and the body bytes it sent.
- `StallingProxy`: a TCP proxy that holds back the answers on chosen connections (a stalled S3 request).
- `MotoS3`: the S3 API (`moto_server`), with a bucket made for the test.
Each records the process or thread it started and stops exactly that.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------------ nginx
NGINX_CONFIG = """
daemon off;
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format bytes '$request_uri $status $body_bytes_sent $http_range';
    access_log {work}/access.log bytes;
    client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
    }}
}}
"""


@dataclass
class Nginx:
    root: Path
    work: Path
    limit_rate: str | None = None  # e.g. "25m": bytes per second per connection
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
        self.work.mkdir(parents=True, exist_ok=True)
        limit = f"limit_rate {self.limit_rate};" if self.limit_rate else ""
        # As root, nginx's workers would run as nobody, who may not read the test's private folders.
        user = "user root;" if os.geteuid() == 0 else ""
        (self.work / "nginx.conf").write_text(NGINX_CONFIG.format(work=self.work, port=self.port, root=self.root,
                                                                  limit=limit, user=user))
        self.process = subprocess.Popen([binary, "-c", str(self.work / "nginx.conf"), "-p", str(self.work)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, self.process)
        return self

    def bytes_sent(self) -> int:
        """Body bytes of every request so far (nginx writes the log line when a request ends)."""
        log = self.work / "access.log"
        if not log.is_file():
            return 0
        return sum(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())

    def clear_log(self) -> None:
        (self.work / "access.log").write_text("")
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGUSR1)  # reopen the log file

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


# ------------------------------------------------------------------------------------- a faulty server
@dataclass
class Faults:
    """What the server does to request number N (counting from 1, every request of any file)."""

    unavailable: set[int] = field(default_factory=set)  # answer 503 Service Unavailable
    throttled: set[int] = field(default_factory=set)  # answer 429 Too Many Requests, as a throttling store does
    drop_after: dict[int, int] = field(default_factory=dict)  # send this many body bytes, then close
    stall: dict[int, float] = field(default_factory=dict)  # send the headers, then nothing for this many seconds


class FaultyHTTP:
    def __init__(self, root: Path, faults: Faults | None = None, latency_s: float = 0.0, port: int = 0,
                 rate_bytes_per_s: float | None = None):
        self.root = root
        self.port = port  # 0: any free port
        self.rate_bytes_per_s = rate_bytes_per_s  # per connection, as nginx's limit_rate
        self.faults = faults or Faults()
        self.latency_s = latency_s
        self.requests = 0
        self.active = 0  # requests being answered (their body bytes are counted when sent)
        self.body_bytes = 0
        self.lock = threading.Lock()
        self.server: socketserver.ThreadingTCPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def settle(self, timeout_s: float = 10.0) -> FaultyHTTP:
        """Wait until no request is being answered: a client can hold its bytes before the handler has counted
        them."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def start(self) -> FaultyHTTP:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self.counted(head=True)

            def do_GET(self) -> None:
                self.counted(head=False)

            def counted(self, head: bool) -> None:
                with owner.lock:
                    owner.requests += 1
                    owner.active += 1
                    number = owner.requests
                try:
                    self.respond(head, number)
                finally:
                    with owner.lock:
                        owner.active -= 1

            def respond(self, head: bool, number: int) -> None:
                if owner.latency_s:
                    time.sleep(owner.latency_s)
                path = owner.root / self.path.split("?")[0].lstrip("/")
                refusal = 503 if number in owner.faults.unavailable else 429 if number in owner.faults.throttled else None
                if refusal is not None:
                    self.send_response(refusal)
                    if refusal == 429:
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start, end = 0, len(data)
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(end, int(match.group(2)) + 1) if match.group(2) else end
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if head:
                    return
                if number in owner.faults.stall:  # a stalled transfer: the client's timeout should give up first
                    self.wfile.flush()
                    time.sleep(owner.faults.stall[number])
                body = data[start:end]
                cut = owner.faults.drop_after.get(number)
                if cut is not None:
                    body = body[:cut]
                try:
                    self.send_body(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stall it timed out)
                    self.close_connection = True
                    return
                with owner.lock:
                    owner.body_bytes += len(body)
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def send_body(self, body: bytes) -> None:
                if not owner.rate_bytes_per_s:
                    self.wfile.write(body)
                    return
                chunk = 64 * 1024
                started = time.monotonic()
                for offset in range(0, len(body), chunk):
                    self.wfile.write(body[offset: offset + chunk])
                    ahead = (offset + chunk) / owner.rate_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)

        socketserver.ThreadingTCPServer.allow_reuse_address = True  # a restarted server takes its old port
        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# ------------------------------------------------------------------------------------- a stalling proxy
class StallingProxy:
    """A TCP proxy to a server on 127.0.0.1 that holds back answers for a while: on chosen connections
    (numbered from 1), and the answer to the first request whose bytes match `hold` (a regular expression
    over what the client sends, e.g. an S3 PUT of one key). The server has done the request; the client
    waits. `held` is set when an answer is being held back. For any protocol over HTTP/1.1 (S3's, through
    moto_server), without parsing it."""

    def __init__(self, upstream_port: int, stall: dict[int, float] | None = None, hold: bytes | None = None,
                 hold_s: float = 600.0):
        self.upstream_port = upstream_port
        self.stall = stall or {}
        self.hold = re.compile(hold) if hold is not None else None
        self.hold_s = hold_s
        self.held = threading.Event()
        self.connections = 0
        self.listener: socket.socket | None = None

    @property
    def url(self) -> str:
        assert self.listener is not None
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def start(self) -> StallingProxy:
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            # [seconds to hold the next answer back]: set by the request side, spent by the answer side
            pending = [self.stall.get(self.connections, 0.0)]
            threading.Thread(target=self._pump, args=(client, upstream, pending, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pending, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, pending: list[float], requests: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if requests and self.hold is not None and not self.held.is_set() and self.hold.search(chunk):
                    pending[0] = self.hold_s
                # An interim "100 Continue" (S3 clients send a body only after it) is no answer: it passes.
                if not requests and pending[0] and not chunk.startswith(b"HTTP/1.1 100"):
                    delay, pending[0] = pending[0], 0.0
                    self.held.set()
                    time.sleep(delay)
                target.sendall(chunk)
        except OSError:
            pass  # the other side gave up (a stall it timed out) or closed
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


# ------------------------------------------------------------------------------------------------ S3
@dataclass
class MotoS3:
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The standard variables a client (s3fs, boto3) reads the endpoint and credentials from."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> MotoS3:
        binary = Path(sys.executable).parent / "moto_server"
        command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)
        return self

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
