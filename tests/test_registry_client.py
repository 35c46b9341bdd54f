"""The registry client's retry logic, against a small scripted HTTP server that fails on
purpose (503s, a connection reset mid-upload). The real-registry behaviour is covered by
test_distribute_integration.py; here only what a healthy registry never does."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.errors import RegistryError
from builder.oci import layout as oci
from builder.oci.media import MODEL_WEIGHT
from builder.oci.registry import Registry


class Script:
    def __init__(self, post_failures: int = 0, reset_puts: int = 0, always_503: bool = False):
        self.post_failures, self.reset_puts, self.always_503 = post_failures, reset_puts, always_503
        self.calls: list[str] = []
        self.stored: dict[str, bytes] = {}


def serve(script: Script):  # type: ignore[no-untyped-def]
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

        def _reply(self, code: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802
            script.calls.append("HEAD")
            self._reply(404)

        def do_POST(self) -> None:  # noqa: N802
            script.calls.append("POST")
            if script.always_503 or script.post_failures > 0:
                script.post_failures -= 1
                self._reply(503)
                return
            self._reply(202, {"Location": f"/v2/r/blobs/uploads/u{len(script.calls)}"})

        def do_PUT(self) -> None:  # noqa: N802
            script.calls.append("PUT")
            length = int(self.headers["Content-Length"])
            if script.reset_puts > 0:
                script.reset_puts -= 1
                self.rfile.read(length // 2)
                self.connection.shutdown(2)  # the connection drops mid-upload
                self.close_connection = True
                return
            body = self.rfile.read(length)
            digest = self.path.split("digest=")[1].replace("%3A", ":")
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
            script.stored[digest] = body
            self._reply(201)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def blob(tmp_path: Path) -> tuple[oci.Descriptor, Path]:
    data = b"x" * 3_000_000
    path = tmp_path / "blob"
    path.write_bytes(data)
    return oci.Descriptor(MODEL_WEIGHT, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)), path


@pytest.mark.parametrize("script,posts,puts", [(Script(post_failures=2), 3, 1), (Script(reset_puts=2), 3, 3)],
                         ids=["503s", "resets"])
def test_transient_failures_are_retried_and_the_upload_restarts(script, posts, puts, blob):  # type: ignore[no-untyped-def]
    server = serve(script)
    try:
        client = Registry(f"127.0.0.1:{server.server_port}", backoff=0.01, credentials=None)
        progress: list[int] = []
        assert client.push_blob("r", blob[0], blob[1], on_bytes=progress.append) == "uploaded"
        assert script.stored == {blob[0].digest: blob[1].read_bytes()}
        assert sum(progress) == blob[0].size  # what a failed attempt counted was taken back
        # 503s: the POST is retried; resets: each attempt starts a fresh upload session
        assert (script.calls.count("POST"), script.calls.count("PUT")) == (posts, puts)
    finally:
        server.shutdown()


def test_a_registry_that_keeps_failing_gets_a_clear_error(blob):  # type: ignore[no-untyped-def]
    script = Script(always_503=True)
    server = serve(script)
    try:
        client = Registry(f"127.0.0.1:{server.server_port}", backoff=0.01, retries=3, credentials=None)
        with pytest.raises(RegistryError, match="answered 503"):
            client.push_blob("r", blob[0], blob[1])
        assert script.calls.count("POST") == 4 * 4  # 4 upload attempts, each POST tried 4 times
    finally:
        server.shutdown()
