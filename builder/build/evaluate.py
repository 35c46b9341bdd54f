"""Evaluation: the checked model against its source model, and its speed, before packaging.

Accuracy (same tokens on both sides, from the committed public-domain text or a recipe's own):

- perplexity of the source (transformers, fp32) and of the built model (onnxruntime-genai),
  and their ratio;
- top-1 next-token agreement and mean KL(source || built) over the same positions;
- greedy agreement on a few fixed chat prompts (length of the common prefix).

Speed, measured in a child process that loads nothing but onnxruntime-genai (so its peak RSS
is the model's): load time, time to first token and prompt tokens/s for a 512-token prompt,
decode tokens/s over 128 tokens, medians of 3, with the CPU model, cores and threads.

Memory: the source model is run first, window by window, and only what the comparison needs
is kept (per position: the target's log-probability, the argmax, the top-k log-probabilities);
then it is freed and the built model is loaded. The two are never held side by side, so the
stage needs about what the conversion needed.

Olive's ``OnnxDiscrepancyCheck`` pass compares raw logits on random dummy inputs and fails the
Olive run (which still exits 0); raw logit error says little about a quantized model's quality
and it holds both models at once, so it is not used here; its greedy common-prefix measure is.
Perplexity over all positions uses ``generator.get_output("logits")`` after each appended chunk,
as Olive's own lm-eval ``ortgenai`` backend does.

Stdlib only at import time: this runs inside the builder image (through ``builder.build.worker``) and
on hosts with the ``local`` extra. torch, transformers and onnxruntime_genai are imported when
needed.

    python -m builder.build.evaluate MODEL_DIR [--against SOURCE_DIR] [--precision P] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from builder.contract import PACKAGE_DIR
from builder.errors import BuilderError, CheckError, EvaluationError

DEFAULT_MAX_TOKENS = 1024  # ~5% of the committed text: cheap, and enough to move a perplexity ratio
CHUNK = 128  # tokens appended at a time: a chunk's logits are CHUNK x vocab floats (78 MB at 152k vocab)
TOP_K = 256  # source log-probabilities kept per position for the KL divergence
GREEDY_TOKENS = 32
SPEED_PROMPT = 512
SPEED_DECODE = 128
SPEED_RUNS = 3
UNINFORMED = 0.25  # a source perplexity above this share of the vocabulary: agreement gates are not applied
BUILTIN_TEXT = "eval-text.txt"
BUILTIN_TEXT_SOURCE = (
    "Shakespeare, Coriolanus (public domain), from karpathy/char-rnn data/tinyshakespeare/input.txt"
)
CHAT_PROMPTS = (
    "Write one sentence about the sea.",
    "What is two plus three? Answer briefly.",
    "Name three colours.",
)

# Limits per target precision (`python benchmarks/bench_eval.py --calibrate`; figures in README
# "Evaluation"). On the tiny model trained on the evaluation text, correct conversions measured
# perplexity ratios 0.999-1.000 and top-1 agreement 1.0 (fp32), 0.97 (int8), 0.89 (int4). The
# perplexity limits are the project's starting points, above every correct figure; the top-1
# limits sit below the correct figure by a margin twice the tiny model's own int4/int8 loss
# (real models lose more than a 64-wide one), and above what damaged weights measured
# (fp32 +5 % noise: 0.95; int4 +20 %: 0.57). fp16/bf16 could not be built for a CPU here: their
# limits are interpolated, not measured.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": {"max_perplexity_ratio": 1.001, "min_top1_agreement": 0.98},
    "fp16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.95},
    "bf16": {"max_perplexity_ratio": 1.01, "min_top1_agreement": 0.95},
    "int8": {"max_perplexity_ratio": 1.05, "min_top1_agreement": 0.90},
    "int4": {"max_perplexity_ratio": 1.15, "min_top1_agreement": 0.75},
}
GATE_NAMES = ("max_perplexity_ratio", "min_top1_agreement", "max_mean_kl", "min_greedy_prefix")
WHAT_TO_TRY = {
    "int4": "Try a higher precision (int8 on cpu, fp16 on cuda), `olive.extra_options: {int4_accuracy_level: 4}` "
    "or a smaller `int4_block_size` (32 or 16).",
    "int8": "Try fp32, or int4 with `olive.extra_options: {int4_accuracy_level: 4}`.",
    "fp16": "Try bf16 or fp32: some models overflow in fp16.",
    "bf16": "Try fp32.",
    "fp32": "An fp32 conversion should match its source: check `olive.passes` and the model's architecture support.",
}


@dataclass(frozen=True)
class Settings:
    """What the recipe's ``evaluate:`` section asks for (the plan carries it as JSON)."""

    enabled: bool = True
    gates: dict[str, float] = field(default_factory=dict)  # overrides of DEFAULT_GATES
    text: str | None = None  # a local text file; None: the committed text
    max_tokens: int = DEFAULT_MAX_TOKENS
    speed: bool = True
    text_source: str | None = None  # what ``text`` is a copy of (a Hub dataset file: hub_text_label)

    @classmethod
    def from_json(cls, data: Any) -> Settings:
        if data is None:
            return cls()
        if data is False:
            return cls(enabled=False)
        return cls(
            enabled=bool(data.get("enabled", True)),
            gates={k: float(v) for k, v in (data.get("gates") or {}).items()},
            text=data.get("text"),
            max_tokens=int(data.get("max_tokens") or DEFAULT_MAX_TOKENS),
            speed=bool(data.get("speed", True)),
            text_source=data.get("text_source"),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gates_for(precision: str | None, overrides: dict[str, float] | None = None) -> dict[str, float]:
    gates = dict(DEFAULT_GATES.get(precision or "", {}))
    gates.update(overrides or {})
    return gates


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
    text: str
    digest: str
    source: str


HUB_TEXT_LIMIT = 64 << 20  # an evaluation text uses its first tokens; a larger file is a mistake


@dataclass(frozen=True)
class HubText:
    """An evaluation text that is a file of a Hugging Face dataset repository at a pinned commit
    (the recipe's ``evaluate.text: {hub: OWNER/NAME, revision: <40-hex commit>, file: PATH}``)."""

    hub: str
    revision: str
    file: str

    @classmethod
    def from_json(cls, data: Any) -> HubText:
        """From the recipe's mapping; a clear error for anything else."""
        import re

        if not isinstance(data, dict) or set(data) != {"hub", "revision", "file"}:
            raise EvaluationError(f"evaluate.text {data!r}: a Hub text is {{hub: OWNER/NAME, revision: COMMIT, "
                                  "file: PATH}, nothing else.", hint="Or name a local UTF-8 file.")
        hub, revision, file = (str(data[k]) for k in ("hub", "revision", "file"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", hub):
            raise EvaluationError(f"evaluate.text.hub {hub!r} is not a Hub dataset id (OWNER/NAME).")
        if not re.fullmatch(r"[0-9a-f]{40}", revision):
            raise EvaluationError(f"evaluate.text.revision {revision!r} is not a commit (40 hex digits).",
                                  hint="Pin the dataset: a branch or tag could name other text tomorrow, and the "
                                  "figures would not be comparable.")
        from builder.source.hub import inside_repository

        if not inside_repository(file):
            raise EvaluationError(f"evaluate.text.file {file!r} is not a path inside the dataset repository.")
        return cls(hub, revision, file)

    @property
    def label(self) -> str:
        return f"Hugging Face dataset {self.hub}@{self.revision[:12]}: {self.file}"

    def fetch(self) -> Path:
        """The local copy, downloaded once per commit (``hub.fetch_dataset``: HF_ENDPOINT, HF_TOKEN)."""
        from builder.errors import DatasetError
        from builder.source import hub

        try:
            return hub.fetch_dataset(self.hub, self.revision, [self.file], max_bytes=HUB_TEXT_LIMIT)[0]
        except DatasetError as e:
            raise EvaluationError(f"The evaluation text cannot be fetched: {e.message}",
                                  hint="Check `evaluate.text` (hub, revision, file), the network (or HF_ENDPOINT) "
                                  "and, for a gated dataset, HF_TOKEN; or name a local copy of the file.") from None


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


def preload() -> Any:
    """Import what the source pass needs (torch, transformers: 2-3 s on a busy 2-core machine) in
    a background thread, so that a caller with other work first (the worker, while Olive
    converts in its own process) does not wait for it later. Returns the thread."""
    import threading

    def run() -> None:
        # Before torch loads, as in evaluate(): passive OpenMP waiting on a busy machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        except Exception:  # noqa: BLE001, S110 - only a head start: evaluate() imports (and reports) for real
            pass

    thread = threading.Thread(target=run, name="olive-builder-preload", daemon=True)
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
        if force_cpu:
            # A cuda target without a GPU: its accuracy is still measured, on the CPU provider.
            config = og.Config(str(model_dir))
            config.clear_providers()
            return og.Model(config)
        return og.Model(str(model_dir))
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


@dataclass
class _Reference:
    """What the source model said at each scored position (everything the comparison needs)."""

    nll: list[float]
    argmax: list[int]
    topk_ids: Any  # tensor [positions, k], int64: the source's k most likely tokens per position
    topk_logp: Any  # tensor [positions, k], float32: their log-probabilities
    greedy: list[list[int]]
    vocab: int
    dtype_note: str | None = None


def _windows(ids: list[int], max_tokens: int, window: int, bos: int | None) -> list[list[int]]:
    ids = ids[:max_tokens]
    body = window - (1 if bos is not None else 0)
    out = []
    for start in range(0, len(ids), body):
        piece = ids[start : start + body]
        if len(piece) >= 2:
            out.append(([bos] if bos is not None else []) + piece)
    return out


def _chunk_stats(logits: Any, targets: list[int], k: int) -> tuple[Any, Any, Any, Any]:
    """Per position: NLL of the target, argmax, top-k ids and top-k log-probabilities."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, dtype=torch.long)
    nll = -logp[torch.arange(len(targets)), t]
    top = torch.topk(logp, k, dim=-1)
    return nll, logp.argmax(dim=-1), top.indices, top.values


def _step(model: Any, ids: list[int], cache: Any) -> tuple[Any, Any]:
    """One forward pass over ``ids`` after ``cache``: (logits [n, vocab], the new cache)."""
    import torch

    # transformers 5 renamed past_key_values to cache (the old name still works, with a warning).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits[0], out.get(name)


def _window_logits(model: Any, window: list[int], split: bool) -> Iterator[tuple[int, Any]]:
    """(start, logits [n, vocab]) for each CHUNK of positions of ``window``.

    ``split``: one pass of the decoder over the whole window, then the LM head a chunk at a
    time, so the full window's logits (window x vocab floats: 1.2 GB at 2048 x 152k) never exist
    at once. Otherwise chunk by chunk with the KV cache (slower: the attention is recomputed
    per chunk)."""
    import torch

    if split:
        hidden = model.get_decoder()(input_ids=torch.tensor([window])).last_hidden_state[0]
        head = model.get_output_embeddings()
        for s in range(0, len(window) - 1, CHUNK):
            yield s, head(hidden[s : s + CHUNK])
        return
    cache = None
    for s in range(0, len(window) - 1, CHUNK):
        logits, cache = _step(model, window[s : s + CHUNK], cache)
        yield s, logits


def _can_split(model: Any, window: list[int]) -> bool:
    """Whether decoder + LM head give the model's own logits (some models scale or cap logits
    after the head: those take the slower path)."""
    import torch

    try:
        probe = window[:8]
        whole = model(input_ids=torch.tensor([probe])).logits[0]
        hidden = model.get_decoder()(input_ids=torch.tensor([probe])).last_hidden_state[0]
        split = model.get_output_embeddings()(hidden)
        return bool(torch.allclose(whole, split, rtol=1e-4, atol=1e-4))
    except Exception:  # noqa: BLE001 - no decoder/head accessors: the generic path
        return False


def _source_dtype(source_dir: Path) -> tuple[Any, str | None]:
    """fp32, unless the fp32 weights would not fit in the memory available now: then the
    checkpoint's own dtype (the conversion loaded it that way too), and why."""
    import torch

    stored = sum(p.stat().st_size for p in source_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in source_dir.glob("*.bin"))
    try:
        config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(name, 4)
    fp32_bytes = stored * 4 // width
    available = _available_memory()
    if width < 4 and available is not None and fp32_bytes > 0.7 * available:
        why = (f"source run in {name}: its fp32 weights ({fp32_bytes >> 20} MiB) would not fit in the "
               f"{available >> 20} MiB available")
        return getattr(torch, name), why
    return torch.float32, None


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _few_rows_linear_mode() -> Any:
    """A torch function mode computing ``linear`` of a few rows (one token per prompt while
    decoding) as ``weight @ x.T``.

    For a handful of rows torch's ``x @ weight.T`` takes a slow single-threaded path: measured
    here, 3 rows through a 151936 x 896 LM head took 170 ms, 3.2x one row, while
    ``weight @ x.T`` took 53 ms, 1.3x one row (and uses both cores). Without this, decoding
    the prompts together was hardly cheaper than one after the other. Only the order of the
    fp32 sums differs from torch's own: float rounding, nothing else."""
    import torch
    from torch.overrides import TorchFunctionMode

    linear = torch.nn.functional.linear

    class FewRows(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func is linear and len(args) >= 2:
                x, weight = args[0], args[1]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                rows = x.numel() // max(1, x.shape[-1])
                if 1 < rows <= 16 and weight.dim() == 2 and x.dtype == weight.dtype:
                    out = (weight @ x.reshape(rows, x.shape[-1]).t()).t()
                    if bias is not None:
                        out = out + bias
                    return out.reshape(*x.shape[:-1], weight.shape[0])
            return func(*args, **kwargs)

    return FewRows()


def _greedy(model: Any, prompts: list[list[int]], vocab: int, batched: bool) -> list[list[int]]:
    """GREEDY_TOKENS raw-argmax tokens after each prompt.

    ``batched``: all prompts at once, left-padded, with their attention mask and positions, so
    each step reads the fp32 weights once for every prompt instead of once per prompt (3 x 32
    steps one by one were about 40 % of the source pass of a Qwen2.5-0.5B-shaped model; together:
    16.4 -> 12 CPU seconds there, and 3.3 -> 2.4 on the ~350 MB bench model, on 2 cores).
    Masked positions get exactly zero attention, so each row computes what it would alone, up
    to float rounding. Otherwise one prompt after the other (models with their own code,
    whose handling of padding is not known)."""
    import torch

    if not batched:
        out = []
        for prompt in prompts:
            logits, cache = _step(model, prompt, None)
            tokens = [int(logits[-1, :vocab].argmax())]
            while len(tokens) < GREEDY_TOKENS:
                logits, cache = _step(model, [tokens[-1]], cache)
                tokens.append(int(logits[-1, :vocab].argmax()))
            out.append(tokens)
        return out
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)  # the pad token's value is never attended to
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    parameters = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    # Only the last position's logits are wanted (the LM head over every prompt position is a
    # few GFLOP at a 150k vocabulary).
    last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last)
    steps = [result.logits[:, -1, :vocab].argmax(-1)]
    with _few_rows_linear_mode():
        while len(steps) < GREEDY_TOKENS:
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            result = model(input_ids=steps[-1][:, None], attention_mask=mask, position_ids=positions,
                           use_cache=True, **{name: result.get(name)})
            steps.append(result.logits[:, -1, :vocab].argmax(-1))
    return torch.stack(steps, dim=1).tolist()


def _source_pass(source_dir: Path, windows: list[list[int]], prompts: list[list[int]], trust_remote_code: bool,
                 peft_dir: Path | None = None, dtype: Any = None) -> _Reference:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    hf_logging: Any = logging
    hf_logging.set_verbosity_error()  # the build log is not the place for loading progress bars
    hf_logging.disable_progress_bar()
    model: Any = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=dtype or torch.float32,
                                                      trust_remote_code=trust_remote_code)
    if peft_dir is not None:
        from peft import PeftModel

        # Merged into the weights: the finetuned model as one plain model (the same forward
        # path, decoder and head, as any source), with no second copy of the base held.
        model = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    model.eval()
    vocab = int(model.config.vocab_size)
    k = min(TOP_K, vocab)
    nll: list[float] = []
    argmax: list[int] = []
    top_ids, top_logp = [], []
    with torch.inference_mode():
        split = _can_split(model, windows[0])
        for window in windows:
            for s, logits in _window_logits(model, window, split):
                targets = window[s + 1 : s + 1 + CHUNK]
                n, arg, ids, lp = _chunk_stats(logits[: len(targets), :vocab], targets, k)
                nll.extend(n.tolist())
                argmax.extend(arg.tolist())
                top_ids.append(ids)
                top_logp.append(lp)
            del logits
        greedy = _greedy(model, prompts, vocab, batched=not trust_remote_code)
    del model
    gc.collect()
    return _Reference(nll=nll, argmax=argmax, topk_ids=torch.cat(top_ids), topk_logp=torch.cat(top_logp),
                      greedy=greedy, vocab=vocab)


# ---------------------------------------------------------------------------- the source's figures, cached

# Bump when what _source_pass computes changes (its windows, its greedy decoding, what it keeps).
REFERENCE_FORMAT = 1
REFERENCE_CACHE_ENV = "OLIVE_BUILDER_EVAL_CACHE"  # a folder, or "off"
REFERENCE_CACHE_BYTES = 256 << 20  # the newest entries up to this size are kept (one: ~2 MB per 1024 tokens)


def reference_cache_dir() -> Path | None:
    """Where the source model's figures are kept between builds (None: not kept)."""
    value = os.environ.get(REFERENCE_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value)
    from builder.contract import cache_dir

    return cache_dir() / "eval-reference"


class _Unknown(Exception):
    """A file's digest is not known without reading it (and reading was not wanted)."""


def _file_digests(folder: Path, memo_dir: Path | None, *, read: bool = True) -> dict[str, str]:
    """name -> content digest of every file of a model folder.

    A Hugging Face cache snapshot links each file to a blob named by its own hash: that name is
    the digest, nothing is read. Other files are hashed once; the digest is remembered by
    path, size, mtime and inode (``file-digests.json`` in the cache folder), so a second build
    from the same folder reads nothing either. ``read=False`` raises _Unknown instead of
    hashing a file."""
    from builder.contract import atomic_write, sha256_file

    memo_path = memo_dir / "file-digests.json" if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_path is not None:
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
    out, changed = {}, False
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts):
        name = path.relative_to(folder).as_posix()
        target = path.resolve()
        if path.is_symlink() and target.parent.name == "blobs":
            out[name] = "blob:" + target.name
            continue
        st = target.stat()
        stamp = f"{target}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if stamp not in memo:
            if not read:
                raise _Unknown(name)
            memo[stamp] = sha256_file(target)
            changed = True
        out[name] = memo[stamp]
    if changed and memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(memo_path, json.dumps(dict(list(memo.items())[-4096:])))
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return out


def _reference_key(source_dir: Path, peft_dir: Path | None, windows: list[list[int]], prompts: list[list[int]],
                   dtype: Any, batched: bool, cache: Path | None, *, read: bool = True) -> str:
    """What the source's figures depend on: the source's files (and the PEFT adapter's), the
    tokens scored and prompted (so the text, its tokenizer, max_tokens and the windowing), how
    they are computed, and the versions of the code that computes them. ``read=False``: raises
    _Unknown when a file would have to be hashed."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    material = {
        "format": REFERENCE_FORMAT,
        "source": _file_digests(source_dir, cache, read=read),
        "peft": _file_digests(peft_dir, cache, read=read) if peft_dir is not None else None,
        "windows": hashlib.sha256(json.dumps(windows).encode()).hexdigest(),
        "prompts": prompts,
        "greedy_tokens": GREEDY_TOKENS, "top_k": TOP_K, "chunk": CHUNK, "batched": batched,
        "dtype": str(dtype),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _load_reference(cache: Path, key: str) -> _Reference | None:
    import torch

    path = cache / f"{key}.pt"
    try:
        data = torch.load(path, weights_only=True)  # tensors, lists and numbers only: no code runs
        ref = _Reference(nll=data["nll"].tolist(), argmax=data["argmax"].tolist(),
                         topk_ids=data["topk_ids"].long(), topk_logp=data["topk_logp"],
                         greedy=data["greedy"].tolist(), vocab=int(data["vocab"]))
        os.utime(path)  # kept longest when used
        return ref
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged or foreign entry is recomputed, never trusted
        return None


def _save_reference(cache: Path, key: str, ref: _Reference) -> None:
    import io

    import torch

    from builder.contract import atomic_write

    buffer = io.BytesIO()
    torch.save({"nll": torch.tensor(ref.nll, dtype=torch.float64), "argmax": torch.tensor(ref.argmax),
                "topk_ids": ref.topk_ids.to(torch.int32), "topk_logp": ref.topk_logp.float(),
                "greedy": torch.tensor(ref.greedy), "vocab": ref.vocab}, buffer)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(cache / f"{key}.pt", buffer.getvalue())
        kept = 0
        for entry in sorted(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
            kept += entry.stat().st_size
            if kept > REFERENCE_CACHE_BYTES:
                entry.unlink(missing_ok=True)
    except OSError:
        pass  # not kept: the next build computes it again


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


def _built_pass(model: Any, windows: list[list[int]], prompts: list[list[int]], ref: _Reference | None,
                adapter: AdapterUnderTest | None = None) -> _Built:
    import torch

    adapters = _og_adapters(model, adapter)
    name = adapter.name if adapter is not None else None
    built = _Built()
    pos = 0
    for window in windows:
        generator = _generator(model, len(window), adapters, name)
        for s in range(0, len(window) - 1, CHUNK):
            piece = window[s : s + CHUNK]
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
        model = og.Model(str(model_dir))
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
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu": cpu_info(),
        "intra_op_threads": options.get("intra_op_num_threads") or "onnxruntime default (one per physical core)",
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
    cmd = [sys.executable, "-m", "builder.build.evaluate", "--speed-json", str(model_dir),
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


# ---------------------------------------------------------------------------- the stage


@dataclass
class Evaluation:
    """The figures, the gates and the verdict: what goes into olive-builder.json."""

    evaluated: bool
    precision: str | None = None
    text: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part: source, built, speed
    reason: str | None = None  # why not evaluated
    adapter: dict[str, Any] | None = None  # the adapter evaluated (AdapterUnderTest.to_json()); None: the base model
    source_cached: bool = False  # the source's figures came from the cache (an earlier build of the same source)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def not_evaluated(reason: str) -> dict[str, Any]:
    return Evaluation(evaluated=False, reason=reason).to_json()


def evaluate(
    model_dir: str | Path,
    source_dir: str | Path | None,
    *,
    precision: str | None,
    device: str = "cpu",
    settings: Settings | None = None,
    text_path: str | Path | None = None,
    trust_remote_code: bool = False,
    on_progress: Any = None,
    adapter: AdapterUnderTest | None = None,
) -> Evaluation:
    """Measure the built model in ``model_dir`` against ``source_dir`` and apply the gates.

    Returns the Evaluation whatever the verdict; ``raise_for_gates`` turns a failure into an
    EvaluationError. ``source_dir`` None measures the built model alone (no ratios, no gates
    on them). ``adapter``: measure the finetuned model instead of the base (the source is
    ``source_dir`` with the PEFT adapter merged; the built model runs with the adapter active,
    or as it is in merged mode); the record names it."""
    settings = settings or Settings()
    say = on_progress or (lambda message: None)
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    model_dir = Path(model_dir)
    if adapter is not None:
        adapter.validate()
    text = load_text(text_path, None) if text_path is not None else load_text(settings.text, settings.text_source)
    config = _genai_config(model_dir)
    context = int(config.get("model", {}).get("context_length") or 2048)
    cuda_reason = cuda_unavailable_reason() if device == "cuda" or _uses_cuda(model_dir) else None
    result = Evaluation(evaluated=True, precision=precision, adapter=adapter.to_json() if adapter else None)
    what = f" with the adapter {adapter.name!r}" if adapter is not None else ""
    ref: _Reference | None = None
    prompts: list[list[int]] = []
    if source_dir is not None:
        # Build machines are often busy (CI runners, parallel builds): spinning OpenMP threads then
        # make torch several times slower (measured 2-10x on 2 busy cores); passive waiting costs
        # nothing on an idle machine. Takes effect only if torch is not loaded yet (the worker's case).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging

        hf_logging: Any = logging
        hf_logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum": we window it

        tok = AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
        src_config = AutoConfig.from_pretrained(str(source_dir), trust_remote_code=trust_remote_code)
        context = min(context, int(getattr(src_config, "max_position_embeddings", context) or context))
        ids = tok(text.text, add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id if tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id] else None
        windows = _windows(ids, settings.max_tokens, min(context, settings.max_tokens), bos)
        for content in CHAT_PROMPTS:
            messages = [{"role": "user", "content": content}]
            if getattr(tok, "chat_template", None):
                prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                prompt = content
            prompts.append(tok(prompt, add_special_tokens=True)["input_ids"])
        dtype, dtype_note = _source_dtype(Path(source_dir))
        peft_dir = Path(adapter.peft_dir) if adapter is not None and adapter.peft_dir else None
        cache = reference_cache_dir()
        key_args = (Path(source_dir), peft_dir, windows, prompts, dtype, not trust_remote_code, cache)
        key: str | None = None
        ref = None
        if cache is not None:
            try:
                key = _reference_key(*key_args, read=False)
                ref = _load_reference(cache, key)
            except _Unknown:
                # Files never hashed here: no earlier evaluation can have seen them (short of a
                # copy elsewhere), so nothing is looked up, and the hashing for storing the
                # figures runs beside the source pass instead of before it.
                pass
        if ref is not None:
            # A second precision or target of the same source (a matrix build): the source's
            # figures on these tokens are already known.
            say(f"source model{what}: its figures on these tokens are cached ({cache})")
            result.source_cached = True
        else:
            say(f"source model (transformers, fp32){what}: {len(windows)} window(s) of up to {len(windows[0])} tokens")
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                keying = pool.submit(_reference_key, *key_args) if cache is not None and key is None else None
                ref = _source_pass(Path(source_dir), windows, prompts, trust_remote_code, peft_dir=peft_dir,
                                   dtype=dtype)
                try:
                    key = keying.result() if keying is not None else key
                except OSError:
                    key = None  # unreadable now: the figures are not kept
            if cache is not None and key is not None:
                _save_reference(cache, key, ref)
        ref.dtype_note = dtype_note
        result.timings["source_s"] = round(time.monotonic() - started, 2)
        result.timings["source_cpu_s"] = round(_cpu_seconds() - cpu_started, 2)
    else:
        import onnxruntime_genai as og

        model = _og_model(model_dir, force_cpu=cuda_reason is not None)  # its tokenizer, then the pass below
        ids = list(og.Tokenizer(model).encode(text.text))
        windows = _windows(ids, settings.max_tokens, min(context, settings.max_tokens), None)
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
    if settings.speed:
        say("speed: load, 512-token prompt, 128-token decode, 3 runs")
        before = time.monotonic()
        result.speed = measure_speed(model_dir, device=device, adapter=adapter)
        result.timings["speed_s"] = round(time.monotonic() - before, 2)
        result.timings["speed_cpu_s"] = round(_cpu_seconds() - cpu_started - built_cpu, 2)
    else:
        result.speed = {"measured": False, "reason": "speed not measured: `evaluate.speed: false` in the recipe"}
    result.gates = applicable_gates(acc, precision, settings.gates, ref.vocab) if ref is not None else {}
    result.failures = check_gates(acc, result.gates)
    result.seconds = round(time.monotonic() - started, 3)
    # CPU seconds of this process and the speed child: what the stage costs on a machine that
    # is busy with other work, where wall time says more about the neighbours.
    result.timings["cpu_s"] = round(_cpu_seconds() - cpu_started, 2)
    return result


def applicable_gates(acc: dict[str, Any], precision: str | None, overrides: dict[str, float] | None,
                     vocab: int) -> dict[str, float]:
    """The gates for ``precision`` (with the recipe's overrides) that mean something for these figures.

    A source that predicts the text barely better than uniformly (random weights, or a text in
    a script it never saw) has no meaningful top-1 token: its argmax is noise, so agreement
    gates would fail any conversion. Those are dropped (and ``acc`` says so); the perplexity
    and KL gates still apply."""
    gates = gates_for(precision, overrides)
    if vocab and acc.get("source_perplexity", 0) > UNINFORMED * vocab:
        skipped = [g for g in ("min_top1_agreement", "min_greedy_prefix") if g in gates]
        for gate in skipped:
            del gates[gate]
        acc["gates_skipped"] = (f"{', '.join(skipped)}: the source's perplexity {acc['source_perplexity']:g} is "
                                f"over {UNINFORMED:g} x its vocabulary ({vocab}); its top-1 choices are noise")
    return gates


def check_gates(acc: dict[str, Any], gates: dict[str, float]) -> list[str]:
    failures = []
    checks = (
        ("max_perplexity_ratio", "perplexity_ratio", "perplexity ratio (built / source)", False),
        ("min_top1_agreement", "top1_agreement", "top-1 next-token agreement", True),
        ("max_mean_kl", "mean_kl", "mean KL divergence", False),
        ("min_greedy_prefix", "greedy_prefix_mean", "mean greedy common prefix (tokens)", True),
    )
    for gate, metric, label, at_least in checks:
        if gate not in gates or metric not in acc:
            continue
        value, limit = float(acc[metric]), float(gates[gate])
        bad = value < limit if at_least else (value > limit or math.isnan(value))
        if bad:
            failures.append(f"{label} {value:g} is {'below' if at_least else 'above'} the limit {limit:g} ({gate})")
    return failures


def raise_for_gates(result: Evaluation | dict[str, Any]) -> None:
    data = result.to_json() if isinstance(result, Evaluation) else result
    if not data.get("failures"):
        return
    precision = data.get("precision") or "this precision"
    figures = format_table(data)
    raise EvaluationError(
        f"The built model failed its evaluation gates ({precision}):\n"
        + "\n".join(f"  - {f}" for f in data["failures"])
        + f"\n\n{figures}",
        hint=WHAT_TO_TRY.get(str(data.get("precision")), "Try a higher precision.")
        + " To change the limits, set `evaluate.gates` in the recipe; `evaluate: false` skips the stage.",
        figures=data,
    )


# ---------------------------------------------------------------------------- presenting


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _adapter_label(adapter: dict[str, Any]) -> str:
    if adapter.get("mode") == "merged":
        return f"{adapter.get('name')} (merged into the weights)"
    return f"{adapter.get('name')} ({adapter.get('file')}, {str(adapter.get('sha256', ''))[:19]})"


def format_table(data: dict[str, Any]) -> str:
    """A readable table of an evaluation record (olive-builder.json's `evaluation`)."""
    if not data or not data.get("evaluated"):
        return f"not evaluated{': ' + str(data.get('reason')) if data and data.get('reason') else ''}"
    rows: list[tuple[str, str]] = []
    if data.get("adapter"):
        rows.append(("adapter", _adapter_label(data["adapter"])))
    acc, gates = data.get("accuracy") or {}, data.get("gates") or {}
    limits = {"perplexity_ratio": "max_perplexity_ratio", "top1_agreement": "min_top1_agreement",
              "mean_kl": "max_mean_kl", "greedy_prefix_mean": "min_greedy_prefix"}
    for key, value in acc.items():
        gate = limits.get(key)
        limit = ""
        if gate and gate in gates:
            limit = f"{'<=' if gate.startswith('max') else '>='} {gates[gate]:g}"
        rows.append((key, _fmt(value) + (f"   (limit {limit})" if limit else "")))
    if data.get("source_cached"):
        rows.append(("source_figures", "from the cache (an earlier evaluation of the same source, tokens and tools)"))
    text = data.get("text") or {}
    rows.append(("text", f"{text.get('tokens')} tokens in {text.get('windows')} window(s), {text.get('digest', '')[:19]}"))
    speed = data.get("speed") or {}
    if speed.get("measured"):
        for key in ("load_s", "ttft_s", "prompt_tokens", "prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb",
                    "intra_op_threads"):
            rows.append((key, _fmt(speed.get(key))))
        rows.append(("cpu", _fmt(speed.get("cpu"))))
    else:
        rows.append(("speed", str(speed.get("reason", "not measured"))))
    rows.append(("verdict", "passed" if not data.get("failures") else "FAILED: " + "; ".join(data["failures"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


ANNOTATED_EVAL = ("perplexity", "source_perplexity", "perplexity_ratio", "top1_agreement", "mean_kl",
                  "greedy_prefix_mean")
ANNOTATED_BENCH = ("load_s", "ttft_s", "prompt_tokens", "prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")


def manifest_annotations(data: dict[str, Any] | None, ns: str = "org.olive-builder.") -> dict[str, str]:
    """``<ns>eval.<metric>`` and ``<ns>bench.<metric>`` for the manifests."""
    if not data:
        return {}
    if not data.get("evaluated"):
        return {ns + "eval": "not evaluated", **({ns + "eval.reason": str(data["reason"])} if data.get("reason") else {})}
    out = {ns + "eval": "passed" if not data.get("failures") else "failed"}
    if data.get("adapter"):
        out[ns + "eval.adapter"] = _adapter_label(data["adapter"])
    acc = data.get("accuracy") or {}
    out.update({f"{ns}eval.{k.replace('_', '-')}": _fmt(acc[k]) for k in ANNOTATED_EVAL if k in acc})
    text = data.get("text") or {}
    if text.get("digest"):
        out[ns + "eval.text-digest"] = str(text["digest"])
        out[ns + "eval.text-tokens"] = str(text.get("tokens"))
    if data.get("gates"):
        out[ns + "eval.gates"] = json.dumps(data["gates"], sort_keys=True, separators=(",", ":"))
    speed = data.get("speed") or {}
    if speed.get("measured"):
        out.update({f"{ns}bench.{k.replace('_', '-')}": _fmt(speed[k]) for k in ANNOTATED_BENCH if k in speed})
        cpu = speed.get("cpu") or {}
        out[ns + "bench.cpu"] = f"{cpu.get('model')}, {cpu.get('usable_cores')} cores"
        out[ns + "bench.threads"] = str(speed.get("intra_op_threads"))
    elif speed:
        out[ns + "bench"] = str(speed.get("reason", "not measured"))
    return out


def table_from_annotations(ann: dict[str, str], ns: str = "org.olive-builder.") -> str:
    """The evaluation part of a manifest's annotations as a table (for `build inspect`)."""
    rows = [(k[len(ns):], v) for k, v in sorted(ann.items()) if k.startswith((ns + "eval", ns + "bench"))]
    if not rows:
        return "  not evaluated (built before the evaluation stage existed)"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def resolve_source(model_dir: Path, against: str | None) -> tuple[Path | None, str]:
    """The source model to compare with: ``against`` (a folder or a Hub repo id), else the one the
    build record names (a Hub model, from the local Hugging Face cache or the Hub). (None, why)
    when there is none."""
    import re

    from builder.errors import ModelNotFoundError, UsageError

    hub, revision = None, None
    if against:
        folder = Path(against).expanduser()
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise UsageError(f"--against {against}: the folder has no config.json, so it is not a "
                                 "Hugging Face model folder.")
            return folder, str(folder)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$", against):
            raise UsageError(f"--against {against}: neither a model folder nor a Hugging Face repo id "
                             "(OWNER/NAME[@REVISION]).")
        hub, _, rev = against.partition("@")
        revision = rev or None
    else:
        try:
            info = json.loads((model_dir / "olive-builder.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, "no build record (olive-builder.json) names the source; pass --against"
        source = info.get("source") or {}
        if not source.get("hub"):
            return None, "the build record names a local source folder; pass --against FOLDER"
        hub, revision = str(source["hub"]), source.get("resolved_revision") or source.get("revision")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hub, revision=revision, ignore_patterns=["original/*", "*.gguf", "onnx/*",
                                                                          "*.msgpack", "*.h5", "*.ot", "*.pth"])
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "no source here"
        raise ModelNotFoundError(f"The source model {hub}@{revision or 'main'} is not available: {e}",
                                 hint="Pass --against with a local copy of the source model.") from None
    return Path(path), f"{hub}@{revision or 'main'}"


RECORD_PREFIX = "::olive-builder-evaluation:: "


def evaluate_in_image(engine: Any, image: str, model_dir: Path, source_dir: Path | None, *,
                      precision: str | None, device: str, settings: Settings, text_path: Path | None,
                      on_line: Any, adapter: AdapterUnderTest | None = None) -> Evaluation:
    """The same evaluation inside a builder image (for hosts without torch, transformers and
    onnxruntime-genai): the folders are mounted read-only and the record comes back on one line."""
    from builder.build.engine import CONTAINER_PACKAGE_ROOT, Job, Mount

    package = PACKAGE_DIR
    mounts = [Mount(model_dir.resolve(), "/eval/model", read_only=True),
              Mount(package, CONTAINER_PACKAGE_ROOT + "/builder", read_only=True)]
    args = ["/eval/model", "--record-line", "--device", device, "--max-tokens", str(settings.max_tokens)]
    if source_dir is not None:
        mounts.append(Mount(source_dir.resolve(), "/eval/source", read_only=True))
        args += ["--against", "/eval/source"]
    if text_path is not None:
        mounts.append(Mount(text_path.resolve(), "/eval/text.txt", read_only=True))
        args += ["--text", "/eval/text.txt"]
    if precision:
        args += ["--precision", precision]
    if adapter is not None:
        args += ["--adapter", adapter.name]
        if adapter.onnx_adapter is None:
            args.append("--merged")
        else:
            # Under its own file name: the record names the file.
            inside = f"/eval/adapter/{adapter.onnx_adapter.name}"
            mounts.append(Mount(adapter.onnx_adapter.resolve(), inside, read_only=True))
            args += ["--adapter-file", inside]
        if adapter.peft_dir is not None and source_dir is not None:
            mounts.append(Mount(Path(adapter.peft_dir).resolve(), "/eval/peft", read_only=True))
            args += ["--peft", "/eval/peft"]
    if not settings.speed:
        args.append("--no-speed")
    found: list[str] = []

    def sink(line: str) -> None:
        if line.startswith(RECORD_PREFIX):
            found.append(line[len(RECORD_PREFIX):])
        else:
            on_line(line)

    env = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    # The CPU builder image: a cuda model is measured for accuracy on the CPU provider there,
    # and its record says why speed was not measured.
    code = engine.run(Job(image=image, module="builder.build.evaluate", args=tuple(args), env=env, mounts=tuple(mounts),
                          gpus=False), sink)
    if not found:
        raise EvaluationError(f"The evaluation in the builder image {image} stopped (exit code {code}) without "
                              "a result; its output is above.")
    data = json.loads(found[-1])
    known = {f for f in Evaluation.__dataclass_fields__}
    return Evaluation(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder.build.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--against", help="the source Hugging Face model folder")
    parser.add_argument("--precision", help="gates of this precision (default: olive-builder.json's)")
    parser.add_argument("--device", help="cpu or cuda (default: olive-builder.json's, else cpu)")
    parser.add_argument("--text", help="a local UTF-8 text file instead of the committed text")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--adapter", metavar="NAME", help="evaluate the finetuned model of this adapter")
    parser.add_argument("--adapter-file", metavar="FILE",
                        help="its .onnx_adapter (default: MODEL_DIR/adapters/NAME.onnx_adapter)")
    parser.add_argument("--peft", metavar="DIR", help="its PEFT adapter folder (the source side, with --against)")
    parser.add_argument("--merged", action="store_true", help="the adapter is merged into the built model's weights")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument("--record-line", action="store_true", help=argparse.SUPPRESS)  # for evaluate_in_image
    parser.add_argument("--speed-json", action="store_true", help=argparse.SUPPRESS)  # the speed child process
    parser.add_argument("--prompt-tokens", type=int, default=SPEED_PROMPT, help=argparse.SUPPRESS)
    parser.add_argument("--decode-tokens", type=int, default=SPEED_DECODE, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=SPEED_RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    adapter = None
    if args.adapter:
        onnx_adapter = None if args.merged else Path(args.adapter_file or model_dir / "adapters" /
                                                     f"{args.adapter}.onnx_adapter")
        adapter = AdapterUnderTest(args.adapter, Path(args.peft) if args.peft else None, onnx_adapter)
    if args.speed_json:
        print(json.dumps(_speed_here(model_dir, args.prompt_tokens, args.decode_tokens, args.runs, adapter)))
        return 0
    info: dict[str, Any] = {}
    try:
        info = json.loads((model_dir / "olive-builder.json").read_text())
    except (OSError, ValueError):
        pass
    target = info.get("target") or {}
    try:
        result = evaluate(
            model_dir,
            args.against,
            precision=args.precision or target.get("precision"),
            device=args.device or target.get("device") or "cpu",
            settings=Settings(max_tokens=args.max_tokens, speed=not args.no_speed),
            text_path=args.text,
            on_progress=lambda m: print(f"==> evaluate: {m}", file=sys.stderr),
            adapter=adapter,
        )
    except BuilderError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    data = result.to_json()
    if args.record_line:
        print(RECORD_PREFIX + json.dumps(data), flush=True)
        return 0
    print(json.dumps(data, indent=2) if args.json else format_table(data))
    if result.failures:
        print("\n" + "\n".join(f"gate failed: {f}" for f in result.failures), file=sys.stderr)
        return EvaluationError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
