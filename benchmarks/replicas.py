"""Several replicas of the runtime image on one machine, behind HAProxy, under load from the
`openai` client: throughput against one replica, and what fails when a replica is stopped.

    python benchmarks/replicas.py [--replicas 3] [--clients 8] [--tokens 64] [--seconds 15] [--rounds 3]
                                  [--hidden 256] [--layers 4] [--model DIR] [--image TAG [--runnable]]

Needs a Docker engine, HAProxy (`apt-get install haproxy`; Debian's 2.6) and the openai package.

1. The model: a Qwen2 of random weights built with `build recipe --engine local` (fp32, not
   evaluated), or `--model DIR`, any built folder.
2. The replicas: containers of the runtime image (`build images --target runtime-cpu`, built
   when missing, or `--image TAG`) with the folder mounted read-only at /model; with
   `--image TAG --runnable`, a runnable image that carries its model (nothing is mounted). Each runs in the host's network
   namespace and listens on its own loopback port. Not `-p`: a published port goes through
   docker-proxy, which accepts a connection even when the replica behind it has stopped
   listening and then closes it empty, so the balancer can no longer tell "never reached the
   replica" (safe to send elsewhere) from "died while generating" (not safe).
3. The balancer: HAProxy as a plain foreground process with a generated configuration:
   `leastconn` (generations are long and uneven), active health checks on /health every 200 ms,
   one fresh server connection per request (`option http-server-close`: no idle connection the
   replica closes while HAProxy reuses it), and retries with redispatch only for a connection
   that could not be set up (`retry-on conn-failure`): the request never reached a replica, so
   another may serve it. Nothing is retried once it has been sent: a generation that started
   on a replica that dies fails, as it must. Each request is logged with the replica that
   served it and how it ended; each response names it in `X-Replica`.
4. Load: client threads, each streaming chat completions of `--tokens` tokens (`ignore_eos`)
   back to back. A request succeeds when its stream ends with the finish reason and the usage
   chunk counting every token; anything else (an exception, a truncated stream) fails.

Printed: aggregate completion tokens/s and median time to first token through the balancer
with 1 replica and with N (rounds alternate, so noise hits both; medians of the rounds); then,
with N replicas under load, one replica stopped with SIGTERM (`docker stop`: it drains) and
one killed with SIGKILL (`docker kill`): failed requests, how many were in flight on that
replica, and whether every request started after it succeeded.

The test (tests/test_replicas.py) drives the same parts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Tell me about the model build cache."}]
# HAProxy checks /health every 200 ms and takes a replica out after 2 failed checks: a replica
# told to stop keeps serving, /health failing, for this long before it closes its listener.
DRAIN_DELAY = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


# ---------------------------------------------------------------------------- replicas


@dataclasses.dataclass
class Replica:
    """One container of the server, listening on ``port`` of the host's loopback."""

    name: str
    port: int
    container: Any  # docker.models.containers.Container

    def alive(self) -> bool:
        self.container.reload()
        return bool(self.container.status == "running")

    def logs(self) -> str:
        return str(self.container.logs().decode(errors="replace"))[-3000:]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` on this replica's /metrics whose labels include ``labels``."""
        _, body = http_get(self.port, "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


def wait_healthy(replica: Replica, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not replica.alive():
            raise RuntimeError(f"replica {replica.name} stopped before it was healthy:\n{replica.logs()}")
        with contextlib.suppress(OSError):
            if http_get(replica.port, "/health")[0] == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica.name} never became healthy:\n{replica.logs()}")
        time.sleep(0.1)


@contextlib.contextmanager
def replicas(docker_client: Any, image: str, model: Path | None, count: int, *,
             prefix: str = "olive-replica", drain_delay: float = DRAIN_DELAY) -> Iterator[list[Replica]]:
    """``count`` server containers of ``image`` (the folder ``model`` mounted at /model, unless the
    image carries its own), healthy; every one removed at the end, by name, whatever happened.

    ``drain_delay``: on SIGTERM a replica answers /health with 503 for this long, still serving,
    before it stops listening (and drains what it has): longer than HAProxy takes to see it fail."""
    started: list[Replica] = []
    tag = uuid.uuid4().hex[:8]
    try:
        for i in range(count):
            port = free_port()
            name = f"{prefix}-{tag}-{i}"
            container = docker_client.containers.run(
                image, name=name, detach=True, network_mode="host",
                environment={"OLIVE_HOST": "127.0.0.1", "OLIVE_PORT": str(port),
                             "OLIVE_DRAIN_DELAY": str(drain_delay)},
                volumes={str(model): {"bind": "/model", "mode": "ro"}} if model else None,
                # The image's own check probes port 8000: another process's on the host network.
                healthcheck={"test": ["NONE"]},
            )
            started.append(Replica(name, port, container))
        for replica in started:
            wait_healthy(replica)
        yield started
    finally:
        for replica in started:
            with contextlib.suppress(Exception):
                docker_client.containers.get(replica.name).remove(force=True)


# ---------------------------------------------------------------------------- the balancer


HAPROXY_CONFIG = """\
global
    log stdout format raw local0
    stats socket {stats} mode 600 level admin
    maxconn 512

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout check 1s
    # A connection a replica refuses (stopped listening: draining or dead) is tried again, on
    # another replica; the request never reached the first one. Nothing that was sent is retried.
    retries 3
    retry-on conn-failure
    option redispatch 1
    # One server connection per request: no idle keep-alive connection that the replica closes
    # (after 5 s idle, or when it drains) just as HAProxy sends the next request on it.
    option http-server-close

frontend api
    bind 127.0.0.1:{port}
    http-request capture req.hdr(x-request-id) len 64
    log-format "rid=%[capture.req.hdr(0)] srv=%s status=%ST term=%ts retries=%rc bytes=%B"
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
    http-response set-header X-Replica %s
{servers}
"""


@dataclasses.dataclass(frozen=True)
class LogRecord:
    """One request as HAProxy logged it once it ended."""

    rid: str
    server: str  # the replica's name, "<NOSRV>" when none was picked
    status: int  # -1 when no response came
    term: str  # HAProxy's termination state: "--" normal, "SH"/"SD" the server went away, ...
    retries: int


class Balancer:
    """HAProxy in the foreground, over ``replicas``, on a free loopback port; stopped by its PID."""

    def __init__(self, root: Path, members: list[Replica]):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats = root / "haproxy.sock"
        self.config = root / "haproxy.cfg"
        self.log = root / "haproxy.log"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in members)
        self.config.write_text(HAPROXY_CONFIG.format(stats=self.stats, port=self.port, servers=servers))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> Balancer:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration:\n{check.stdout}{check.stderr}")
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)], stdout=sink, stderr=sink)
        deadline = time.monotonic() + timeout
        while True:  # ready once a health check has passed and /health answers through it
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.port, "/health")[0] == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy never answered /health:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server_stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` from the stats socket: each replica's row (status, scur = connections now,
        stot = in all, ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def records(self) -> dict[str, LogRecord]:
        """Every logged request that carried an ``X-Request-Id``, by id."""
        out: dict[str, LogRecord] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r"rid=(\S*) srv=(\S+) status=(-?\d+) term=(\S+) retries=\+?(\d+)", line)
            if m and m.group(1) not in ("", "-"):
                out[m.group(1)] = LogRecord(m.group(1), m.group(2), int(m.group(3)), m.group(4), int(m.group(5)))
        return out


# ---------------------------------------------------------------------------- load


@dataclasses.dataclass
class Result:
    """One request as the client saw it (times from ``time.monotonic()``)."""

    rid: str
    started: float
    ended: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    replica: str | None = None  # from X-Replica
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def stream_one(client: Any, model: str, tokens: int) -> Result:
    """One streaming chat completion through ``client``; failed unless it ends whole."""
    result = Result(uuid.uuid4().hex, time.monotonic())
    finish, usage = None, None
    try:
        with client.chat.completions.with_streaming_response.create(
                model=model, messages=PROMPT, max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                extra_headers={"X-Request-Id": result.rid}) as response:
            result.replica = response.headers.get("x-replica")
            for chunk in response.parse():
                if chunk.choices:
                    if chunk.choices[0].delta.content and result.ttft is None:
                        result.ttft = time.monotonic() - result.started
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
        if finish != "length" or usage is None or usage.completion_tokens != tokens:
            result.error = f"incomplete stream (finish_reason {finish!r}, usage {usage})"
        else:
            result.tokens = usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - any failure of a request is what is being counted
        result.error = f"{type(e).__name__}: {e}"
    result.ended = time.monotonic()
    return result


class Load:
    """``clients`` threads streaming requests back to back through ``url`` until stopped."""

    def __init__(self, url: str, model: str, clients: int, tokens: int):
        import openai

        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), model, tokens),
            daemon=True) for _ in range(clients)]

    def _run(self, client: Any, model: str, tokens: int) -> None:
        while not self._stop.is_set():
            result = stream_one(client, model, tokens)
            with self._lock:
                self.results.append(result)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        self.ended = time.monotonic()


def throughput(results: list[Result], since: float, until: float) -> tuple[float, float | None, int]:
    """Completion tokens/s of the requests that ended inside [since, until], their median time to
    first token, and how many failed."""
    inside = [r for r in results if since <= r.started and r.ended <= until]
    tokens = sum(r.tokens for r in inside if r.ok)
    ttfts = [r.ttft for r in inside if r.ok and r.ttft is not None]
    return tokens / (until - since), statistics.median(ttfts) if ttfts else None, sum(not r.ok for r in inside)


# ---------------------------------------------------------------------------- stopping a replica mid-load


@dataclasses.dataclass
class Outage:
    """What happened around stopping one replica under load."""

    signal: str
    victim: str
    in_flight_before: int  # HAProxy's connections to the victim just before the signal
    signalled: float  # when the signal was sent, and when `docker stop`/`kill` returned
    done: float
    exit_code: int
    results: list[Result]
    records: dict[str, LogRecord]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def on_victim(self) -> list[Result]:
        """Requests HAProxy sent to the victim that were still open when it was signalled."""
        return [r for r in self.results if (rec := self.records.get(r.rid)) is not None
                and rec.server == self.victim and r.started < self.done and r.ended > self.signalled]

    def cut_off(self, r: Result) -> bool:
        """Whether HAProxy logged ``r`` as sent to the victim and cut off by it, before or during the
        response (SH, SD): the request had reached it. A refused connection (SC) had not, and is
        never one: HAProxy should have sent it to another replica."""
        rec = self.records.get(r.rid)
        return rec is not None and rec.server == self.victim and rec.term in ("SH", "SD")

    def after(self) -> list[Result]:
        """Requests started once the victim had stopped."""
        return [r for r in self.results if r.started > self.done]


def outage(balancer: Balancer, members: list[Replica], model: str, *, kill: bool, clients: int, tokens: int,
           before: float, after: float) -> Outage:
    """Load through ``balancer``; after ``before`` seconds (once the victim has a request in flight)
    stop the first replica with SIGTERM (``kill=False``: `docker stop`, it drains) or SIGKILL; load
    goes on for ``after`` more seconds."""
    victim = members[0]
    with Load(f"http://127.0.0.1:{balancer.port}", model, clients, tokens) as load:
        time.sleep(before)
        deadline = time.monotonic() + 10
        while int(balancer.server_stats()[victim.name]["scur"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        in_flight = int(balancer.server_stats()[victim.name]["scur"])
        signalled = time.monotonic()
        if kill:
            victim.container.kill(signal="SIGKILL")
        else:
            victim.container.stop(timeout=60)  # SIGTERM; returns once it has exited
        exit_code = int(victim.container.wait(timeout=60)["StatusCode"])
        done = time.monotonic()
        time.sleep(after)
    time.sleep(0.2)  # HAProxy writes a request's log line as it ends
    return Outage("SIGKILL" if kill else "SIGTERM", victim.name, in_flight, signalled, done, exit_code,
                  load.results, balancer.records())


# ---------------------------------------------------------------------------- the benchmark


def build_model(root: Path, hidden: int, layers: int) -> Path:
    """A random Qwen2 of ``hidden`` x ``layers``, built fp32 by `build recipe --engine local`."""
    sys.path.insert(0, str(REPO / "tests"))
    from tinymodel import make_tiny_model

    hf = make_tiny_model(root / "hf", hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64),
                         num_kv_heads=max(2, hidden // 256), intermediate_size=hidden * 11 // 4,
                         max_position_embeddings=2048)
    recipe = root / "recipes" / "bench-replicas" / "cpu-fp32.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"name: bench-replicas\nversion: 0.1.0\nmodel:\n  path: {hf}\n"
                      "target:\n  device: cpu\n  precision: fp32\ngeneration:\n  max_length: 2048\nevaluate: false\n")
    out = root / "out"
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data"),
           "XDG_CACHE_HOME": str(root / "cache"), "CI": "1"}
    subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q", "--no-image",
                    "-o", str(out)], check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    return out


def model_id(members: list[Replica]) -> str:
    _, body = http_get(members[0].port, "/v1/models")
    return str(json.loads(body)["data"][0]["id"])


def report_outage(o: Outage, log: Callable[[str], None]) -> None:
    after = o.after()
    on_victim = o.on_victim()
    not_on_victim = [r for r in o.failed if r not in on_victim]
    log(f"  {o.signal} to {o.victim} with {o.in_flight_before} request(s) in flight on it: "
        f"{len(o.results)} requests, {len(o.failed)} failed ({len(not_on_victim)} of them not on the victim); "
        f"{len(on_victim)} were open on the victim; {len(after)} started after it stopped, "
        f"{sum(not r.ok for r in after)} of those failed; its exit code {o.exit_code}, "
        f"stopped in {o.done - o.signalled:.2f}s")
    retried = sum(1 for rec in o.records.values() if rec.retries > 0)
    ends = sorted(f"{rec.server == o.victim and 'victim' or 'other'} {rec.status} {rec.term}"
                  for r in o.failed if (rec := o.records.get(r.rid)))
    log(f"    HAProxy sent {retried} request(s) elsewhere after a refused connection; failures as it "
        f"logged them (replica, status, termination state): {ends}")
    for r in o.failed[:5]:
        log(f"    failed: {r.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--seconds", type=float, default=15, help="length of one throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="1-replica and N-replica measurements, alternating")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model", type=Path, help="a built model folder (default: build a random one)")
    parser.add_argument("--image", help="the server image (default: this tree's runtime image, built if missing)")
    parser.add_argument("--runnable", action="store_true", help="--image carries its model: mount nothing")
    args = parser.parse_args(argv)

    import docker

    client = docker.from_env(timeout=600)
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        root = Path(tmp)
        model: Path | None = None
        if args.image:
            image = args.image
        else:
            args.runnable = False
            from builder.build import images

            spec = images.image_spec("runtime-cpu")
            try:
                client.images.get(spec.tag)
            except docker.errors.ImageNotFound:
                print(f"building {spec.tag} ...", flush=True)
                images.build_image(client, spec, lambda line: None)
            image = spec.tag
        if not args.runnable:
            model = args.model or build_model(root, args.hidden, args.layers)
        print(f"image {image}; model {model or '(in the image)'}; {os.cpu_count()} CPU cores; "
              f"{args.clients} streaming clients, {args.tokens} tokens a request", flush=True)

        with replicas(client, image, model, args.replicas) as members:
            served = model_id(members)
            warm = time.monotonic()
            for r in members:  # one request each, so no replica pays a first-request cost inside a round
                import openai

                stream_one(openai.OpenAI(base_url=f"http://127.0.0.1:{r.port}/v1", api_key="unused", max_retries=0),
                           served, args.tokens)
            print(f"replicas ready ({time.monotonic() - warm:.1f}s warm-up)", flush=True)
            figures: dict[int, list[tuple[float, float | None, int]]] = {1: [], args.replicas: []}
            for i in range(args.rounds):
                for n in (1, args.replicas):
                    with Balancer(root / f"lb-{i}-{n}", members[:n]) as lb, \
                            Load(f"http://127.0.0.1:{lb.port}", served, args.clients, args.tokens) as load:
                        time.sleep(args.seconds)
                        until = time.monotonic()
                    # Only requests wholly inside the window: no ramp-up, no tail.
                    figures[n].append(throughput(load.results, load.started + 1, until))
                    tps, ttft, failed = figures[n][-1]
                    print(f"  round {i + 1}, {n} replica(s): {tps:.0f} tokens/s, TTFT median "
                          f"{(ttft or 0) * 1000:.0f} ms, {failed} failed", flush=True)
        one, many = figures[1], figures[args.replicas]
        tps1, tpsn = statistics.median(f[0] for f in one), statistics.median(f[0] for f in many)
        ttft1 = statistics.median(f[1] for f in one if f[1] is not None)
        ttftn = statistics.median(f[1] for f in many if f[1] is not None)
        print(f"aggregate tokens/s, medians of {args.rounds}: 1 replica {tps1:.0f}, {args.replicas} replicas "
              f"{tpsn:.0f} ({tpsn / tps1:.2f}x); TTFT median {ttft1 * 1000:.0f} ms vs {ttftn * 1000:.0f} ms "
              f"({ttftn / ttft1:.2f}x)")

        for kill in (False, True):
            with replicas(client, image, model, args.replicas) as members, \
                    Balancer(root / f"lb-outage-{kill}", members) as lb:
                o = outage(lb, members, served, kill=kill, clients=args.clients, tokens=args.tokens,
                           before=args.seconds / 3, after=args.seconds / 3)
                report_outage(o, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
