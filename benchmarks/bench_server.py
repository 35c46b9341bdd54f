"""The model server against onnxruntime-genai itself, on a model where decode dominates.

    python benchmarks/bench_server.py [--tokens 128] [--runs 3] [--precision int4] [--serve-python PY]

1. Makes a Qwen2 model of random fp32 weights (hidden 1024, 8 layers by default) and builds it
   with `build recipe --engine local` (this Python: the build side, onnxruntime-genai 0.14.1).
2. In-process references, in the server's Python (onnxruntime-genai 0.18, as in the runtime
   image): the raw Generator loop (prefill time, decode tokens/s) and `og.Engine` driven
   directly with 1, 4 and 8 concurrent requests.
3. The server twice, on the engine path and with --no-engine (the Generator path): one
   streaming client against the raw loop (decode and end to end; runs alternate so noise hits
   both), aggregate tokens/s with 1, 4 and 8 streaming clients, time to first token, and the
   event-loop lag the server measures itself while 8 streams run.
4. With a Docker engine and the runtime image: cold start (`docker run` to /health ready)
   against the model's own load time in-process, and the image size.

Medians; ratios against the issue's goals printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "bench-qwen2:0.1.0-cpu-int4"
PROMPT = [{"role": "user", "content": "Tell me about the model build cache."}]
CLIENTS = (1, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(root: Path, precision: str, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tinymodel import make_tiny_model

    hf = make_tiny_model(root / "hf", hidden_size=hidden, num_layers=layers, num_heads=16, num_kv_heads=4,
                         intermediate_size=hidden * 11 // 4, max_position_embeddings=2048)
    size = sum(p.stat().st_size for p in hf.iterdir())
    recipe = root / "recipes" / "bench-qwen2" / f"cpu-{precision}.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"name: bench-qwen2\nversion: 0.1.0\nmodel:\n  path: {hf}\n"
                      f"target:\n  device: cpu\n  precision: {precision}\ngeneration:\n  max_length: 2048\n")
    out = root / "out"
    t0 = time.perf_counter()
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data"),
           "XDG_CACHE_HOME": str(root / "cache"), "CI": "1"}
    subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q", "--no-image",
                    "-o", str(out)], check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    built = sum(p.stat().st_size for p in out.iterdir())
    print(f"model: {size / 2**20:.0f} MB of fp32 weights -> {built / 2**20:.0f} MB {precision} "
          f"(built in {time.perf_counter() - t0:.1f}s)")
    return out


# ---------------------------------------------------------------------------- in-process references


def inproc(model_dir: Path, mode: str, n: int) -> dict[str, Any]:
    """Runs in the server's Python: the raw loop once, or og.Engine at 1, 4 and 8 requests."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    ids = tok.encode(tok.apply_chat_template(json.dumps(PROMPT), add_generation_prompt=True))
    if mode == "raw":
        results = []
        for _ in range(2):  # the first warms up
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
            stream = tok.create_stream()
            t0 = time.perf_counter()
            gen = og.Generator(model, params)
            gen.append_tokens(ids)
            stamps = []
            while not gen.is_done():
                gen.generate_next_token()
                stream.decode(int(gen.get_next_tokens()[0]))
                stamps.append(time.perf_counter())
            results.append({"decode": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                            "e2e": len(stamps) / (stamps[-1] - t0), "ttft": stamps[0] - t0})
        return results[-1]
    engine = og.Engine(model)
    buf = engine.create_event_buffer(64)
    out: dict[str, Any] = {"batch_size": engine.get_capabilities().configured_max_batch_size}
    for clients in (1, *CLIENTS):  # the first round warms up
        requests = []
        t0 = time.perf_counter()
        for _ in range(clients):
            req = engine.create_request()
            opts = og.TurnOptions(req)
            opts.set_max_generated_tokens(n)
            opts.set_min_generated_tokens(n)
            opts.set_do_sample(False)
            req.begin_turn(np.asarray(ids, dtype=np.int32), opts)
            requests.append(req)
        tokens = 0
        while engine.has_pending_requests():
            for event in engine.run(buf):
                if event.flags.value & og.EngineEventFlags.TOKEN.value:
                    tokens += 1
        out[str(clients)] = tokens / (time.perf_counter() - t0)
        for req in requests:
            req.close()
    return out


def run_inproc(py: str, model_dir: Path, mode: str, n: int) -> dict[str, Any]:
    proc = subprocess.run([py, __file__, "--inproc", mode, "--model", str(model_dir), "--tokens", str(n)],
                          check=True, capture_output=True, text=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- through the server


def stream_request(port: int, n: int) -> tuple[int, float, float, float]:
    """One streaming chat request: (tokens, ttft, first-to-last seconds, total seconds)."""
    body = json.dumps({"model": MODEL_ID, "messages": PROMPT, "max_tokens": n, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return tokens, stamps[0] - t0, stamps[-1] - stamps[0], end - t0


def wait_healthy(port: int, deadline_s: float = 120) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("server never became healthy")


def lag_buckets(port: int) -> dict[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("olive_server_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="')[1].split('"')[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound under which a fraction ``q`` of the samples taken in between fall."""
    total = after[float("inf")] - before.get(float("inf"), 0)
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0) >= q * total:
            return bound
    return float("inf")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_server(py: str, model_dir: Path, args: argparse.Namespace, *, engine: bool) -> dict[str, Any]:
    port = free_port()
    extra = [] if engine else ["--no-engine"]
    server = subprocess.Popen([py, "-m", "builder.serve", "--model", str(model_dir), "--port", str(port),
                               "--model-id", MODEL_ID, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    name = "engine" if engine else "generator"
    result: dict[str, Any] = {}
    try:
        wait_healthy(port)
        stream_request(port, 8)  # warm up
        raw_decode, raw_e2e, raw_ttft, decode, e2e, ttft = [], [], [], [], [], []
        for i in range(args.runs):
            raw = run_inproc(py, model_dir, "raw", args.tokens)
            raw_decode.append(raw["decode"])
            raw_e2e.append(raw["e2e"])
            raw_ttft.append(raw["ttft"])
            tokens, first, span, total = stream_request(port, args.tokens)
            decode.append((tokens - 1) / span)
            e2e.append(tokens / total)
            ttft.append(first)
            print(f"  [{name}] run {i + 1}: raw {raw_decode[-1]:.1f} tok/s ({raw_e2e[-1]:.1f} end to end, prefill "
                  f"{raw_ttft[-1] * 1000:.0f} ms); server {decode[-1]:.1f} tok/s ({e2e[-1]:.1f} end to end, "
                  f"ttft {ttft[-1] * 1000:.0f} ms)", flush=True)
        result.update(raw_decode=statistics.median(raw_decode), raw_e2e=statistics.median(raw_e2e),
                      raw_ttft=statistics.median(raw_ttft), decode=statistics.median(decode),
                      e2e=statistics.median(e2e), ttft=statistics.median(ttft))
        n = max(32, args.tokens // 2)
        for clients in CLIENTS:
            results: list[tuple[int, float, float, float]] = []

            def one(sink: list[tuple[int, float, float, float]] = results, tokens: int = n) -> None:
                sink.append(stream_request(port, tokens))

            before = lag_buckets(port)
            threads = [threading.Thread(target=one) for _ in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            after = lag_buckets(port)
            ttfts = [r[1] for r in results]
            result[f"agg{clients}"] = sum(r[0] for r in results) / wall
            result[f"ttft{clients}"] = (pct(ttfts, 0.5), pct(ttfts, 0.95))
            result[f"lag{clients}"] = quantile_bound(before, after, 0.99)
            print(f"  [{name}] {clients} client(s) x {n} tokens: {result[f'agg{clients}']:.1f} tok/s aggregate, "
                  f"ttft p50 {ttfts and pct(ttfts, 0.5) * 1000:.0f} ms, p95 {pct(ttfts, 0.95) * 1000:.0f} ms, "
                  f"event-loop lag p99 <= {result[f'lag{clients}'] * 1000:g} ms", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="int4", choices=["int4", "fp32", "int8"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--serve-python", default=os.environ.get("OLIVE_BUILDER_SERVE_PYTHON")
                        or str(REPO / ".ci-state" / "serve-venv" / "bin" / "python"),
                        help="a Python with onnxruntime-genai 0.18 and the server's dependencies")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--inproc", choices=["raw", "engine"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inproc:
        print(json.dumps(inproc(Path(args.model), args.inproc, args.tokens)))
        return
    py = args.serve_python
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp), args.precision, args.hidden, args.layers)
        n = max(32, args.tokens // 2)
        eng = run_inproc(py, model_dir, "engine", n)
        print(f"og.Engine in process (batch size {eng['batch_size']}), {n} tokens each: "
              + ", ".join(f"{c} at once {eng[str(c)]:.1f} tok/s" for c in CLIENTS), flush=True)
        results = {}
        for engine in (True, False):
            print(f"\nserver, {'engine path' if engine else 'generator path (--no-engine)'}:", flush=True)
            results[engine] = bench_server(py, model_dir, args, engine=engine)
        print(f"\nsummary (medians of {args.runs}; {args.tokens} tokens for one client, {n} per client below):")
        for engine in (True, False):
            r = results[engine]
            print(f"  {'engine   ' if engine else 'generator'}: one client decode {r['decode']:.1f} tok/s = "
                  f"{r['decode'] / r['raw_decode']:.2f} x raw loop (goal >= 0.97); end to end "
                  f"{r['e2e'] / r['raw_e2e']:.2f} x (goal >= 0.95); ttft {r['ttft'] * 1000:.0f} ms vs raw prefill "
                  f"{r['raw_ttft'] * 1000:.0f} ms (goal <= +10 ms)")
            print("             aggregate " + ", ".join(f"{c}: {r[f'agg{c}']:.1f}" for c in CLIENTS)
                  + f" tok/s; 8 clients = {r['agg8'] / eng['8']:.2f} x og.Engine in process (goal >= 0.9); "
                  f"ttft p50 at 8: {r['ttft8'][0] * 1000:.0f} ms; event-loop lag p99 at 8 <= "
                  f"{r['lag8'] * 1000:g} ms (goal <= 5)")
        print(f"  engine / generator, aggregate at 8 clients: {results[True]['agg8'] / results[False]['agg8']:.2f} x")
        docker_cold_start(model_dir)


def docker_cold_start(model_dir: Path) -> None:
    try:
        import docker

        sys.path.insert(0, str(REPO))
        from builder.build import images

        client = docker.from_env()
        client.ping()
        tag = images.image_spec("runtime-cpu").tag
        image = client.images.get(tag)
    except Exception as e:  # noqa: BLE001
        print(f"\n(no Docker engine or runtime image: cold start and image size skipped: {e})")
        return
    import onnxruntime_genai as og

    loads, starts = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        model = og.Model(str(model_dir))
        tok = og.Tokenizer(model)
        params = og.GeneratorParams(model)
        ids = tok.encode("hi")
        params.set_search_options(max_length=len(ids) + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        loads.append(time.perf_counter() - t0)
        del gen, model
        port = free_port()
        t0 = time.perf_counter()
        container = client.containers.run(tag, detach=True, ports={"8000/tcp": ("127.0.0.1", port)},
                                          volumes={str(model_dir): {"bind": "/model", "mode": "ro"}})
        try:
            wait_healthy(port)
            starts.append(time.perf_counter() - t0)
        finally:
            container.remove(force=True)
    load, start = statistics.median(loads), statistics.median(starts)
    print(f"\ncold start, median of 3: docker run -> /health ready {start:.2f}s; "
          f"model load + first token in-process {load:.2f}s; ratio {start / load:.2f}")
    print(f"runtime image {tag}: {image.attrs['Size'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
