"""Hostile clients against a real server process (the tests' tiny model, real sockets): a
streaming client that stops reading, request bodies at the size limit made of 30,000 messages,
and whether threads and memory come back after a burst of them.

benchmarks/hostile_clients.py measures the same at the issue's scale (60 stalled readers,
medians of several runs); these keep to what CI can afford (~1 minute) and hold the outcomes.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from test_server import CONTEXT, MODEL_ID, Running, serve, served_model  # noqa: F401 - the tiny model's fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> Path:
    """test_server's tiny model (its session fixture: built once, then a cache hit)."""
    return Path(request.getfixturevalue("served_model"))

BIG_MESSAGES = 30_000


def _stalled_stream(port: int, max_tokens: int = 4000) -> socket.socket:
    """A streaming request from a client that never reads its answer (a 4 KiB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _big_body() -> bytes:
    # Compact: 30,000 messages in ~0.94 MiB, under the 1 MiB body limit.
    return json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}] * BIG_MESSAGES},
                      separators=(",", ":")).encode()


def _post_raw(port: int, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _health_ms(port: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000


def _rss_threads(s: Running) -> tuple[float, int]:
    status = Path(f"/proc/{s.proc.pid}/status").read_text().splitlines()
    rss = int(next(x for x in status if x.startswith("VmRSS:")).split()[1]) / 1024
    return rss, int(next(x for x in status if x.startswith("Threads:")).split()[1])


def _wait(condition, seconds: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_client_that_stops_reading_gives_up_its_slot(model: Path, tmp_path: Path) -> None:
    """Its socket buffers fill, writing stalls for --write-timeout, the connection is dropped, the
    generation cancelled and the slot free for the next client. (Before: held for ever.)"""
    with serve(model, tmp_path, "--max-concurrency", "1", "--queue-size", "0", "--write-timeout", "1") as s:
        sock = _stalled_stream(s.port)
        try:
            _wait(lambda: s.metric("olive_server_requests_generating") == 1, 30, "the stream never started")
            # Until it is freed, the one slot is taken: another request is refused.
            assert s.post("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2})[0] == 429
            # Filling ~200 KB of buffers takes ~1,000 tokens (1-5 s on 2 busy cores), then 1 s of stall.
            freed = _wait(lambda: s.metric("olive_server_stalled_clients_dropped_total") >= 1, 45,
                          "the stalled client kept its slot")
            _wait(lambda: s.metric("olive_server_requests_generating") == 0, 5, "the slot was not freed")
            assert "read nothing for 1 s" in s.log.read_text()
            code, _, body = s.post("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user",
                                                                                             "content": "x"}],
                                                             "max_tokens": 2})
            assert code == 200 and body["usage"]["completion_tokens"] == 2
            # The connection was dropped: what the client finally reads ends (EOF or a reset).
            sock.settimeout(10)
            with pytest.raises(OSError):
                while sock.recv(1 << 20):
                    pass
                raise ConnectionResetError("EOF")
            print(f"slot freed {freed:.1f} s after the stream started (write timeout 1 s)")
        finally:
            sock.close()


def test_health_answers_while_large_bodies_are_parsed(model: Path, tmp_path: Path) -> None:
    """8 clients post 30,000-message chats (~0.94 MiB each) over and over; /health stays quick.
    (Before: each body held the event loop ~1.7 s on this machine; /health took seconds.)"""
    with serve(model, tmp_path) as s:
        body = _big_body()
        answers: list[tuple[int, dict]] = []
        stop = threading.Event()

        def poster() -> None:
            while not stop.is_set():
                answers.append(_post_raw(s.port, body))

        threads = [threading.Thread(target=poster) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)  # the bodies are arriving and being parsed
            latencies = []
            end = time.monotonic() + 4
            while time.monotonic() < end:
                latencies.append(_health_ms(s.port))
                time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join()
        print(f"/health under 8 streams of large bodies: median {statistics.median(latencies):.0f} ms, "
              f"max {max(latencies):.0f} ms over {len(latencies)}; {len(answers)} bodies answered")
        # Measured on 2 busy cores: median ~30 ms, max ~80-160 ms (before: seconds). Margins for a busier CI.
        assert statistics.median(latencies) < 500 and len(latencies) >= 8
        assert answers and all(code == 400 and b["error"]["code"] == "context_length_exceeded" for code, b in answers)
        assert f"{BIG_MESSAGES} messages" in answers[0][1]["error"]["message"]
        assert str(CONTEXT) in answers[0][1]["error"]["message"]


def test_threads_and_memory_come_back_after_a_burst(model: Path, tmp_path: Path) -> None:
    """Stalled readers, large bodies and normal and generator-path requests at once; once they are
    gone, the server's threads return to their idle count and its memory close to its idle level.
    (Before: 6 threads idle, 11 for ever after; RSS +176 MB for ever after.)"""
    with serve(model, tmp_path, "--max-concurrency", "4", "--queue-size", "16", "--write-timeout", "1") as s:
        normal = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20,
                  "temperature": 0}
        sampled = {**normal, "temperature": 1.0, "seed": 7, "logprobs": True}  # the generator path

        def at_once(jobs: list) -> None:  # type: ignore[type-arg]
            threads = [threading.Thread(target=job) for job in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        # Warm: a full engine batch and the generator path have run once (their buffers are the plateau).
        at_once([lambda: s.post("/v1/chat/completions", normal)] * 4 + [lambda: s.post("/v1/chat/completions", sampled)])
        idle_threads = _wait_idle_threads(s)
        idle_rss = _rss_threads(s)[0]

        body = _big_body()
        socks = [_stalled_stream(s.port, max_tokens=2000) for _ in range(20)]
        at_once([lambda: _post_raw(s.port, body)] * 8 + [lambda: s.post("/v1/chat/completions", normal)] * 8
                + [lambda: s.post("/v1/chat/completions", sampled)] * 8)
        peak = _rss_threads(s)
        _wait(lambda: s.metric("olive_server_requests_generating") + s.metric("olive_server_requests_waiting") == 0,
              60, "the stalled readers kept their slots")
        for sock in socks:
            sock.close()
        after_threads = _wait_idle_threads(s, at_most=idle_threads)
        time.sleep(4)  # the idle trim runs after 2 s without requests
        after_rss = _rss_threads(s)[0]
        print(f"idle: {idle_rss:.0f} MB, {idle_threads} threads; peak {peak[0]:.0f} MB, {peak[1]} threads; "
              f"after: {after_rss:.0f} MB, {after_threads} threads")
        assert peak[1] > idle_threads  # the burst did start threads
        assert after_threads <= idle_threads
        # Measured: +10 to +45 MB after such a burst (CPython's and onnxruntime's free lists keep some).
        assert after_rss - idle_rss < 64, (idle_rss, after_rss)
        assert s.request("GET", "/health")[0] == 200


def _wait_idle_threads(s: Running, at_most: int | None = None) -> int:
    """The thread count once idle worker threads have ended (5 s without work), or ``at_most``."""
    deadline = time.monotonic() + 30
    last, since = _rss_threads(s)[1], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _rss_threads(s)[1]
        if at_most is not None and now <= at_most:
            return now
        if now != last:
            last, since = now, time.monotonic()
        elif at_most is None and time.monotonic() - since > 6:
            return now
    return last


@pytest.mark.parametrize(("config", "says"), [
    ({"engine": "lots"}, "`engine` and `engine.static_batching` must be objects"),
    ({"engine": {"static_batching": 7}}, "`engine` and `engine.static_batching` must be objects"),
    ({"engine": {"static_batching": {"max_batch_size": "lots"}}}, 'not "lots"'),
    ({"engine": {"static_batching": {"max_batch_size": 10**12}}}, "not 1000000000000"),
    ({"engine": {"static_batching": {"max_batch_size": 0}}}, "from 1 to 256, not 0"),
    ({"engine": {"static_batching": {"max_batch_size": True}}}, "not true"),
])
def test_a_genai_config_that_lies_about_its_engine_is_named(config: dict, says: str) -> None:
    from builder.serve.generator import _engine_section

    with pytest.raises(ValueError, match="genai_config.json: ") as caught:
        _engine_section(config)
    assert says in str(caught.value)
    assert _engine_section({"engine": {"static_batching": {"max_batch_size": 8}}})[1] == 8
    assert _engine_section({}) == ({}, None)
