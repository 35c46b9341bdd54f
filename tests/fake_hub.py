"""The part of the Hugging Face Hub API a build uses, as a real HTTP server process on 127.0.0.1.

    python tests/fake_hub.py CONFIG_JSON LOG_FILE

prints its port on the first line of stdout and serves until killed. CONFIG_JSON:
``{"repos": {"acme/tiny": {"dir": "...", "commit": "<40 hex>", "branches": ["main"],
"token": null | "hf_...", "fail": null | 401 | 404 | 429 | 503, "slow": 0}}}``.

- ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}`` (revision resolution,
  ``HfApi.repo_info``)
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file list (``snapshot_download``)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: file metadata (``X-Repo-Commit``, ``ETag``) and bytes
- ``GET /datasets/{repo}/resolve/{commit}/{path}``: a file of a dataset repo (``"datasets": {...}``
  in CONFIG_JSON, entries like the repos'), as `finetune.dataset.hub` fetches them

A repo with ``token`` is gated: without ``Authorization: Bearer <token>`` it answers 401 with
``X-Error-Code: GatedRepo`` (and a body that echoes what it got, to test redaction). ``fail``
makes every answer of that repo this status; ``slow`` delays each answer by that many seconds.
Every request is logged as a JSON line: method, path, whether a token came.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CONFIG: dict[str, Any] = {}
LOG = ""
LOCK = threading.Lock()


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


def _files(repo: dict[str, Any]) -> dict[str, bytes]:
    root = Path(repo["dir"])
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, code: int, error_code: str, message: str) -> None:
        self._json({"error": message}, code, {"X-Error-Code": error_code, "X-Error-Message": message})

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization") or ""
        with LOCK, open(LOG, "a") as f:
            f.write(json.dumps({"method": self.command, "path": path, "token": bool(auth)}) + "\n")
        if path.startswith("/datasets/"):
            return self._dataset(path[len("/datasets/"):])
        api = path.startswith("/api/models/")
        rest = path[len("/api/models/"):] if api else path.lstrip("/")
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        repo = CONFIG["repos"].get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        time.sleep(repo.get("slow", 0))
        if repo.get("fail"):
            code = int(repo["fail"])
            if code == 429:
                return self._json({"error": "Too many requests"}, 429, {"Retry-After": "1"})
            return self._json({"error": f"failing on purpose with {code}"}, code)
        if repo.get("token") and auth != f"Bearer {repo['token']}":
            # echoes what it got: a client must not print it back
            return self._error(401, "GatedRepo", f"Access to {repo_id} is restricted; you sent {auth!r}")
        commit = repo["commit"]
        if api and len(parts) >= 4 and parts[2] in ("revision", "tree"):
            rev = parts[3]
            if rev != commit and rev not in repo.get("branches", ["main"]):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = _files(repo)
            if parts[2] == "revision":
                return self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                   "gated": "manual" if repo.get("token") else False,
                                   "siblings": [{"rfilename": name} for name in files]})
            return self._json([{"type": "file", "path": name, "size": len(data), "oid": _git_blob_sha(data)}
                               for name, data in files.items()])
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            rev, name = parts[3], "/".join(parts[4:])
            if rev != commit and rev not in repo.get("branches", ["main"]):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            data = _files(repo).get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {rev}")
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_sha(data)}"',
                                          "Content-Type": "application/octet-stream"})
        return self._error(404, "EntryNotFound", f"no route for {path}")

    def _dataset(self, rest: str) -> None:
        """``GET /datasets/{repo}/resolve/{commit}/{path}`` of a repo in CONFIG["datasets"]."""
        parts = rest.split("/")
        repo = CONFIG.get("datasets", {}).get("/".join(parts[:2]))
        if repo is None or len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", f"Dataset {'/'.join(parts[:2])} not found")
        if parts[3] != repo["commit"]:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {parts[3]}")
        name = "/".join(parts[4:])
        data = _files(repo).get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {parts[3]}")
        return self._send(200, data, {"X-Repo-Commit": repo["commit"], "Content-Type": "application/octet-stream"})


def main() -> None:
    global LOG
    CONFIG.update(json.loads(Path(sys.argv[1]).read_text()))
    LOG = sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
