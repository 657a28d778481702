"""TEST DOUBLE of the Hub's write API, for upload tests on 127.0.0.1. Not a Hub: it speaks exactly the calls
huggingface_hub 2.4 makes for `create_repo`, `create_branch` and `create_commit`, and nothing else.

olah (tests/hub_server.py) serves git repos read-only, so uploads land here instead: each accepted commit
becomes a git commit on the named branch of `MIRRORS/models/ORG/NAME`, the folder olah serves, so a test can
upload here and download the same repo back through olah.

What it implements (all under HF_ENDPOINT = `url`; every request needs `Authorization: Bearer <token>`,
anything else gets the Hub's 401):
  POST /api/repos/create                         new repo with the Hub's initial commit (.gitattributes); 409
                                                 when it exists
  POST /api/validate-yaml                        parses a README.md's YAML front matter (400 when invalid)
  POST /api/models/ORG/NAME/branch/BRANCH        branch from main; 409 when it exists
  POST /api/models/ORG/NAME/preupload/REVISION   answers uploadMode "regular" for every file
  POST /api/models/ORG/NAME/commit/REVISION      NDJSON: header, then `file` (base64) / `deletedFile` lines
  GET  /api/models/ORG/NAME[/revision/REV]       repo info (huggingface_hub asks for it after a 401)
Deliberate difference from the real Hub: "regular" upload mode for every file means file contents travel
base64-inlined in the commit payload; the real Hub answers "lfs" for large and binary files and huggingface_hub
then uploads them through Xet/LFS first. The double refuses `lfsFile` lines rather than pretend to store them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

FAKE_HUB_TOKEN = "hf_quantkitFakeTokenForTests0123456789"
"""The token the double accepts (tests assert it never appears in any output, log, card or stored file)."""
GIT_IDENTITY = ["-c", "user.name=hub-upload-double", "-c", "user.email=double@quantkit.invalid"]
INITIAL_GITATTRIBUTES = b"# initial commit of the upload double: files are stored as plain git blobs (no LFS)\n"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    authorization: str | None
    status: int


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


class HubUploadDouble:
    """The double's server. `requests` records every request (method, path, Authorization header, status)."""

    def __init__(self, mirrors: Path, token: str) -> None:
        self.mirrors = mirrors
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.private: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo_dir(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def log(self, commit: str, repo_id: str) -> str:
        """The full commit message of `commit` in `repo_id`."""
        return _git(self.repo_dir(repo_id), "log", "-1", "--format=%B", commit)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Requests are recorded in `HubUploadDouble.requests`; stderr stays quiet."""

    @property
    def double(self) -> HubUploadDouble:
        return self.server.double  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization")
        if auth != f"Bearer {self.double.token}":
            self._reply(method, 401, {"error": "Invalid credentials in Authorization header"})
            return
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            status, answer = self._route(method, parts, body)
        except subprocess.CalledProcessError as err:
            status, answer = 500, {"error": f"git failed: {err.stderr}"}
        self._reply(method, status, answer)

    def _route(self, method: str, parts: list[str], body: bytes) -> tuple[int, dict[str, Any]]:
        double = self.double
        if method == "POST" and parts == ["api", "repos", "create"]:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            return self._create(repo_id, request.get("visibility") == "private")
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body)["content"])
        if len(parts) < 4 or parts[:2] != ["api", "models"]:
            return 404, {"error": f"the upload double does not implement {method} /{'/'.join(parts)}"}
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        repo = double.repo_dir(repo_id)
        if not (repo / ".git").is_dir():
            return 404, {"error": f"Repository Not Found for url: {repo_id}"}
        if method == "GET" and (not rest or rest[0] == "revision"):
            revision = "/".join(rest[1:]) or "main"
            try:
                sha = _git(repo, "rev-parse", "--verify", f"{revision}^{{commit}}")
            except subprocess.CalledProcessError:
                return 404, {"error": f"Invalid rev id: {revision}"}
            return 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": double.private.get(repo_id)}
        if method == "POST" and rest[:1] == ["branch"]:
            branch = "/".join(rest[1:])
            if branch in _git(repo, "branch", "--format=%(refname:short)").splitlines():
                return 409, {"error": f"Branch {branch} already exists"}
            _git(repo, "branch", branch, "main")
            return 200, {}
        if method == "POST" and rest[:1] == ["preupload"]:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        if method == "POST" and rest[:1] == ["commit"]:
            return self._commit(repo, repo_id, "/".join(rest[1:]), body)
        return 404, {"error": f"the upload double does not implement {method} /{'/'.join(parts)}"}

    def _create(self, repo_id: str, private: bool) -> tuple[int, dict[str, Any]]:
        double = self.double
        repo = double.repo_dir(repo_id)
        with double._lock:
            if repo.exists():
                return 409, {"error": "You already created this model repo", "url": f"{double.url}/{repo_id}"}
            repo.mkdir(parents=True)
            _git(repo, "init", "-q", "-b", "main")
            (repo / ".gitattributes").write_bytes(INITIAL_GITATTRIBUTES)
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", "initial commit")
            double.private[repo_id] = private
        return 200, {"url": f"{double.url}/{repo_id}", "name": repo_id}

    @staticmethod
    def _validate_yaml(content: str) -> tuple[int, dict[str, Any]]:
        if not content.startswith("---"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content[3:].split("\n---", 1)[0])
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata is not a mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo: Path, repo_id: str, revision: str, body: bytes) -> tuple[int, dict[str, Any]]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the commit payload must start with a header line"}
        header = lines[0]["value"]
        with self.double._lock:
            if revision not in _git(repo, "branch", "--format=%(refname:short)").splitlines():
                return 404, {"error": f"Invalid rev id: {revision}"}
            _git(repo, "checkout", "-q", revision)
            if header.get("parentCommit") and header["parentCommit"] != _git(repo, "rev-parse", "HEAD"):
                return 412, {"error": "A commit has happened since. Please refresh and try again."}
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                target = repo / value["path"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    target.unlink()
                else:
                    return 400, {"error": f"the upload double takes regular files only, not {key!r} lines"}
            _git(repo, "add", "-A")
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            _git(repo, "commit", "-q", "--allow-empty", "-m", message)
            sha = _git(repo, "rev-parse", "HEAD")
            _git(repo, "checkout", "-q", "main")
        return 200, {"commitUrl": f"{self.double.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                     "pullRequestUrl": None}

    def _reply(self, method: str, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and "error" in answer:
            self.send_header("X-Error-Message", answer["error"])
        self.end_headers()
        self.wfile.write(data)
        self.double.requests.append(RecordedRequest(method, self.path, self.headers.get("Authorization"), status))
