"""A registry that misbehaves on purpose, as a real HTTP server process on 127.0.0.1.

    python tests/hostile_registry.py LOG_FILE [SECRET]

prints its port on the first line of stdout, then serves until killed. The first component
of a repository name picks the misbehaviour (``silent/m:t``, ``tar/m:sparse``, ...; see
``Handler``). Every request is logged to LOG_FILE as one JSON line: method, path, host and
whether an Authorization header came. SECRET (e.g. an HF token) is echoed by ``echo/``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_WEIGHT = "application/vnd.cncf.model.weight.v1.tar"

BLOBS: dict[str, bytes] = {}
LOG_LOCK = threading.Lock()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(data: bytes) -> dict[str, Any]:
    BLOBS[digest(data)] = data
    return {"digest": digest(data), "size": len(data)}


def _entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    out = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if info.size:
        out += data + b"\0" * (-len(data) % 512)
    return out


def _pax_entry(pax: dict[str, str], data: bytes, name: str = "model/placeholder") -> bytes:
    """An entry whose extended header says what tarfile would never write itself."""
    header = tarfile.TarInfo._create_pax_generic_header(pax, tarfile.XHDTYPE, "utf-8")  # type: ignore[attr-defined]
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return header + info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024


def hostile_tars() -> dict[str, bytes]:
    big_header = tarfile.TarInfo("model/bomb.bin")
    big_header.size = 1 << 30  # says 1 GB, carries 10 kB
    return {
        # 10 kB stored, 1 GB once expanded
        "sparse": _pax_entry({"GNU.sparse.size": str(1 << 30), "GNU.sparse.map": "0,10240",
                              "GNU.sparse.name": "model/big.bin"}, b"x" * 10240, "model/big.bin") + END,
        "oversize": big_header.tobuf(tarfile.PAX_FORMAT) + b"x" * 10240 + END,
        "nul-name": _pax_entry({"path": "model/a\x00b"}, b"x") + END,
        "long-name": _entry("model/" + "a" * 5000, b"x") + END,
        "file-and-folder": _entry("model/a", b"x") + _entry("model/a/b", b"y") + END,
        "folder-then-file": _entry("model/a/", kind=tarfile.DIRTYPE) + _entry("model/a", b"x") + END,
        "twice": _entry("model/x", b"1") + _entry("model/x", b"2") + END,
        "dot-dot": _entry("model/../escaped", b"x") + END,
        "absolute": _entry("/tmp/escaped", b"x") + END,
        "symlink": _entry("model/link", kind=tarfile.SYMTYPE, link="/etc/passwd") + END,
        "hardlink": _entry("model/link", kind=tarfile.LNKTYPE, link="/etc/passwd") + END,
        "device": _entry("model/dev", kind=tarfile.CHRTYPE) + END,
        "fifo": _entry("model/fifo", kind=tarfile.FIFOTYPE) + END,
        "not-a-tar": b"this is not a tar archive at all" * 40,
        "truncated": _entry("model/x", b"x" * 4096)[:1500],
    }


def manifest_for(layers: list[dict[str, Any]], config: dict[str, Any] | None = None) -> bytes:
    config = config or {"mediaType": MODEL_CONFIG, **blob(b"{}")}
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": MODEL_ARTIFACT,
                       "config": config, "layers": layers}).encode()


def build_manifests() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for case, data in hostile_tars().items():
        out[f"tar:{case}"] = manifest_for([{"mediaType": MODEL_WEIGHT, **blob(data),
                                            "annotations": {"org.cncf.model.filepath": "x"}}])
    good = {"mediaType": MODEL_WEIGHT, **blob(_entry("model/x", b"x") + END)}
    cfg = {"mediaType": MODEL_CONFIG, **blob(b"{}")}
    shapes: dict[str, Any] = {
        "not-json": None,
        "not-object": [1, 2, 3],
        "layers-string": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": "all of them"},
        "size-string": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg,
                        "layers": [{**good, "size": "12"}]},
        "size-negative": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": [{**good, "size": -1}]},
        "digest-bad": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg,
                       "layers": [{**good, "digest": "sha256:../../etc/passwd"}]},
        "no-config": {"schemaVersion": 2, "mediaType": MANIFEST, "layers": [good]},
        "layer-not-object": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": ["x"]},
        "annotations-int": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg,
                            "layers": [{**good, "annotations": {"a": 1}}]},
        "schema-1": {"schemaVersion": 1, "mediaType": MANIFEST, "config": cfg, "layers": [good]},
        "deep-json": None,
        "count": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": [good] * 5000},
        "total": {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg,
                  "layers": [{**good, "size": 1 << 40}, {**good, "size": 1 << 40}]},
    }
    for name, doc in shapes.items():
        if name == "not-json":
            out[f"shape:{name}"] = b"{not json"
        elif name == "deep-json":
            out[f"shape:{name}"] = b"[" * 100_000 + b"]" * 100_000
        else:
            out[f"shape:{name}"] = json.dumps(doc).encode()
    out["many:layers"] = manifest_for([good] * 100_000)  # ~10 MB: over the manifest size cap
    return out


MANIFESTS = build_manifests()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    secret = ""
    log_path = ""

    def log_message(self, *args: Any) -> None:
        pass

    def _log(self) -> None:
        with LOG_LOCK, open(self.log_path, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                                "authorization": self.headers.get("Authorization")}) + "\n")

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _hang(self) -> None:
        while True:  # until the client goes away
            time.sleep(1)
            try:
                self.connection.settimeout(0.01)
                if self.connection.recv(1, 2) == b"":  # MSG_PEEK: closed?
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _drip(self, data: bytes, delay: float = 1.0) -> None:
        for i in range(len(data)):
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(delay)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802
        self.do_GET()

    def do_PUT(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self._log()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        port = self.server.server_address[1]
        if path == "/token":
            return self._send(200, json.dumps({"token": "token-for-loopback"}).encode())
        if not path.startswith("/v2/") or path == "/v2/":
            return self._send(200, b"{}")
        rest = path[len("/v2/"):]
        mode = rest.split("/", 1)[0]
        kind, ref = ("manifests", rest.rsplit("/manifests/", 1)[1]) if "/manifests/" in rest else \
            ("blobs", rest.rsplit("/blobs/", 1)[1]) if "/blobs/" in rest else ("other", "")
        auth = self.headers.get("Authorization")
        if mode == "silent":
            return self._hang()
        if mode == "drip":
            return self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        if mode == "dripbody" and kind == "blobs":
            data = BLOBS[ref]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self._drip(data)
        if mode == "loop":
            return self._send(302, headers={"Location": self.path})
        if mode == "file":
            return self._send(302, headers={"Location": "file:///etc/passwd"})
        if mode == "huge" and kind == "manifests":
            self.send_response(200)
            self.send_header("Content-Type", MANIFEST)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b" " * 65536
            try:
                for _ in range(100_000):  # 6.5 GB, unless the client stops reading
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass
            return None
        if mode == "echo":  # asks for a login, then echoes what it got (and a secret it knows)
            if not auth:
                return self._send(401, headers={"WWW-Authenticate": 'Basic realm="echo"'})
            body = json.dumps({"errors": [{"code": "DENIED", "message":
                                           f"you sent {auth}; hf token {self.secret}; \x1b[31mred\x1b[0m"}]})
            return self._send(400, body.encode())
        if mode == "realm-plain" and not auth:  # a token service on another host, over plain HTTP
            return self._send(401, headers={"WWW-Authenticate":
                                            'Bearer realm="http://tokens.example.com/token",service="x"'})
        if mode == "realm-loopback" and not auth:
            return self._send(401, headers={"WWW-Authenticate":
                                            f'Bearer realm="http://127.0.0.1:{port}/token",service="x"'})
        if mode == "basic" and not auth:  # asks for a login; any login will do
            return self._send(401, headers={"WWW-Authenticate": 'Basic realm="basic"'})
        if mode == "away":  # a login here, then the manifest is served from another host
            host = (self.headers.get("Host") or "").split(":")[0]
            if host == "127.0.0.1":
                if not auth:
                    return self._send(401, headers={"WWW-Authenticate": 'Basic realm="away"'})
                return self._send(307, headers={"Location": f"http://localhost:{port}{self.path}"})
            return self._send(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}')
        if kind == "manifests":
            key = f"{mode}:{ref}"
            if key in MANIFESTS:
                data = MANIFESTS[key]
                return self._send(200, data, {"Content-Type": MANIFEST, "Docker-Content-Digest": digest(data)})
            if mode == "dripbody":
                cfg = {"mediaType": MODEL_CONFIG, **blob(b"{}")}
                layer = {"mediaType": MODEL_WEIGHT, **blob(b"z" * 300_000)}
                data = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg,
                                   "layers": [layer]}).encode()
                return self._send(200, data, {"Content-Type": MANIFEST})
            return self._send(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such manifest"}]}')
        if kind == "blobs" and ref in BLOBS:
            return self._send(200, BLOBS[ref])
        return self._send(404, b"")


def main() -> None:
    Handler.log_path = sys.argv[1]
    Handler.secret = sys.argv[2] if len(sys.argv) > 2 else ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
