"""Our builds against llama.cpp on the same weights, the same token ids and the same machine.

    python benchmarks/vs_llamacpp.py --source HF_DIR \
        --ours int4=OUT_INT4 --ours int8=OUT_INT8 --ours fp32=OUT_FP32 \
        --llama Q4_K_M=F.gguf --llama Q8_0=F.gguf --llama Q4_0=F.gguf \
        --serve-python PY --llama-python PY [--llama-server BIN] \
        [--runs 3] [--streams 1,4,8] [--window 20] [--json OUT]

HF_DIR is the float model both sides start from: for the shipped GGUF recipes, the folder the
build converted the GGUF into (~/.cache/olive-builder/gguf/<sha256>/hf). The llama.cpp files are
made from it with llama.cpp's own tools, as its users would:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the sdist: its converter
    PYTHONPATH=vendor/llama.cpp/gguf-py python vendor/llama.cpp/convert_hf_to_gguf.py HF_DIR \
        --outtype f32 --outfile f32.gguf          # in a Python with torch, transformers, sentencepiece
    llama_cpp.llama_model_quantize(f32.gguf, q.gguf, params)  # ftype Q8_0, Q4_K_M, Q4_0

PY is onnxruntime-genai 0.18's Python (the runtime image's); the llama Python has
llama-cpp-python (`pip install 'llama-cpp-python[server]==0.3.36'` compiles llama.cpp here,
~15 min on 2 cores). llama.cpp's own `llama-server` (and `llama-quantize`) build from the
sdist's vendor/llama.cpp with cmake (~8 min on 2 cores):

    cmake -S vendor/llama.cpp -B build -G Ninja -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON ... (the CPU's flags)
    cmake --build build -j2 --target llama-server llama-quantize

and the sdist's Python bindings run on that build without a second compile
(`PYTHONPATH=SDIST LLAMA_CPP_LIB_PATH=build/bin python`). On a VM whose CPU lists AMX, a
`GGML_NATIVE=ON` build (and pip's compile, which uses it) dies with an invalid opcode in
libggml-cpu on the first evaluation: the guest may not use AMX tiles. Name the flags instead,
AMX off, as above.

1. Quality, one child process per model: perplexity of the first ``--tokens`` token ids of the
   committed evaluation text (the source's tokenizer, the same ids for every model) and top-1
   agreement with the source's argmax, as ratios against the source (transformers, fp32).
2. Speed offline, ``--runs`` fresh processes per model (medians): load seconds, prefill tokens/s
   (a 512-token prompt), decode tokens/s (128 tokens, EOS ignored), peak RSS of the process.
   Both sides get the machine's usable cores: llama.cpp ``n_threads``; ours whatever the build's
   genai_config.json and our loader give it (the same code path the server and evaluation use).
3. Servers, the same files: our runtime server (``python -m builder.serve``, its default settings:
   batch size 4, further streams wait in its queue; ``--our-batch N`` sets both) against llama.cpp's
   OpenAI server: ``--llama-server`` (llama.cpp's own ``llama-server``, run with ``--parallel``
   equal to the streams, its best setting for that load, and ``--llama-context`` tokens of context
   per stream, as many as our build's max_length gives each of our sequences) or else
   llama-cpp-python's server (one request at a time). 1, 4 and 8 streaming clients, each sending
   distinct ~64-token prompts for 64 tokens (EOS ignored) for ``--window`` seconds: aggregate
   completion tokens/s and the median time to first token.

Every figure is printed beside llama.cpp's at the same bit width as a ratio (ours / theirs; >= 1.0
is better for speed, <= 1.0 for perplexity and memory). Pairs: int4 against Q4_K_M and Q4_0,
int8 against Q8_0, fp32 against the F32 file when one is given (``--llama F32=...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
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
TEXT = REPO / "builder" / "data" / "eval-text.txt"
PAIRS = {"int4": ("Q4_K_M", "Q4_0"), "int8": ("Q8_0",), "fp32": ("F32",)}


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- children (one model per process)

OURS_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from builder.contract import og_model  # the loader the server and the evaluation use
mode, folder, ids = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.perf_counter()
model = og_model(folder)
load = time.perf_counter() - t0
import onnxruntime_genai as og
out = {"load_s": load}
if mode == "quality":
    params = og.GeneratorParams(model); params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    g = og.Generator(model, params); g.append_tokens(ids)
    logits = g.get_output("logits")[0].astype(np.float64)
    m = logits.max(-1, keepdims=True); lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    tgt = np.array(ids[1:]); nll = lse[:-1] - logits[np.arange(len(ids) - 1), tgt]
    out.update(nll=nll.tolist(), argmax=logits[:-1].argmax(-1).tolist())
else:
    prompt, decode = ids[:512], 128
    total = len(prompt) + decode + 1
    params = og.GeneratorParams(model); params.set_search_options(max_length=total, min_length=total, do_sample=False)
    g = og.Generator(model, params)
    t0 = time.perf_counter(); g.append_tokens(prompt); g.generate_next_token(); prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode): g.generate_next_token()
    out.update(prefill_tps=len(prompt) / prefill, decode_tps=decode / (time.perf_counter() - t0))
out["peak_rss_mb"] = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] / 1024
print(json.dumps(out))
"""

LLAMA_CHILD = r"""
import json, os, sys, time
import numpy as np
from llama_cpp import Llama
mode, path, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
n = len(os.sched_getaffinity(0))
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=n, n_threads_batch=n,
            logits_all=(mode == "quality"), verbose=False)
out = {"load_s": time.perf_counter() - t0}
if mode == "quality":
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    m = logits.max(-1, keepdims=True); lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    tgt = np.array(ids[1:]); nll = lse[:-1] - logits[np.arange(len(ids) - 1), tgt]
    out.update(nll=nll.tolist(), argmax=logits[:-1].argmax(-1).tolist())
else:
    import llama_cpp
    vocab = llm.n_vocab()
    def last():  # the last position's logits (without logits_all, llama.cpp computes only those)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))
    prompt, decode = ids[:512], 128
    t0 = time.perf_counter(); llm.eval(prompt); tok = last()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode):
        llm.eval([tok]); tok = last()
    out.update(prefill_tps=len(prompt) / prefill, decode_tps=decode / (time.perf_counter() - t0))
out["peak_rss_mb"] = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0] / 1024
print(json.dumps(out))
"""


def child(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_model(kind: str, path: str, mode: str, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    if kind == "ours":
        return child([args.serve_python, "-c", OURS_CHILD, str(REPO), mode, path, json.dumps(ids)])
    return child([args.llama_python, "-c", LLAMA_CHILD, mode, path, json.dumps(ids)])


# ---------------------------------------------------------------------------- the source

def source_figures(source: Path, tokens: int) -> tuple[list[int], list[float], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    ids = tok(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:tokens]
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nll = (-logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]).tolist()
    return list(ids), nll, logits[:-1].argmax(-1).tolist()


# ---------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready ({url})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout} s ({url})")


def stream_one(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streaming completion: (seconds to the first token, completion tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), int(usage or chunks)


def load(base: str, model: str, streams: int, window: float, max_tokens: int, run: int = 0) -> dict[str, float]:
    """``streams`` clients for ``window`` seconds. Every prompt differs from every other one this
    server has seen, in this run and the runs before (``run``): llama-server keeps earlier prompts'
    caches across requests, and a repeated prompt would measure that cache, not prefill."""
    words = TEXT.read_text(encoding="utf-8").split()
    stop = time.perf_counter() + window
    lock, tokens, ttfts, failures = threading.Lock(), [0], [], [0]
    started = time.perf_counter()

    def worker(w: int) -> None:
        k = run * 100_000
        while time.perf_counter() < stop:
            start = (w * 997 + k * 131) % (len(words) - 60)
            prefix = f"{w}.{k}: "  # unique even where two starts meet
            k += 1
            try:
                ttft, n = stream_one(base, model, prefix + " ".join(words[start:start + 48]), max_tokens)
            except OSError:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                tokens[0] += n
                ttfts.append(ttft)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens[0] / elapsed, "ttft_s": statistics.median(ttfts) if ttfts else float("nan"),
            "requests": len(ttfts), "failed": failures[0]}


def serve_ours(folder: str, args: argparse.Namespace, streams: int) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [args.serve_python, "-m", "builder.serve", "--model", folder, "--port", str(port), "--model-id", "ours"]
    if args.our_batch:  # else the server's default: batch 4, the rest of the streams queue
        cmd += ["--batch-size", str(args.our_batch), "--max-concurrency", str(args.our_batch)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True), f"http://127.0.0.1:{port}", "ours"


def serve_llama(gguf: str, args: argparse.Namespace, streams: int) -> tuple[subprocess.Popen[bytes], str, str]:
    port, n = free_port(), usable_cpus()
    if args.llama_server:
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "--parallel", str(streams),
               "-c", str(args.llama_context * streams), "-t", str(n), "-tb", str(n), "--no-webui"]
    else:
        cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
               "--n_ctx", str(args.llama_context), "--n_threads", str(n), "--n_threads_batch", str(n)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True), f"http://127.0.0.1:{port}", "llama"


def server_figures(start: Any, path: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams in args.streams:
        proc, base, model = start(path, args, streams)
        try:
            ready = wait_ready(base + ("/health" if model == "ours" else "/v1/models"), proc)
            runs = [load(base, model, streams, args.window, 64, run) for run in range(args.server_runs)]
            out[str(streams)] = {"ready_s": ready,
                                 "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                                 "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                                 "failed": sum(int(r["failed"]) for r in runs),
                                 "peak_rss_mb": _rss_mb(proc.pid)}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--ours", action="append", default=[], metavar="PRECISION=DIR")
    p.add_argument("--llama", action="append", default=[], metavar="QUANT=GGUF")
    p.add_argument("--serve-python", default=os.environ.get("OLIVE_BUILDER_SERVE_PYTHON", sys.executable))
    p.add_argument("--llama-python", required=True)
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (else llama-cpp-python's)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server-runs", type=int, default=1)
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--our-batch", type=int, default=None,
                   help="our server's --batch-size and --max-concurrency (default: its own, batch 4 with the other "
                        "streams queued; the engine steps at most 4 requests at once)")
    p.add_argument("--llama-context", type=int, default=2048,
                   help="llama.cpp's context per stream (default 2048: our shipped recipes' max_length, which sizes "
                        "our server's KV cache per sequence; the same context on both sides)")
    p.add_argument("--skip", action="append", default=[], choices=["quality", "speed", "server"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    ours = dict(x.split("=", 1) for x in args.ours)
    theirs = dict(x.split("=", 1) for x in args.llama)
    models = [("ours", k, v) for k, v in ours.items()] + [("llama", k, v) for k, v in theirs.items()]
    print(f"machine: {usable_cpus()} usable cores; models: {', '.join(f'{k}:{n}' for k, n, _ in models)}", flush=True)
    results: dict[str, dict[str, Any]] = {f"{k}:{n}": {} for k, n, _ in models}

    ids: list[int] = []
    if "quality" not in args.skip or "speed" not in args.skip:
        ids, src_nll, src_argmax = source_figures(args.source, args.tokens)
        src_ppl = math.exp(statistics.fmean(src_nll))
    if "quality" not in args.skip:
        print(f"\n== quality: {len(ids)} token ids, source perplexity {src_ppl:.3f}", flush=True)
        for kind, name, path in models:
            q = run_model(kind, path, "quality", ids, args)
            ppl = math.exp(statistics.fmean(q["nll"]))
            top1 = statistics.fmean(int(a == b) for a, b in zip(q["argmax"], src_argmax, strict=True))
            results[f"{kind}:{name}"].update(ppl_ratio=ppl / src_ppl, top1=top1, file_mb=_size_mb(path))
            print(f"{kind:5} {name:7} ppl ratio {ppl / src_ppl:.4f}  top-1 {top1:.3f}  files {_size_mb(path):.1f} MB",
                  flush=True)
    if "speed" not in args.skip:
        print(f"\n== speed offline: medians of {args.runs} processes (512-token prefill, 128-token decode)", flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {f"{k}:{n}": [] for k, n, _ in models}
        for _ in range(args.runs):  # interleaved: the machine's noise hits every model alike
            for kind, name, path in models:
                rounds[f"{kind}:{name}"].append(run_model(kind, path, "speed", ids, args))
        for key, rs in rounds.items():
            fig = {f: statistics.median(r[f] for r in rs) for f in ("load_s", "prefill_tps", "decode_tps", "peak_rss_mb")}
            results[key].update(fig)
            print(f"{key:14} load {fig['load_s']:.2f} s  prefill {fig['prefill_tps']:.0f} tok/s  decode "
                  f"{fig['decode_tps']:.1f} tok/s  peak RSS {fig['peak_rss_mb']:.0f} MB", flush=True)
    if "server" not in args.skip:
        print(f"\n== servers: {args.window:.0f} s windows, distinct prompts, 64 tokens each", flush=True)
        for kind, name, path in models:
            if kind == "ours" and name not in PAIRS:
                continue
            figs = server_figures(serve_ours if kind == "ours" else serve_llama, path, args)
            results[f"{kind}:{name}"]["server"] = figs
            for streams, f in figs.items():
                print(f"{kind:5} {name:7} {streams} streams: {f['tokens_per_s']:.1f} tok/s  TTFT {f['ttft_s']:.2f} s  "
                      f"failed {f['failed']}  peak RSS {f['peak_rss_mb'] or 0:.0f} MB", flush=True)

    print("\n== ours / llama.cpp (tok/s: >= 1.0 is better; perplexity ratio, file, load seconds, memory and TTFT: "
          "<= 1.0 is better)")
    for precision, quants in PAIRS.items():
        a = results.get(f"ours:{precision}")
        for quant in quants:
            b = results.get(f"llama:{quant}")
            if not a or not b:
                continue
            parts = []
            for f in ("ppl_ratio", "file_mb", "load_s", "prefill_tps", "decode_tps", "peak_rss_mb"):
                if f in a and f in b and b[f]:
                    parts.append(f"{f} {a[f] / b[f]:.2f}x")
            for streams in map(str, args.streams):
                sa, sb = a.get("server", {}).get(streams), b.get("server", {}).get(streams)
                if sa and sb and sb["tokens_per_s"]:
                    parts.append(f"server@{streams} tok/s {sa['tokens_per_s'] / sb['tokens_per_s']:.2f}x "
                                 f"TTFT {sa['ttft_s'] / sb['ttft_s']:.2f}x")
            print(f"{precision} vs {quant}: " + ", ".join(parts))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _size_mb(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data")]
    return sum(f.stat().st_size for f in files) / 1e6


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
