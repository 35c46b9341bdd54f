"""Serving throughput with a LoRA adapter against the base model, in one real server process.

    python benchmarks/bench_adapters.py [--hidden 512] [--layers 4] [--tokens 64] [--clients 1,4] [--runs 3]
                                        [--serve-python PY] [--keep DIR]

1. Makes a random-weight Qwen2 (hidden 512, 4 layers, a 8192-token vocabulary: ~21 M parameters)
   and a LoRA adapter for it with PEFT (rank 8 on q_proj and v_proj, random A and B: throughput
   does not depend on trained values), then converts both with Olive as a finetuned build in
   adapter mode does (ModelBuilder fp32, ExtractAdapters): the base model with optional LoRA
   inputs, and adapters/bench.onnx_adapter.
2. Starts the server once (the server's Python: onnxruntime-genai 0.18, as in the runtime image)
   and sends N concurrent streaming completions (`ignore_eos`, exactly --tokens each) naming the
   base (og.Engine, batched) or `<base>:bench` (a Generator per request: og.Engine has no adapter
   API), alternating base and adapter rounds so that machine noise hits both.
3. A second server with --no-engine: the base on the Generator path too, which separates the
   cost of the LoRA weights from the cost of the path.

Prints medians of aggregate tokens/s and of each request's own tokens/s (end to end: prefill,
waiting for a slot and decode), the ratios adapter/base, and the aggregate when half of the
concurrent requests name the base and half the adapter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "bench-lora:0.1.0-cpu-fp32"
ADAPTER = "bench"
PROMPT = "### Question: what does the build cache keep?\n### Answer:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(root: Path, hidden: int, layers: int) -> Path:
    """The HF model, its PEFT adapter, and Olive's conversion into the adapter-mode layout."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tinymodel import make_tiny_model

    hf = make_tiny_model(root / "hf", hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=4,
                         intermediate_size=hidden * 11 // 4, max_position_embeddings=2048, model_vocab_size=8192)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    params = sum(p.numel() for p in base.parameters())
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "peft")
    out, cache = root / "olive-out", root / "olive-cache"
    config = {
        "input_model": {"type": "HfModel", "model_path": str(hf), "adapter_path": str(root / "peft")},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"builder": {"type": "ModelBuilder", "precision": "fp32"},
                   "extract": {"type": "ExtractAdapters", "save_format": "onnx_adapter"}},
        "host": "local", "target": "local", "evaluate_input_model": False,
        "cache_dir": str(cache), "output_dir": str(out), "log_severity_level": 3,
    }
    (root / "olive.json").write_text(json.dumps(config))
    env = {**os.environ, "CI": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "hf-hub"), "XDG_CACHE_HOME": str(cache / "xdg")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(root / "olive.json")], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    produced = out / "adapter_weights.onnx_adapter"
    if not produced.is_file():  # Olive exits 0 when a pass fails
        raise SystemExit(f"olive run produced no adapter in {out}")
    model = root / "model"
    model.mkdir()
    for item in out.iterdir():
        if item.is_file() and item.suffix != ".onnx_adapter" and "footprint" not in item.name \
                and item.name != "run_history.txt":
            shutil.copy2(item, model / item.name)
    (model / "adapters").mkdir()
    shutil.copy2(produced, model / "adapters" / f"{ADAPTER}.onnx_adapter")
    weights = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    adapter = (model / "adapters" / f"{ADAPTER}.onnx_adapter").stat().st_size
    print(f"model: {params / 1e6:.1f} M parameters, {weights / 2**20:.0f} MB fp32 ONNX; adapter {adapter / 2**10:.0f} KB "
          f"(converted in {time.perf_counter() - t0:.1f}s)")
    return model


def stream(port: int, model: str, n: int) -> tuple[int, float]:
    """One streaming completion: (tokens, seconds from sending it to its last event)."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens != n:
        raise RuntimeError(f"{model}: {tokens} tokens, not {n}")
    return tokens, time.perf_counter() - t0


def round_(port: int, models: list[str], n: int) -> tuple[float, float]:
    """One request per entry of ``models``, all at once: (aggregate tokens/s, median of each request's
    tokens/s end to end)."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda model: stream(port, model, n), models))
    wall = time.perf_counter() - t0
    return sum(r[0] for r in results) / wall, statistics.median(r[0] / r[1] for r in results)


class Server:
    def __init__(self, py: str, model: Path, *extra: str):
        self.port = free_port()
        self.proc = subprocess.Popen([py, "-m", "builder.serve", "--model", str(model), "--port", str(self.port),
                                      "--model-id", MODEL_ID, *extra], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became healthy")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(server: Server, clients: list[int], n: int, runs: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    adapted = f"{MODEL_ID}:{ADAPTER}"
    for model in (MODEL_ID, adapted):  # warm-up
        round_(server.port, [model], 8)
    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for c in clients:
        kinds = {"base": [MODEL_ID] * c, "adapter": [adapted] * c}
        if c >= 2:  # half of the requests name the base, half the adapter
            kinds["mixed"] = [MODEL_ID if i % 2 == 0 else adapted for i in range(c)]
        for i in range(runs):
            # Rotate which goes first, so that a trend in machine load hits all.
            order = list(kinds)[i % len(kinds):] + list(kinds)[:i % len(kinds)]
            for kind in order:
                out.setdefault((kind, c), []).append(round_(server.port, kinds[kind], n))
    return out


def report(title: str, results: dict[tuple[str, int], list[tuple[float, float]]], clients: list[int]) -> None:
    print(f"\n{title}")
    print(f"{'clients':>7}  {'base tok/s':>10}  {'adapter tok/s':>13}  {'ratio':>6}  "
          f"{'base per-req':>12}  {'adapter per-req':>15}  {'ratio':>6}  {'half/half tok/s':>15}")
    for c in clients:
        base = results[("base", c)]
        adapter = results[("adapter", c)]
        b_agg, a_agg = statistics.median(r[0] for r in base), statistics.median(r[0] for r in adapter)
        b_one, a_one = statistics.median(r[1] for r in base), statistics.median(r[1] for r in adapter)
        mixed = f"{statistics.median(r[0] for r in results[('mixed', c)]):.1f}" if ("mixed", c) in results else "-"
        print(f"{c:>7}  {b_agg:>10.1f}  {a_agg:>13.1f}  {a_agg / b_agg:>6.2f}  {b_one:>12.1f}  {a_one:>15.1f}  "
              f"{a_one / b_one:>6.2f}  {mixed:>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent requests")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve-python", default=os.environ.get("OLIVE_BUILDER_SERVE_PYTHON")
                        or str(REPO / ".ci-state" / "serve-venv" / "bin" / "python"))
    parser.add_argument("--no-generator-baseline", action="store_true", help="skip the --no-engine server")
    parser.add_argument("--keep", type=Path, help="build the model here (or reuse it) instead of a temporary folder")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = args.keep or Path(tmp)
        model = root / "model"
        if not (model / "adapters" / f"{ADAPTER}.onnx_adapter").is_file():
            root.mkdir(parents=True, exist_ok=True)
            model = build(root, args.hidden, args.layers)
        print(f"{args.tokens} tokens per request, {args.runs} runs per point (medians), "
              f"{os.cpu_count()} CPU cores; server Python: {args.serve_python}")
        servers = [("one server, default (base on og.Engine, adapter on a Generator per request)", ())]
        if not args.no_generator_baseline:
            servers.append(("one server, --no-engine (base and adapter both on a Generator per request)",
                            ("--no-engine",)))
        for title, extra in servers:
            server = Server(args.serve_python, model, "--max-concurrency", str(max(clients)), *extra)
            try:
                results = measure(server, clients, args.tokens, args.runs)
            finally:
                server.stop()
            report(title, results, clients)


if __name__ == "__main__":
    main()
