"""Hostile clients against the model server: what they cost everyone else.

    python benchmarks/hostile_clients.py --model DIR [--runs 3] [--serve-python PY] [--tree DIR]
                                         [--server-arg=--write-timeout=10 ...]

Three scenarios, each against a fresh server process (`python -m builder.serve` from ``--tree``,
default this checkout, in the server's Python: onnxruntime-genai 0.18), medians of ``--runs``:

1. stalled readers: 4 generation slots, 16 waiting; 60 streaming clients send a long request
   and never read (a 4 KiB receive buffer). Then a normal client asks for 2 tokens, retrying on
   429: how long until it is answered (capped at 120 s), and when the first slot came free.
2. large bodies: 8 clients each post chats of 30,000 messages (~1 MiB, the body limit) for
   4 s while another client polls GET /health: its latency (median and max).
3. a burst and a soak: the idle server's RSS and threads, then the burst (stalled readers,
   large bodies, normal and generator-path requests at once), all clients gone, 15 s idle:
   RSS and threads again.

``--tree`` serves another copy of ``builder/`` (say, a checkout from before a change), so one
machine measures before and after alike. DIR is a model folder `build recipe` made (the tests'
tiny model: tests/test_server.py's ``served_model``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVE_PYTHON = os.environ.get("OLIVE_BUILDER_SERVE_PYTHON") or str(REPO / ".ci-state" / "serve-venv" / "bin" / "python")
BIG_MESSAGES = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One server process on loopback; stopped by its PID."""

    def __init__(self, python: str, tree: Path, model: Path, args: list[str]):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.log = open(os.environ.get("HOSTILE_SERVER_LOG", os.devnull), "wb")  # noqa: SIM115 - closed in stop()
        # cwd: `python -m` puts the working folder first on sys.path, ahead of PYTHONPATH.
        self.proc = subprocess.Popen([python, "-m", "builder.serve", "--model", str(model), "--port", str(self.port),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tree)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        self.model_id = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models").read())["data"][0]["id"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def post(self, payload: dict[str, Any], timeout: float = 60) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_threads(self) -> tuple[float, int]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        rss = int(next(x for x in status if x.startswith("VmRSS:")).split()[1]) / 1024
        threads = int(next(x for x in status if x.startswith("Threads:")).split()[1])
        return rss, threads


def stalled_stream(port: int, model_id: str) -> socket.socket:
    """A streaming request from a client that never reads its answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def big_body(model_id: str) -> bytes:
    # Compact, so that 30,000 messages stay under the 1 MiB body limit (~0.94 MiB).
    return json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}] * BIG_MESSAGES},
                      separators=(",", ":")).encode()


def post_raw(port: int, body: bytes, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def stalled_readers(server: Server, cap: float = 120) -> tuple[float, float]:
    """(seconds until a normal request is answered, seconds until the first slot is freed); cap if never."""
    socks = [stalled_stream(server.port, server.model_id) for _ in range(60)]
    started = time.monotonic()
    freed = [cap]
    done = threading.Event()

    def watch() -> None:  # apart: the normal request below may wait in the queue a long time
        while not done.is_set() and time.monotonic() - started < cap:
            # A slot is given up when its stream is cancelled or its stalled client dropped (newer servers).
            if max(server.metric("olive_server_cancelled_generations_total"),
                   server.metric("olive_server_stalled_clients_dropped_total")) >= 1:
                freed[0] = time.monotonic() - started
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        normal = {"model": server.model_id, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        answered = cap
        while time.monotonic() - started < cap:
            try:
                code = server.post(normal, timeout=max(0.5, cap - (time.monotonic() - started)))
            except OSError:  # no answer in time
                break
            if code == 200:
                answered = time.monotonic() - started
                break
            time.sleep(0.2)  # 429: the queue is full
        done.set()
        watcher.join()
        return answered, freed[0]
    finally:
        done.set()
        for s in socks:
            s.close()


def large_bodies(server: Server, seconds: float = 4) -> tuple[float, float]:
    """(median, max) /health latency in ms while 8 clients post 30,000-message chats."""
    body = big_body(server.model_id)
    stop = threading.Event()

    def poster() -> None:
        while not stop.is_set():
            post_raw(server.port, body)

    threads = [threading.Thread(target=poster) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the bodies are arriving
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/health")
        conn.getresponse().read()
        conn.close()
        latencies.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    return statistics.median(latencies), max(latencies)


def burst(server: Server, idle_seconds: float = 15) -> tuple[tuple[float, int], tuple[float, int], tuple[float, int]]:
    """(idle, peak, after idle_seconds) (RSS MB, threads) around a burst of hostile and normal clients."""
    normal = {"model": server.model_id, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20,
              "temperature": 0}
    server.post(normal)
    idle = server.rss_threads()
    peak = idle
    body = big_body(server.model_id)
    socks = [stalled_stream(server.port, server.model_id) for _ in range(60)]
    work = [lambda: post_raw(server.port, body)] * 16 + [lambda: server.post(normal)] * 16 + [
        lambda i=i: server.post({**normal, "temperature": 1.0, "seed": i, "logprobs": True}) for i in range(16)]
    threads = [threading.Thread(target=w) for w in work]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss, n = server.rss_threads()
        peak = (max(peak[0], rss), max(peak[1], n))
        time.sleep(0.1)
    for s in socks:
        s.close()
    time.sleep(idle_seconds)
    return idle, peak, server.rss_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--serve-python", default=SERVE_PYTHON)
    parser.add_argument("--tree", type=Path, default=REPO, help="the folder holding the builder/ package to serve")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stalled-runs", type=int, help="runs of the stalled-readers scenario (default: --runs)")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra server option (repeatable)")
    parser.add_argument("--only", choices=["stalled", "bodies", "burst"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["stalled", "bodies", "burst"])
    extra: list[str] = args.server_arg
    print(f"server from {args.tree / 'builder'}, extra options {extra or 'none'}, {args.runs} runs (medians)",
          flush=True)

    def runs(scenario: str, server_args: list[str], measure: Any, count: int | None = None) -> list[Any]:
        results = []
        for _ in range(count or args.runs):
            server = Server(args.serve_python, args.tree, args.model, [*server_args, *extra])
            try:
                results.append(measure(server))
            finally:
                server.stop()
            print(f"  {scenario}: {results[-1]}", flush=True)
        return results

    if "stalled" in only:
        got = runs("stalled", ["--max-concurrency", "4", "--queue-size", "16"], stalled_readers, args.stalled_runs)
        print(f"stalled readers (60; 4 slots, 16 waiting): a normal request answered after "
              f"{statistics.median(a for a, _ in got):.1f} s (120 = never), first slot freed after "
              f"{statistics.median(f for _, f in got):.1f} s", flush=True)
    if "bodies" in only:
        got = runs("bodies", [], large_bodies)
        print(f"/health while 8 clients post {BIG_MESSAGES:,}-message chats: median "
              f"{statistics.median(m for m, _ in got):.0f} ms, max {statistics.median(x for _, x in got):.0f} ms "
              "(median over runs of each run's max)", flush=True)
    if "burst" in only:
        got = runs("burst", ["--max-concurrency", "4", "--queue-size", "16"], burst)
        for i, name in enumerate(("idle", "peak", "15 s after")):
            print(f"burst: {name}: RSS {statistics.median(g[i][0] for g in got):.0f} MB, "
                  f"threads {statistics.median(g[i][1] for g in got):.0f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
