"""The source model's figures: what the Hugging Face model (transformers, fp32) says at each
scored position of the evaluation text, and after each chat prompt, kept between builds.

Only what the comparison with the built model needs is kept (per position: the target's
negative log-probability, the argmax, the top-k log-probabilities; per prompt: the greedy
tokens); the model is freed before the built model is loaded (``builder.build.measure``), so
the two are never held side by side.

The figures depend only on the source, the tokens and the tools, so a second precision or
target of the same source (a matrix build) reads them from a cache instead of running the
source model again (``reference_cache_dir``; ``OLIVE_BUILDER_EVAL_CACHE=off`` turns it off).

Runs inside the builder image: the standard library at import time; torch, transformers and
peft are imported when needed.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.contract import atomic_write, cache_dir, sha256_file

TOKEN_CHUNK = 128  # tokens scored at a time: a chunk's logits are TOKEN_CHUNK x vocab floats (78 MB at 152k vocab)
TOP_K = 256  # source log-probabilities kept per position for the KL divergence
GREEDY_TOKENS = 32  # tokens generated after each chat prompt, on both sides


@dataclass
class Reference:
    """What the source model said at each scored position (everything the comparison needs)."""

    nll: list[float]
    argmax: list[int]
    topk_ids: Any  # tensor [positions, k], int64: the source's k most likely tokens per position
    topk_logp: Any  # tensor [positions, k], float32: their log-probabilities
    greedy: list[list[int]]
    vocab: int
    dtype_note: str | None = None


# ---------------------------------------------------------------------------- the source model


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
    """(start, logits [n, vocab]) for each TOKEN_CHUNK of positions of ``window``.

    ``split``: one pass of the decoder over the whole window, then the LM head a chunk at a
    time, so the full window's logits (window x vocab floats: 1.2 GB at 2048 x 152k) never exist
    at once. Otherwise chunk by chunk with the KV cache (slower: the attention is recomputed
    per chunk)."""
    import torch

    if split:
        hidden = model.get_decoder()(input_ids=torch.tensor([window])).last_hidden_state[0]
        head = model.get_output_embeddings()
        for s in range(0, len(window) - 1, TOKEN_CHUNK):
            yield s, head(hidden[s : s + TOKEN_CHUNK])
        return
    cache = None
    for s in range(0, len(window) - 1, TOKEN_CHUNK):
        logits, cache = _step(model, window[s : s + TOKEN_CHUNK], cache)
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


def _checkpoint_dtype(source_dir: Path) -> tuple[str, int]:
    try:
        config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return name, {"float32": 4, "float16": 2, "bfloat16": 2}.get(name, 4)


def fp32_weight_bytes(source_dir: Path) -> int:
    """What the checkpoint's weights take in fp32 (from its files' sizes and its dtype)."""
    stored = sum(p.stat().st_size for p in source_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in source_dir.glob("*.bin"))
    return stored * 4 // _checkpoint_dtype(source_dir)[1]


def source_dtype(source_dir: Path) -> tuple[Any, str | None]:
    """fp32, unless the fp32 weights would not fit in the memory available now: then the
    checkpoint's own dtype (the conversion loaded it that way too), and why."""
    import torch

    name, width = _checkpoint_dtype(source_dir)
    fp32_bytes = fp32_weight_bytes(source_dir)
    available = available_memory()
    if width < 4 and available is not None and fp32_bytes > 0.7 * available:
        why = (f"source run in {name}: its fp32 weights ({fp32_bytes >> 20} MiB) would not fit in the "
               f"{available >> 20} MiB available")
        return getattr(torch, name), why
    return torch.float32, None


def available_memory() -> int | None:
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


def source_pass(source_dir: Path, windows: list[list[int]], prompts: list[list[int]], trust_remote_code: bool,
                 peft_dir: Path | None = None, dtype: Any = None) -> Reference:
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
                targets = window[s + 1 : s + 1 + TOKEN_CHUNK]
                n, arg, ids, lp = _chunk_stats(logits[: len(targets), :vocab], targets, k)
                nll.extend(n.tolist())
                argmax.extend(arg.tolist())
                top_ids.append(ids)
                top_logp.append(lp)
            del logits
        greedy = _greedy(model, prompts, vocab, batched=not trust_remote_code)
    del model
    gc.collect()
    return Reference(nll=nll, argmax=argmax, topk_ids=torch.cat(top_ids), topk_logp=torch.cat(top_logp),
                     greedy=greedy, vocab=vocab)


# ---------------------------------------------------------------------------- the source's figures, cached

# Bump when what source_pass computes changes (its windows, its greedy decoding, what it keeps).
REFERENCE_FORMAT = 1
REFERENCE_CACHE_ENV = "OLIVE_BUILDER_EVAL_CACHE"  # a folder, or "off"
REFERENCE_CACHE_BYTES = 256 << 20  # the newest entries up to this size are kept (one: ~2 MB per 1024 tokens)


def reference_cache_dir() -> Path | None:
    """Where the source model's figures are kept between builds (None: not kept)."""
    value = os.environ.get(REFERENCE_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value)
    return cache_dir() / "eval-reference"


class DigestUnknown(Exception):
    """A file's digest is not known without reading it (and reading was not wanted)."""


def _file_digests(folder: Path, memo_dir: Path | None, *, read: bool = True) -> dict[str, str]:
    """name -> content digest of every file of a model folder.

    A Hugging Face cache snapshot links each file to a blob named by its own hash: that name is
    the digest, nothing is read. Other files are hashed once; the digest is remembered by
    path, size, mtime and inode (``file-digests.json`` in the cache folder), so a second build
    from the same folder reads nothing either. ``read=False`` raises DigestUnknown instead of
    hashing a file."""
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
                raise DigestUnknown(name)
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


def reference_key(source_dir: Path, peft_dir: Path | None, windows: list[list[int]], prompts: list[list[int]],
                   dtype: Any, batched: bool, cache: Path | None, *, read: bool = True) -> str:
    """What the source's figures depend on: the source's files (and the PEFT adapter's), the
    tokens scored and prompted (so the text, its tokenizer, max_tokens and the windowing), how
    they are computed, and the versions of the code that computes them. ``read=False``: raises
    DigestUnknown when a file would have to be hashed."""
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
        "greedy_tokens": GREEDY_TOKENS, "top_k": TOP_K, "chunk": TOKEN_CHUNK, "batched": batched,
        "dtype": str(dtype),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def load_reference(cache: Path, key: str) -> Reference | None:
    import torch

    path = cache / f"{key}.pt"
    try:
        data = torch.load(path, weights_only=True)  # tensors, lists and numbers only: no code runs
        ref = Reference(nll=data["nll"].tolist(), argmax=data["argmax"].tolist(),
                        topk_ids=data["topk_ids"].long(), topk_logp=data["topk_logp"],
                        greedy=data["greedy"].tolist(), vocab=int(data["vocab"]))
        os.utime(path)  # kept longest when used
        return ref
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged or foreign entry is recomputed, never trusted
        return None


def save_reference(cache: Path, key: str, ref: Reference) -> None:
    import io

    import torch

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

