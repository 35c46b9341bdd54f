"""HTTP under a deadline: a watchdog that cuts a session's connections when an operation runs
past its time or a transfer stalls, and reading a streamed answer with a cap.

A socket timeout bounds each read, not a whole answer: a server that sends a byte every few
seconds never trips it. So every connection of a session mounted with ``watched_adapter`` is
tracked by a ``Watchdog`` whose thread watches the clock and shuts the sockets down, which
makes the blocked read return at once (requests raises, and ``Watchdog.expired`` says why).
With a window, every ``MIN_PROGRESS`` bytes moved push the deadline on by the window: long
transfers live, stalled ones do not.

Not OCI-specific, so not under ``builder/oci``: the registry client (``builder.oci.registry``)
and the Hub's dataset downloads (``builder.source.hub``) both use it. It imports requests
and urllib3, which only the driver has: the container side never imports it.
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from typing import Any

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from builder.errors import ContentError

MIN_PROGRESS = 64 << 10  # bytes a transfer must move per window to keep its deadline moving


class Watchdog:
    """Cuts the connections it tracks when an operation runs past its deadline.

    ``arm(seconds)`` before an operation, ``progress(n)`` as bytes move (with ``window=True``),
    ``disarm()`` after it; ``expired`` tells a caller whose request failed that it was cut.
    """

    def __init__(self) -> None:
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._window = 0.0
        self._moved = 0
        self.expired = False
        self._thread: threading.Thread | None = None

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.add(conn)

    def arm(self, seconds: float, *, window: bool = False) -> None:
        with self._lock:
            self._deadline = time.monotonic() + seconds
            self._window = seconds if window else 0.0
            self._moved = 0
            self.expired = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="http-deadline", daemon=True)
                self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def progress(self, n: int) -> None:
        if n <= 0 or not self._window:
            return
        with self._lock:
            self._moved += n
            if self._moved >= MIN_PROGRESS and self._deadline is not None:
                self._deadline = time.monotonic() + self._window
                self._moved = 0

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(0.1)
            with self._lock:
                now = time.monotonic()
                if self._deadline is None:
                    if now - idle_since > 5:  # nothing to watch: let the thread go
                        self._thread = None
                        return
                    continue
                idle_since = now
                if now < self._deadline:
                    continue
                self.expired = True
                self._deadline = None
                conns = list(self._conns)
            for conn in conns:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def watched_adapter(watchdog: Watchdog) -> requests.adapters.HTTPAdapter:
    """An adapter whose every connection (proxied ones included) the watchdog can cut."""

    class Conn(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self)

    class TLSConn(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    classes = {"http": Pool, "https": TLSPool}

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = classes

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            manager.pool_classes_by_scheme = classes
            return manager

    return Adapter(max_retries=0)


def read_capped(r: requests.Response, cap: int, what: str) -> bytes:
    """The body of a streamed response, refusing more than ``cap`` bytes."""
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        r.close()
        raise ContentError(f"{what} is {int(declared)} bytes, more than the {cap} allowed; refused.")
    chunks: list[bytes] = []
    size = 0
    for chunk in r.iter_content(65536):
        size += len(chunk)
        if size > cap:
            r.close()
            raise ContentError(f"{what} is more than the {cap} bytes allowed; refused.")
        chunks.append(chunk)
    return b"".join(chunks)




def watched_session(watchdog: Watchdog) -> requests.Session:
    """A requests session whose every connection, plain or TLS, ``watchdog`` can cut."""
    session = requests.Session()
    adapter = watched_adapter(watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
