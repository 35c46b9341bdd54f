"""Measuring a built model against its source model, and its speed: the evaluation's side that
runs inside the builder image (through ``builder.build.worker``), or here with the ``local`` extra.
The stage around it (settings, gates, the record, running it in an image) is
``builder.build.evaluate``.

Accuracy (same tokens on both sides, from the committed public-domain text or a recipe's own):

- perplexity of the source (transformers, fp32) and of the built model (onnxruntime-genai),
  and their ratio;
- top-1 next-token agreement and mean KL(source || built) over the same positions;
- greedy agreement on a few fixed chat prompts (length of the common prefix).

Speed, measured in a child process that loads nothing but onnxruntime-genai (so its peak RSS
is the model's): load time, time to first token and prompt tokens/s for a 512-token prompt,
decode tokens/s over 128 tokens, medians of 3, with the CPU model, cores and threads.

Memory: the source model is run first, window by window, and only what the comparison needs
is kept (``builder.build.source_figures``); then it is freed and the built model is loaded.
The two are never held side by side, so the stage needs about what the conversion needed.

Olive's ``OnnxDiscrepancyCheck`` pass compares raw logits on random dummy inputs and fails the
Olive run (which still exits 0); raw logit error says little about a quantized model's quality
and it holds both models at once, so it is not used here; its greedy common-prefix measure is.
Perplexity over all positions uses ``generator.get_output("logits")`` after each appended chunk,
as Olive's own lm-eval ``ortgenai`` backend does.

Stdlib only at import time (and ``builder.contract``, ``builder.errors``, ``builder.build.source_figures``):
the builder image has no driver stack. torch, transformers and onnxruntime_genai are imported when
needed.

    python -m builder.build.measure --speed-json MODEL_DIR   (the speed child process)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from builder.build.source_figures import (
    GREEDY_TOKENS,
    TOKEN_CHUNK,
    DigestUnknown,
    Reference,
    available_memory,
    fp32_weight_bytes,
    load_reference,
    reference_cache_dir,
    reference_key,
    save_reference,
    source_dtype,
    source_pass,
)
from builder.contract import PACKAGE_DIR, compute_threads, og_config
from builder.errors import CheckError, EvaluationError

DEFAULT_MAX_TOKENS = 1024  # ~5% of the committed text: cheap, and enough to move a perplexity ratio
SPEED_PROMPT = 512
SPEED_DECODE = 128
SPEED_RUNS = 3
BUILTIN_TEXT = "eval-text.txt"
BUILTIN_TEXT_SOURCE = (
    "Shakespeare, Coriolanus (public domain), from karpathy/char-rnn data/tinyshakespeare/input.txt"
)
CHAT_PROMPTS = (
    "Write one sentence about the sea.",
    "What is two plus three? Answer briefly.",
    "Name three colours.",
)


@dataclass(frozen=True)
class AdapterUnderTest:
    """A finetuned build's adapter, evaluated as the finetuned model it stands for (issue 15).

    The source side is the Hugging Face base with the PEFT adapter in ``peft_dir`` applied and
    merged (``PeftModel.from_pretrained(base, peft_dir).merge_and_unload()``): the finetuned
    PyTorch model. The built side is the ONNX base with ``onnx_adapter`` loaded through
    ``og.Adapters`` and made active in every generator; ``onnx_adapter`` None means merged mode:
    the adapter is already in the built model's weights, so nothing is loaded on that side."""

    name: str
    peft_dir: Path | None  # None: the source as it is (how far the adapter moves the model from its base)
    onnx_adapter: Path | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "mode": "merged" if self.onnx_adapter is None else "adapter"}
        if self.onnx_adapter is not None:
            out["file"] = self.onnx_adapter.name
            out["sha256"] = "sha256:" + hashlib.sha256(self.onnx_adapter.read_bytes()).hexdigest()
        return out

    def validate(self) -> None:
        if self.onnx_adapter is not None and not self.onnx_adapter.is_file():
            raise EvaluationError(f"The adapter {self.name!r} has no file {self.onnx_adapter}.",
                                  hint="Name an .onnx_adapter file that exists (the build writes adapters/<name>.onnx_adapter).")
        if self.peft_dir is not None and not (Path(self.peft_dir) / "adapter_config.json").is_file():
            raise EvaluationError(f"The adapter {self.name!r}: {self.peft_dir} holds no adapter_config.json, so it "
                                  "is not a PEFT adapter folder.",
                                  hint="Pass the folder the LoRA training wrote (adapter_config.json and the "
                                  "adapter weights).")


# ---------------------------------------------------------------------------- the text


@dataclass(frozen=True)
class EvalText:
    """The text measured on: its content, the digest of its bytes and what it is (for the record)."""

    text: str
    digest: str
    source: str


def load_text(path: str | Path | None = None, source: str | None = None) -> EvalText:
    """The committed text, or a local file (``source``: what it is a copy of, for the record)."""
    if path is None:
        raw = resources.files("builder").joinpath("data", BUILTIN_TEXT).read_bytes()
        source = BUILTIN_TEXT_SOURCE
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise EvaluationError(f"Cannot read the evaluation text {path}: {e}",
                                  hint="Fix `evaluate.text` in the recipe (a file relative to the recipe).") from None
        source = source or Path(path).name
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EvaluationError(f"The evaluation text {path} is not UTF-8 text.") from None
    if len(text.strip()) < 200:
        raise EvaluationError(f"The evaluation text {path or BUILTIN_TEXT} is too short to measure anything "
                              "(it needs at least a few hundred words).")
    return EvalText(text=text, digest="sha256:" + hashlib.sha256(raw).hexdigest(), source=source)


def preload() -> threading.Thread:
    """Import what the source pass needs (torch, transformers: 2-3 s on a busy 2-core machine) in
    a background thread, so that a caller with other work first (the worker, while Olive
    converts in its own process) does not wait for it later. Returns the thread."""

    def run() -> None:
        # Before torch loads, as in measure(): passive OpenMP waiting on a busy machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        except Exception:  # noqa: BLE001, S110 - only a head start: measure() imports (and reports) for real
            pass

    thread = threading.Thread(target=run, name="olive-builder-preload", daemon=True)
    thread.start()
    return thread


@dataclass
class _SourceSide:
    """What the source pass runs on: the token windows and chat prompts, as the source's tokenizer
    makes them, and the dtype the source runs in."""

    source_dir: Path
    windows: list[list[int]]
    prompts: list[list[int]]
    dtype: Any
    dtype_note: str | None
    peft_dir: Path | None
    trust_remote_code: bool


def _source_side(source_dir: Path, text: EvalText, context: int, max_tokens: int, trust_remote_code: bool,
                 adapter: AdapterUnderTest | None) -> _SourceSide:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging

    hf_logging: Any = logging
    hf_logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum": we window it

    tok = AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
    src_config = AutoConfig.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
    context = min(context, int(getattr(src_config, "max_position_embeddings", context) or context))
    ids = tok(text.text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id] else None
    windows = _windows(ids, max_tokens, min(context, max_tokens), bos)
    prompts = []
    for content in CHAT_PROMPTS:
        messages = [{"role": "user", "content": content}]
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = content
        prompts.append(tok(prompt, add_special_tokens=True)["input_ids"])
    dtype, dtype_note = source_dtype(source_dir)
    peft_dir = Path(adapter.peft_dir) if adapter is not None and adapter.peft_dir else None
    return _SourceSide(source_dir, windows, prompts, dtype, dtype_note, peft_dir, trust_remote_code)


def _reference(side: _SourceSide, announce: Callable[[], object]) -> tuple[Reference, bool]:
    """The source's figures on ``side``: from the reference cache when an earlier evaluation (or the
    prefetch) kept them, else computed (``announce`` first) and kept. (figures, from the cache)."""
    cache = reference_cache_dir()
    key_args = (side.source_dir, side.peft_dir, side.windows, side.prompts, side.dtype, not side.trust_remote_code,
                cache)
    key: str | None = None
    if cache is not None:
        try:
            key = reference_key(*key_args, read=False)
            found = load_reference(cache, key)
            if found is not None:
                return found, True
        except DigestUnknown:
            # Files never hashed here: no earlier evaluation can have seen them (short of a
            # copy elsewhere), so nothing is looked up, and the hashing for storing the
            # figures runs beside the source pass instead of before it.
            pass
    announce()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        keying = pool.submit(reference_key, *key_args) if cache is not None and key is None else None
        ref = source_pass(side.source_dir, side.windows, side.prompts, side.trust_remote_code,
                          peft_dir=side.peft_dir, dtype=side.dtype)
        try:
            key = keying.result() if keying is not None else key
        except OSError:
            key = None  # unreadable now: the figures are not kept
    if cache is not None and key is not None:
        save_reference(cache, key, ref)
    return ref, False


def prefetch_reference(source_dir: str | Path, *, text_path: str | Path | None = None, text_source: str | None = None,
                       max_tokens: int = DEFAULT_MAX_TOKENS, trust_remote_code: bool = False) -> threading.Thread | None:
    """Compute the source's figures in a background thread and keep them in the reference cache, so
    that ``measure`` later finds them instead of running the source then: the worker calls this
    while Olive converts in its own process, which leaves a core idle on small machines (measured
    on the real model, 2 cores: the stage's source pass is ~7 s of its ~18). None when nothing is started:
    no reference cache, or too little memory for the source in fp32 beside Olive's own copy (the
    same 70 % of the available memory ``source_dtype`` allows one fp32 copy).
    Whatever goes wrong in the thread only costs the head start: ``measure`` computes as before
    (the windows differ, and so does the cache key, if the built model's context is shorter)."""
    source_dir = Path(source_dir)
    if reference_cache_dir() is None:
        return None
    available = available_memory()
    try:
        fp32_bytes = fp32_weight_bytes(source_dir)
    except OSError:
        return None
    if available is None or 2 * fp32_bytes > 0.7 * available:  # Olive holds the model at the same time
        return None

    def run() -> None:
        # Passive OpenMP waiting, as in measure(): this shares the machine with Olive. torch keeps its
        # thread count: another count could round the figures differently from the stage's own pass.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            text = load_text(text_path, text_source)
            side = _source_side(source_dir, text, 1 << 30, max_tokens, trust_remote_code, None)
            _reference(side, lambda: None)
        except Exception:  # noqa: BLE001, S110 - only a head start: measure() computes (and reports) for real
            pass

    thread = threading.Thread(target=run, name="olive-builder-source-figures", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------- the models


def _genai_config(model_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError) as e:
        raise CheckError(f"{model_dir} holds no readable genai_config.json: {e}") from None


def _uses_cuda(model_dir: Path) -> bool:
    options = _genai_config(model_dir).get("model", {}).get("decoder", {}).get("session_options", {})
    return any("cuda" in entry for entry in options.get("provider_options") or [] if isinstance(entry, dict))


def cuda_unavailable_reason() -> str | None:
    """Why this environment cannot run a CUDA model (None when it can)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai is not installed"
    if not og.is_cuda_available():
        return (f"this onnxruntime-genai {og.__version__} has no CUDA support or no GPU is visible "
                "(a cuda target built on a CPU-only builder)")
    return None


def _og_model(model_dir: Path, *, force_cpu: bool) -> Any:
    import onnxruntime_genai as og

    try:
        # The server's loader: the same compute threads. force_cpu: a cuda target without a GPU,
        # its accuracy still measured, on the CPU provider.
        return og.Model(og_config(og, model_dir, force_cpu=force_cpu))
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError/OrtException
        raise CheckError(f"onnxruntime-genai cannot load the model in {model_dir}: {e}") from None


def _og_adapters(model: Any, adapter: AdapterUnderTest | None) -> Any:
    """The loaded ``og.Adapters`` of ``adapter`` (None when nothing is to be loaded: no adapter,
    or merged mode). It must stay alive as long as the generators that use it."""
    if adapter is None or adapter.onnx_adapter is None:
        return None
    import onnxruntime_genai as og

    try:
        adapters = og.Adapters(model)
        adapters.load(str(adapter.onnx_adapter), adapter.name)
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError/OrtException
        raise CheckError(f"onnxruntime-genai cannot load the adapter {adapter.name!r} from "
                         f"{adapter.onnx_adapter}: {e}") from None
    return adapters


def _generator(model: Any, max_length: int, adapters: Any, name: str | None, **search: Any) -> Any:
    """A greedy generator, with the adapter under test active when there is one."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False, **search)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    return generator


def _windows(ids: list[int], max_tokens: int, window: int, bos: int | None) -> list[list[int]]:
    """The first ``max_tokens`` of ``ids`` in windows of ``window`` tokens (each starting with
    ``bos`` when the tokenizer adds one), as both models see them."""
    ids = ids[:max_tokens]
    body = window - (1 if bos is not None else 0)
    out = []
    for start in range(0, len(ids), body):
        piece = ids[start : start + body]
        if len(piece) >= 2:
            out.append(([bos] if bos is not None else []) + piece)
    return out


# ---------------------------------------------------------------------------- the built model and the comparison


def _kl(ref_ids: Any, ref_logp: Any, logp: Any) -> Any:
    """KL(source || built) per position (a tensor [n]) over the source's top-k tokens plus one
    bucket for the rest; ``ref_ids``/``ref_logp`` [n, k], ``logp`` [n, vocab].

    Exact when k covers the vocabulary; otherwise a lower bound (merging tokens never raises
    a KL divergence) that misses only the source's tail beyond its top k tokens. In float64:
    the rest bucket is one minus a sum close to one."""
    import torch

    src = ref_logp.double()
    q_logp = logp.gather(1, ref_ids).double()
    p = src.exp()
    head = (p * (src - q_logp)).sum(-1)
    rest_p = (1.0 - p.sum(-1)).clamp(min=0.0)
    rest_q = (1.0 - q_logp.exp().sum(-1)).clamp(min=1e-30)
    tail = torch.where(rest_p > 1e-12, rest_p * torch.log(rest_p.clamp(min=1e-300) / rest_q),
                       torch.zeros_like(rest_p))
    kl = (head + tail).clamp(min=0.0)
    return torch.where(torch.isfinite(head), kl, torch.full_like(kl, float("inf")))


@dataclass
class _Built:
    nll: list[float] = field(default_factory=list)
    agree: int = 0
    kl: list[float] = field(default_factory=list)
    greedy: list[list[int]] = field(default_factory=list)


def _built_pass(model: Any, windows: list[list[int]], prompts: list[list[int]], ref: Reference | None,
                adapter: AdapterUnderTest | None = None) -> _Built:
    import torch

    adapters = _og_adapters(model, adapter)
    name = adapter.name if adapter is not None else None
    built = _Built()
    pos = 0
    for window in windows:
        generator = _generator(model, len(window), adapters, name)
        for s in range(0, len(window) - 1, TOKEN_CHUNK):
            piece = window[s : s + TOKEN_CHUNK]
            generator.append_tokens(piece)
            # All positions of the chunk just appended (get_logits() gives only the last one).
            logits = torch.from_numpy(generator.get_output("logits")[0])
            targets = window[s + 1 : s + 1 + len(piece)]
            logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
            t = torch.tensor(targets, dtype=torch.long)
            built.nll.extend((-logp[torch.arange(len(targets)), t]).tolist())
            if ref is not None:
                rows = slice(pos, pos + len(targets))
                arg = logp.argmax(dim=-1)
                built.agree += int((arg == torch.tensor(ref.argmax[rows])).sum())
                built.kl.extend(_kl(ref.topk_ids[rows], ref.topk_logp[rows], logp).tolist())
            pos += len(targets)
        del generator
    for prompt in prompts:
        generator = _generator(model, len(prompt) + GREEDY_TOKENS, adapters, name)
        generator.append_tokens(prompt)
        tokens: list[int] = []
        # Raw argmax of the logits, like the source side: no search options (repetition
        # penalty, EOS handling) may make the two differ.
        while True:
            tokens.append(int(generator.get_logits()[0, -1].argmax()))
            if len(tokens) == GREEDY_TOKENS:
                break
            generator.append_tokens([tokens[-1]])
        built.greedy.append(tokens)
        del generator
    del adapters
    return built


def _mean_ppl(nll: list[float]) -> float:
    mean = sum(nll) / len(nll)
    return math.exp(mean) if mean < 700 else float("inf")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------- speed


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "logical_cores": os.cpu_count(), "usable_cores": usable}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _process_threads() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_kb(fallback: int) -> int:
    """This process's own peak resident memory (VmHWM), in KiB. Not ``ru_maxrss``: Linux carries that
    across exec, so a child started by the build process (1 GB with torch) reported the build's
    size instead of the model's."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return fallback


def _speed_here(model_dir: Path, prompt_tokens: int, decode_tokens: int, runs: int,
                adapter: AdapterUnderTest | None = None) -> dict[str, Any]:
    """Run in the child process: only onnxruntime-genai is imported here. With ``adapter`` (a
    loaded .onnx_adapter), its load is part of the load time and it is active while generating."""
    import resource

    import onnxruntime_genai as og

    config = _genai_config(model_dir)
    context = int(config.get("model", {}).get("context_length") or 0) or (prompt_tokens + decode_tokens + 1)
    # A model with a short context gets a shorter prompt; the record says how long it was.
    prompt_len = max(16, min(prompt_tokens, context - decode_tokens - 1))
    # Any 512 tokens of English will do; the start of the text has them (not tokenizing all of it
    # saves a quarter of a second per run).
    text = load_text().text[: 16 * (prompt_len + 16)]
    loads, ttfts, decodes, threads = [], [], [], None
    for _ in range(runs):
        started = time.perf_counter()
        model = og.Model(og_config(og, model_dir))
        tokenizer = og.Tokenizer(model)
        adapters = _og_adapters(model, adapter)
        loads.append(time.perf_counter() - started)
        ids = list(tokenizer.encode(text))
        while len(ids) < prompt_len:
            ids += ids
        prompt = ids[:prompt_len]
        total = prompt_len + 1 + decode_tokens
        # min_length keeps EOS from ending the run early: every run decodes the same count.
        generator = _generator(model, total, adapters, adapter.name if adapter else None, min_length=total)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        ttfts.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            generator.generate_next_token()
        decodes.append(time.perf_counter() - started)
        threads = _process_threads()
        del generator, adapters, tokenizer, model
    threads_given = compute_threads(model_dir)
    options = config.get("model", {}).get("decoder", {}).get("session_options", {})
    ttft = statistics.median(ttfts)
    return {
        "measured": True,
        "runs": runs,
        "load_s": round(statistics.median(loads), 4),
        "prompt_tokens": prompt_len,
        "ttft_s": round(ttft, 4),
        "prompt_tokens_per_s": round(prompt_len / ttft, 1),
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": round(decode_tokens / statistics.median(decodes), 1),
        "peak_rss_mb": round(_peak_rss_kb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1),
        "cpu": cpu_info(),
        "intra_op_threads": threads_given or options.get("intra_op_num_threads"),
        "process_threads": threads,
        "onnxruntime_genai": og.__version__,
    }


def measure_speed(model_dir: Path, *, device: str, prompt_tokens: int = SPEED_PROMPT,
                  decode_tokens: int = SPEED_DECODE, runs: int = SPEED_RUNS,
                  adapter: AdapterUnderTest | None = None) -> dict[str, Any]:
    """Speed of the built model, in a child process so that peak RSS is the model's alone."""
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            return {"measured": False, "reason": f"speed not measured: target device cuda, but {reason}"}
    cmd = [sys.executable, "-m", "builder.build.measure", "--speed-json", str(model_dir),
           "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens), "--runs", str(runs)]
    if adapter is not None and adapter.onnx_adapter is not None:
        cmd += ["--adapter", adapter.name, "--adapter-file", str(adapter.onnx_adapter)]
    env = dict(os.environ)
    package_root = str(PACKAGE_DIR.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"measured": False, "reason": f"speed measurement failed: {tail[0]}"}
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


# ---------------------------------------------------------------------------- both models


@dataclass
class Figures:
    """What was measured: the stage's record (``builder.build.evaluate.report.EvaluationRecord``)
    takes these over and adds the gates and the verdict."""

    text: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part: source, built, speed
    seconds: float = 0.0
    adapter: dict[str, Any] | None = None  # the adapter measured (AdapterUnderTest.to_json()); None: the base model
    source_cached: bool = False  # the source's figures came from the cache (an earlier build of the same source)
    source_vocab: int | None = None  # the source's vocabulary size; None: measured without a source


def measure(
    model_dir: str | Path,
    source_dir: str | Path | None,
    *,
    device: str = "cpu",
    text_path: str | Path | None = None,
    text_source: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    speed: bool = True,
    trust_remote_code: bool = False,
    on_progress: Callable[[str], object] | None = None,
    adapter: AdapterUnderTest | None = None,
) -> Figures:
    """Measure the built model in ``model_dir`` against ``source_dir`` on the text ``text_path``
    (None: the committed text; ``text_source``: what it is a copy of).

    ``source_dir`` None measures the built model alone (its perplexity and speed, no
    comparison). ``adapter``: measure the finetuned model instead of the base (the source is
    ``source_dir`` with the PEFT adapter merged; the built model runs with the adapter active,
    or as it is in merged mode); the figures name it."""
    say = on_progress or (lambda message: None)
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    model_dir = Path(model_dir)
    if adapter is not None:
        adapter.validate()
    text = load_text(text_path, text_source)
    config = _genai_config(model_dir)
    context = int(config.get("model", {}).get("context_length") or 2048)
    cuda_reason = cuda_unavailable_reason() if device == "cuda" or _uses_cuda(model_dir) else None
    result = Figures(adapter=adapter.to_json() if adapter else None)
    what = f" with the adapter {adapter.name!r}" if adapter is not None else ""
    ref: Reference | None = None
    prompts: list[list[int]] = []
    if source_dir is not None:
        # Build machines are often busy (CI runners, parallel builds): spinning OpenMP threads then
        # make torch several times slower (measured 2-10x on 2 busy cores); passive waiting costs
        # nothing on an idle machine. Takes effect only if torch is not loaded yet (the worker's case).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        side = _source_side(Path(source_dir), text, context, max_tokens, trust_remote_code, adapter)
        windows, prompts, dtype_note = side.windows, side.prompts, side.dtype_note
        ref, cached = _reference(side, lambda: say(f"source model (transformers, fp32){what}: {len(windows)} "
                                                   f"window(s) of up to {len(windows[0])} tokens"))
        if cached:
            # A second precision or target of the same source (a matrix build), or figures computed
            # while Olive converted: the source's figures on these tokens are already known.
            say(f"source model{what}: its figures on these tokens are cached ({reference_cache_dir()}), by an "
                "earlier evaluation or while Olive converted")
            result.source_cached = True
        ref.dtype_note = dtype_note
        result.timings["source_s"] = round(time.monotonic() - started, 2)
        result.timings["source_cpu_s"] = round(_cpu_seconds() - cpu_started, 2)
    else:
        import onnxruntime_genai as og

        model = _og_model(model_dir, force_cpu=cuda_reason is not None)  # its tokenizer, then the pass below
        ids = list(og.Tokenizer(model).encode(text.text))
        windows = _windows(ids, max_tokens, min(context, max_tokens), None)
    result.text = {
        "source": text.source,
        "digest": text.digest,
        "tokens": sum(len(w) - 1 for w in windows),
        "windows": len(windows),
        "window_tokens": max(len(w) for w in windows),
    }
    say(f"built model (onnxruntime-genai){what}" + (" on the CPU provider: " + cuda_reason if cuda_reason else ""))
    if source_dir is not None:
        model = _og_model(model_dir, force_cpu=cuda_reason is not None)
    built = _built_pass(model, windows, prompts, ref, adapter)
    del model
    gc.collect()
    result.timings["built_s"] = round(time.monotonic() - started - result.timings.get("source_s", 0.0), 2)
    built_cpu = _cpu_seconds() - cpu_started
    result.timings["built_cpu_s"] = round(built_cpu - result.timings.get("source_cpu_s", 0.0), 2)
    acc: dict[str, Any] = {"perplexity": round(_mean_ppl(built.nll), 4)}
    if ref is not None:
        src_ppl = _mean_ppl(ref.nll)
        prefixes = [_common_prefix(a, b) for a, b in zip(ref.greedy, built.greedy, strict=True)]
        acc.update(
            {
                "source_perplexity": round(src_ppl, 4),
                "perplexity_ratio": round(_mean_ppl(built.nll) / src_ppl, 5),
                "top1_agreement": round(built.agree / len(ref.argmax), 4),
                "mean_kl": round(sum(built.kl) / len(built.kl), 6),
                "kl_top_k": int(ref.topk_ids.shape[1]),
                "greedy_prompts": len(prefixes),
                "greedy_tokens": GREEDY_TOKENS,
                "greedy_prefix_mean": round(sum(prefixes) / len(prefixes), 2),
                "greedy_prefix_min": min(prefixes),
            }
        )
        if ref.dtype_note:
            acc["source_dtype"] = ref.dtype_note
    result.accuracy = acc
    if speed:
        say("speed: load, 512-token prompt, 128-token decode, 3 runs")
        before = time.monotonic()
        result.speed = measure_speed(model_dir, device=device, adapter=adapter)
        result.timings["speed_s"] = round(time.monotonic() - before, 2)
        result.timings["speed_cpu_s"] = round(_cpu_seconds() - cpu_started - built_cpu, 2)
    else:
        result.speed = {"measured": False, "reason": "speed not measured: `evaluate.speed: false` in the recipe"}
    if ref is not None:
        result.source_vocab = ref.vocab
    result.seconds = round(time.monotonic() - started, 3)
    # CPU seconds of this process and the speed child: what the stage costs on a machine that
    # is busy with other work, where wall time says more about the neighbours.
    result.timings["cpu_s"] = round(_cpu_seconds() - cpu_started, 2)
    return result


# ---------------------------------------------------------------------------- the speed child process


def main(argv: list[str] | None = None) -> int:
    """The speed child process (``measure_speed``): prints the speed figures as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m builder.build.measure",
                                     description="Speed of a built model (the evaluation's child process).")
    parser.add_argument("model_dir")
    parser.add_argument("--speed-json", action="store_true", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=SPEED_PROMPT)
    parser.add_argument("--decode-tokens", type=int, default=SPEED_DECODE)
    parser.add_argument("--runs", type=int, default=SPEED_RUNS)
    parser.add_argument("--adapter", metavar="NAME", help="load this adapter and make it active")
    parser.add_argument("--adapter-file", metavar="FILE", help="its .onnx_adapter")
    args = parser.parse_args(argv)
    adapter = None
    if args.adapter:
        onnx_adapter = Path(args.adapter_file or Path(args.model_dir) / "adapters" / f"{args.adapter}.onnx_adapter")
        adapter = AdapterUnderTest(args.adapter, None, onnx_adapter)
    print(json.dumps(_speed_here(Path(args.model_dir), args.prompt_tokens, args.decode_tokens, args.runs, adapter)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
