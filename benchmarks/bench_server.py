"""The model server against the raw onnxruntime-genai loop, on a model where decode dominates.

    python benchmarks/bench_server.py [--tokens 128] [--runs 3] [--precision int4]

1. Makes a Qwen2 model of ~360 MB of random fp32 weights (hidden 1024, 8 layers) and builds
   it with `build recipe --engine local`.
2. Decode tokens/s, one streaming client through the server, against the raw generate
   loop in this process on the same model (both from first to last token; medians).
3. Aggregate tokens/s with 1, 4 and 8 concurrent streaming clients; time to first token
   p50/p95 over all of those requests.
4. With a Docker engine and the runtime image: cold start (`docker run` to /health ready)
   against the model's own load time in-process, and the image size.

Runs alternate and repeat so that machine noise hits both sides; medians and ratios printed.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from tinymodel import make_tiny_model  # noqa: E402

MODEL_ID = "bench-qwen2:0.1.0-cpu-int4"
PROMPT = [{"role": "user", "content": "Tell me about the model build cache."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(root: Path, precision: str) -> Path:
    hf = make_tiny_model(root / "hf", hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                         intermediate_size=2816, max_position_embeddings=2048)
    size = sum(p.stat().st_size for p in hf.iterdir())
    recipe = root / "recipes" / "bench-qwen2" / f"cpu-{precision}.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(f"name: bench-qwen2\nversion: 0.1.0\nmodel:\n  path: {hf}\n"
                      f"target:\n  device: cpu\n  precision: {precision}\ngeneration:\n  max_length: 2048\n")
    out = root / "out"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "builder", "recipe", str(recipe), "--engine", "local", "-q", "-o", str(out)],
                   check=True, stdout=subprocess.DEVNULL,
                   # logs, the local store and caches stay in this run's folder, never the user's
                   env={**os.environ, "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data"),
                        "XDG_CACHE_HOME": str(root / "cache"), "OLIVE_BUILDER_STORE": str(root / "store")})
    built = sum(p.stat().st_size for p in out.iterdir())
    print(f"model: {size / 2**20:.0f} MB of fp32 weights -> {built / 2**20:.0f} MB {precision} "
          f"(built in {time.perf_counter() - t0:.1f}s)")
    return out


def raw_decode(model_dir: Path, n: int) -> tuple[float, float]:
    """(decode tokens/s from first to last token, end-to-end tokens/s) of the raw loop, in this process."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    ids = tok.encode(tok.apply_chat_template(json.dumps(PROMPT), add_generation_prompt=True))
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
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps) / (stamps[-1] - t0)


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="int4", choices=["int4", "fp32", "int8"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args.precision)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "builder.server", "--model", str(model_dir),
                                   "--port", str(port), "--model-id", MODEL_ID],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(port)
            stream_request(port, 8)  # warm both sides
            raw_decode(model_dir, 8)
            raw_rates, server_rates, raw_e2e, server_e2e = [], [], [], []
            for i in range(args.runs):
                decode, e2e = raw_decode(model_dir, args.tokens)
                raw_rates.append(decode)
                raw_e2e.append(e2e)
                tokens, _, span, total = stream_request(port, args.tokens)
                server_rates.append((tokens - 1) / span)
                server_e2e.append(tokens / total)
                print(f"run {i + 1}: raw loop {raw_rates[-1]:.1f} tok/s ({raw_e2e[-1]:.1f} end to end), "
                      f"server stream {server_rates[-1]:.1f} tok/s ({server_e2e[-1]:.1f} end to end)")
            raw, srv = statistics.median(raw_rates), statistics.median(server_rates)
            raw_total, srv_total = statistics.median(raw_e2e), statistics.median(server_e2e)
            print(f"\none streaming client, {args.tokens} tokens, median of {args.runs}:")
            print(f"  decode (first to last token): raw {raw:.1f} tok/s, server {srv:.1f} tok/s, "
                  f"ratio {srv / raw:.2f}  (goal >= 0.90)")
            print(f"  end to end (prefill, HTTP and all): raw {raw_total:.1f} tok/s, server {srv_total:.1f} tok/s, "
                  f"ratio {srv_total / raw_total:.2f}")

            ttfts: list[float] = []
            print("\naggregate throughput (server default: 4 generating, 16 waiting):")
            for clients in (1, 4, 8):
                results: list[tuple[int, float, float, float]] = []
                n = max(32, args.tokens // 2)
                threads = [threading.Thread(target=lambda: results.append(stream_request(port, n)))
                           for _ in range(clients)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                total = sum(r[0] for r in results)
                ttfts.extend(r[1] for r in results)
                ttft_here = [r[1] for r in results]
                print(f"  {clients} client(s) x {n} tokens: {total / wall:.1f} tok/s aggregate, "
                      f"ttft p50 {pct(ttft_here, 0.5) * 1000:.0f} ms, p95 {pct(ttft_here, 0.95) * 1000:.0f} ms")
            print(f"  time to first token over all {len(ttfts)} requests: p50 {pct(ttfts, 0.5) * 1000:.0f} ms, "
                  f"p95 {pct(ttfts, 0.95) * 1000:.0f} ms")
        finally:
            server.terminate()
            server.wait(timeout=60)

        docker_cold_start(model_dir)


def docker_cold_start(model_dir: Path) -> None:
    try:
        import docker

        from builder import images

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
