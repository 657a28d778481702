"""A local Hub for tests: olah serving plain git repos on 127.0.0.1, plus a proxy for what olah cannot do.

olah (offline mode, `mirrors-path`) answers the Hub API and file downloads for `models/ORG/NAME` git repos
(branch `main`). It does not honour HTTP Range (its mirror answers 200 with the whole file), cannot cut or
stall a transfer and has no gated repos; `HubProxy` sits in front of it and plays those parts, recording
every request so tests can prove what went over the wire.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commit_model_repo(mirrors: Path, repo_id: str, files: dict[str, bytes]) -> str:
    """Create `mirrors/models/ORG/NAME` as a git repo on branch `main` holding `files`; returns the commit."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    identity = ["-c", "user.name=quantkit-tests", "-c", "user.email=tests@quantkit.invalid"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], [*identity, "commit", "-q", "-m", "model"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


class OlahServer:
    """`olah-cli -c config.toml` on a free port; `log_text()` is its access log (one line per request)."""

    def __init__(self, workdir: Path, mirrors: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "olah.log"
        netloc = f"127.0.0.1:{self.port}"
        (workdir / "config.toml").write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{workdir / "repos"}"\nmirrors-path = ["{mirrors}"]\n'
            f'mirror-scheme = "http"\nmirror-netloc = "{netloc}"\nmirror-lfs-netloc = "{netloc}"\n'
            "[accessibility]\noffline = true\n"
        )
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                ["olah-cli", "-c", "config.toml"],
                cwd=self.workdir,  # olah writes ./logs and its repos-path cache here
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"olah exited with {self._process.returncode}:\n{self.log_text()}")
            if "Uvicorn running" in self.log_text():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not start within {timeout_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@dataclass(frozen=True)
class ServedRepo:
    """A model repo the local Hub serves: its `main` commit and the exact bytes of each file."""

    repo_id: str
    commit: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class LocalHub:
    url: str
    server: OlahServer
    tiny: ServedRepo
    other: ServedRepo
    large: ServedRepo


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class HubProxy:
    """HTTP proxy to an upstream Hub (olah) with three test knobs, all keyed by file name or repo id:
    `cut_after[name] = n` sends n body bytes of that file's next GET, then drops the connection (once);
    `stall_after[name] = n` sends n bytes, then hangs until `stop()` (for killing a client mid-transfer);
    `gated` repos get the Hub's 401 + `X-Error-Code: GatedRepo`. Range requests get 206 with the tail."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.cut_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.gated: set[str] = set()
        self.requests: list[ProxiedRequest] = []
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, name: str) -> list[ProxiedRequest]:
        """GET requests for files called `name` (the last path segment), oldest first."""
        return [r for r in self.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] == name]


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Requests are recorded in `HubProxy.requests`; stderr stays quiet."""

    def do_HEAD(self) -> None:
        self._forward("HEAD")

    def do_GET(self) -> None:
        self._forward("GET")

    def _forward(self, method: str) -> None:
        proxy: HubProxy = self.server.proxy  # type: ignore[attr-defined]
        requested_range = self.headers.get("Range")
        gated = next((repo for repo in proxy.gated if f"/{repo}/" in self.path), None)
        if gated is not None:
            self._gated_answer(proxy, method, gated)
            return
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
        skip = {"host", "range", "accept-encoding", "connection"}
        upstream.request(
            method, self.path, headers={k: v for k, v in self.headers.items() if k.lower() not in skip}
        )
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        status = response.status
        hop_by_hop = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in hop_by_hop]
        length = int(response.getheader("content-length") or 0) if method == "HEAD" else len(body)
        if method == "GET" and requested_range and status == 200:
            start = int(requested_range.removeprefix("bytes=").split("-")[0])
            headers.append(("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"))
            status, body, length = 206, body[start:], len(body) - start
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD":
            proxy.requests.append(ProxiedRequest(method, self.path, requested_range, status, 0))
            return
        name = self.path.rsplit("/", 1)[-1]
        cut = proxy.cut_after.pop(name, None)
        stall = proxy.stall_after.get(name)
        sent = body[: cut if cut is not None else stall if stall is not None else len(body)]
        self.wfile.write(sent)
        self.wfile.flush()
        proxy.requests.append(ProxiedRequest(method, self.path, requested_range, status, len(sent)))
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif stall is not None:
            proxy.stalled.set()
            proxy._release.wait()
            self.close_connection = True

    def _gated_answer(self, proxy: HubProxy, method: str, repo: str) -> None:
        message = f"Access to model {repo} is restricted. You must have access to it and be authenticated."
        body = json.dumps({"error": message}).encode()
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(body)
        proxy.requests.append(ProxiedRequest(method, self.path, None, 401, len(body)))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition()` every 50 ms; the tests' only way to wait on another process."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
