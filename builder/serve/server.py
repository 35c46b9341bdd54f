"""An OpenAI-compatible HTTP server over one ONNX Runtime GenAI model folder.

    python -m builder.serve --model DIR [--host 0.0.0.0] [--port 8000] [--batch-size 4] [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health
(200 only once the model is loaded), GET /metrics (Prometheus).

It runs in the runtime images, so it imports only the standard library, Starlette,
uvicorn, prometheus_client, numpy and onnxruntime_genai: never the build-side stack.

Generation has two paths:

- The engine path (onnxruntime-genai >= 0.18, ``og.Engine``): continuous batching. One
  dedicated thread creates and owns the engine (an engine must be driven from the thread that
  made it); requests reach it through a queue, and the events of each ``engine.run`` step
  (which releases the GIL while it computes) go back to the event loop in one hand-off.
- The generator path (``og.Generator`` in a thread of a small pool): what the engine cannot
  serve. With static batching (the CPU engine) that is a sampled request with a seed (a per-turn
  seed needs dynamic batching), ``logprobs`` (the engine exposes no logits) and a request with a
  LoRA adapter (the engine has no adapter API in 0.18: only ``Generator.set_active_adapter``);
  with an older onnxruntime-genai, everything.

Adapters: a finetuned build's folder carries ``adapters/<name>.onnx_adapter`` beside its base
model. All of them are loaded at start (``og.Adapters``; one that cannot be loaded, or cannot
generate, stops the server); ``model: "<base>:<name>"`` picks one, ``model: "<base>"`` gets the
base model (its LoRA inputs are optional: with no adapter active it is the base).

At most ``max_concurrency`` requests generate at once; at most ``queue_size`` more wait; beyond
that a request gets 429 with Retry-After (the bound is counted when the request is admitted,
so it holds exactly). A client that disconnects cancels its generation at the next token.
SIGTERM stops accepting connections and lets in-flight requests finish for up to
``drain_seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import queue
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from builder.contract import ADAPTER_NAME_MAX, ADAPTER_NAME_RULE, ADAPTERS_DIR, INFO_FILE, adapters_in

log = logging.getLogger("olive-builder.server")

MAX_BODY_BYTES = 1 << 20
MAX_STOP_SEQUENCES = 4
MAX_JSON_DEPTH = 32  # request bodies are shallow; deeper ones are refused before any recursion can fail
AHEAD = 64  # text pieces a generator-path generation may run ahead of its HTTP writer
MAX_TOP_LOGPROBS = 20
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_BATCH_SIZE = 4  # on 2 CPU cores batch 4 and 8 both reach ~1.85x one request (environment.md)
GATHER_GAP = 0.003  # seconds the idle engine waits for another request of a burst
GATHER_MAX = 0.015  # ... and at most this long after the first
PREFILL_TOKENS_PER_STEP = 6  # measured on 2 cores: ~1.3 ms a prefilled token, ~8.5 ms a decode step
HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
BODY_TIMEOUT = 30.0  # seconds a request may take to send its body
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
API_KEY_ENV = "OLIVE_BUILDER_API_KEY"

# Compact JSON: no free whitespace. Small models otherwise emit whitespace until the token limit.
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    min_tokens: int = 0  # vLLM's extension
    repetition_penalty: float | None = None  # vLLM's extension
    guidance: tuple[str, str] | None = None  # (kind, spec) for onnxruntime-genai's set_guidance
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Piece:
    """The text one generated token adds (possibly empty: a partial UTF-8 character), and its log-probabilities."""

    text: str
    token: int = -1
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int
    cached_tokens: int = 0


def _engine_available(og: Any) -> bool:
    return hasattr(og, "Engine") and hasattr(og, "TurnOptions")


class AdapterLoadError(Exception):
    """An adapter of the model folder cannot be served: the server must not start."""


def _ort_message(e: BaseException, limit: int = 300) -> str:
    """An onnxruntime error on one line, without the C++ source location and signature it starts with."""
    text = " ".join(str(e).split()) or type(e).__name__
    # "/onnxruntime_src/onnxruntime/lora/x.cc:93 const Foo* Bar(...) The buffer ..." -> "The buffer ..."
    text = re.sub(r"^\S+\.(?:cc|cpp|h):\d+ .*?\) (?=[A-Z])", "", text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if text.endswith((".", "!", "?")) else text + "."


# ---------------------------------------------------------------------------- the model


class ModelRunner:
    """One loaded model, its tokenizer, and the blocking generator-path loop."""

    def __init__(self, folder: str | Path, *, batch_size: int | None = None, use_engine: bool = True):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(folder)
        config = json.loads((self.folder / "genai_config.json").read_text())
        model = config.get("model", {})
        search = config.get("search", {})
        # The KV cache is sized by search.max_length: that, not the model's native context, is the limit.
        self.context_length = int(search.get("max_length") or model.get("context_length") or 2048)
        self.vocab_size = int(model.get("vocab_size") or 0)
        self.default_do_sample = bool(search.get("do_sample", False))
        eos = model.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.use_engine = use_engine and _engine_available(og)
        configured = (config.get("engine") or {}).get("static_batching", {}).get("max_batch_size")
        self.batch_size = batch_size or (int(configured) if configured else DEFAULT_BATCH_SIZE)
        if self.use_engine:
            # The batch size is the engine's, read from genai_config.json: overlay it in memory so
            # the (possibly read-only) model folder stays as it is.
            og_config = og.Config(str(self.folder))
            og_config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": self.batch_size}}}))
            self.model = og.Model(og_config)
        else:
            self.model = og.Model(str(self.folder))
        self.tokenizer = og.Tokenizer(self.model)
        self.version = getattr(og, "__version__", "")
        self.adapters: Any = None
        self.adapter_names: tuple[str, ...] = ()
        # onnxruntime-genai counts an adapter's users in a plain integer (Adapter::AcquireRef when
        # a generator activates it, ReleaseRef when the generator goes): activation and release
        # happen under this lock, so concurrent requests of one adapter cannot lose a count.
        self._adapter_lock = threading.Lock()
        self._load_adapters(adapters_in(self.folder))

    def _load_adapters(self, found: dict[str, Path]) -> None:
        """Load every adapter now: a bad one must stop the start, not fail the first request."""
        if not found:
            return
        og = self.og
        where = self.folder / ADAPTERS_DIR
        for name in found:
            if len(name) > ADAPTER_NAME_MAX or not re.fullmatch(ADAPTER_NAME_RULE, name):
                raise AdapterLoadError(
                    f"the adapter file {found[name].name} in {where} has an invalid name: an adapter name is "
                    f"lowercase letters and digits in words joined by '-', at most {ADAPTER_NAME_MAX} characters; "
                    "rename the file or remove it")
        if not hasattr(og, "Adapters"):
            raise AdapterLoadError(f"{where} holds adapters but onnxruntime-genai {self.version} has no adapter "
                                   "support (og.Adapters); use onnxruntime-genai >= 0.5")
        adapters = og.Adapters(self.model)
        for name, path in found.items():
            try:
                adapters.load(str(path), name)
            except Exception as e:  # noqa: BLE001 - reported as what it is: this adapter is bad
                raise AdapterLoadError(f"the adapter `{name}` ({path}) cannot be loaded: {_ort_message(e)} Rebuild "
                                       f"it, or remove it from {where} to serve the model without it") from None
        self.adapters = adapters
        self.adapter_names = tuple(found)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if tools:
            return str(self.tokenizer.apply_chat_template(json.dumps(messages), tools=json.dumps(tools),
                                                          add_generation_prompt=True))
        return str(self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def sampled(self, sampling: Sampling) -> bool:
        if sampling.temperature is not None:
            return sampling.temperature > 0
        return self.default_do_sample

    def engine_can_serve(self, sampling: Sampling) -> bool:
        """The CPU engine (static batching) has no per-turn seed and no logits."""
        if not self.use_engine or sampling.logprobs:
            return False
        return not (sampling.seed is not None and self.sampled(sampling))

    def generate(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                 emit: Callable[[Piece], None], adapter: str | None = None) -> Finished:
        """Blocking: generate up to ``max_tokens`` after ``ids``, calling ``emit`` with each piece.

        With ``adapter``, that loaded adapter is active in this generation's own generator (one
        adapter per generator: concurrent requests of other adapters, or of the base, are unaffected).
        """
        if adapter is None:
            return self._generate(ids, sampling, max_tokens, cancel, emit, None)
        if adapter not in self.adapter_names:
            raise ValueError(f"no adapter named {adapter!r} is loaded")
        return self._generate(ids, sampling, max_tokens, cancel, emit, adapter)

    def _generate(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                  emit: Callable[[Piece], None], adapter: str | None) -> Finished:
        og = self.og
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(ids) + max_tokens}
        if sampling.temperature is not None:
            if sampling.temperature == 0:
                options["do_sample"] = False
            else:
                options.update(do_sample=True, temperature=sampling.temperature)
        if sampling.top_p is not None:
            options["top_p"] = sampling.top_p
        if sampling.top_k is not None:
            options["top_k"] = sampling.top_k
        if sampling.seed is not None:
            options["random_seed"] = _seed32(sampling.seed)
        if sampling.repetition_penalty is not None:
            options["repetition_penalty"] = sampling.repetition_penalty
        minimum = max_tokens if sampling.ignore_eos else sampling.min_tokens
        if minimum:
            options["min_length"] = len(ids) + minimum  # genai masks EOS until min_length
        params.set_search_options(**options)
        if sampling.guidance is not None:
            params.set_guidance(*sampling.guidance)
        generator = og.Generator(self.model, params)
        try:
            if adapter is not None:
                with self._adapter_lock:
                    generator.set_active_adapter(self.adapters, adapter)
            generator.append_tokens(ids)
            stream = self.tokenizer.create_stream()
            produced = 0
            want_logits = sampling.logprobs
            while produced < max_tokens and not generator.is_done():
                if cancel.is_set():
                    return Finished("cancelled", produced)
                # The logits that choose the next token: get_logits after generate_next_token would
                # already be those of the token after it.
                logits = generator.get_logits() if want_logits else None
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in self.eos_ids and not sampling.ignore_eos:
                    return Finished("stop", produced)
                produced += 1
                piece = Piece(stream.decode(token), token)
                if logits is not None:
                    piece.logprob, piece.top = _logprobs(logits, token, sampling.top_logprobs)
                emit(piece)
            return Finished("length", produced)
        finally:
            if adapter is not None:
                with self._adapter_lock:  # the generator releases its adapter as it goes
                    del generator


def _logprobs(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's raw distribution, and the ``top`` best."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = row - row.max()
    logp = shifted - math.log(float(np.exp(shifted).sum()))
    best: list[tuple[int, float]] = []
    if top:
        order = np.argsort(-logp, kind="stable")[:top]
        best = [(int(i), float(logp[i])) for i in order]
    return float(logp[token]), best


def _seed32(seed: int) -> int:
    """onnxruntime-genai takes a 32-bit seed; OpenAI's is 64-bit: fold it, deterministically."""
    return seed % (INT32_MAX + 1)


# ---------------------------------------------------------------------------- the engine thread


class _Handle:
    """One request as the engine thread sees it: its inputs, its state, and where its events go."""

    def __init__(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                 loop: asyncio.AbstractEventLoop, deliver: Callable[[Any], None]):
        self.ids, self.sampling, self.max_tokens, self.cancel = ids, sampling, max_tokens, cancel
        self.loop, self.deliver = loop, deliver
        self.request: Any = None
        self.turn = 0
        self.stream: Any = None
        self.generated: list[int] = []  # over all of its turns
        self.turn_tokens = 0  # tokens of the current turn
        self.cached = -1  # prompt tokens the engine reused, from the first turn
        self.state = "running"  # running | pausing (cancelled to re-batch) | paused (waiting to restart)
        self.cancel_sent = False

    @property
    def produced(self) -> int:
        return len(self.generated)

    @property
    def rebatchable(self) -> bool:
        # A new turn restarts guidance from the grammar's start, and a repetition penalty would see the
        # generated tokens as prompt: such requests run to their end.
        s = self.sampling
        return s.guidance is None and s.repetition_penalty is None and self.turn_tokens > 0


_WAKE = object()
_STOP = object()


class EngineWorker:
    """The one thread that creates, owns and drives ``og.Engine``.

    onnxruntime-genai 0.18's CPU engine batches statically: a request that arrives while a batch
    runs waits until the whole batch has finished. Requests that arrive together are gathered
    for a few milliseconds into one batch. A request that arrives later gets in at the next step
    when waiting would cost more than this: the running turns are cancelled at a step boundary
    and begun again as new engine requests (prompt and generated tokens as the input, one
    prefill) together with the newcomers. Greedy output is the same token for token as without
    the pause. (A new turn of the same request with only the last token as input would repeat
    that token, since a cancelled turn keeps it; and a static engine rewinds a request only
    when it is the only one resident.)
    """

    def __init__(self, runner: ModelRunner, metrics: Metrics):
        self.runner, self.metrics = runner, metrics
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def submit(self, handle: _Handle) -> None:
        self.inbox.put(handle)

    def wake(self) -> None:
        """Make the thread look at cancellations now (it may be blocked waiting for work)."""
        self.inbox.put(_WAKE)

    def stop(self) -> None:
        self.inbox.put(_STOP)

    def _main(self) -> None:
        og = self.runner.og
        try:
            engine = og.Engine(self.runner.model)
            buffer = engine.create_event_buffer(max(16, 4 * self.runner.batch_size))
            token_flag = og.EngineEventFlags.TOKEN.value
            finished_flag = og.EngineEventFlags.TURN_FINISHED.value
            failed_flag = og.EngineEventFlags.FAILED.value
            cancelled_reason = og.FinishReason.CANCELLED
        except BaseException as e:  # noqa: BLE001 - reported to the loading thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        batch = self.runner.batch_size
        gathering_since: float | None = None
        active: dict[int, _Handle] = {}  # by id(request): every request with a turn running, pausing or paused
        # The engine's static batch size sizes its persistent buffers, but a step may still take
        # more requests (eagerly): hold the rest here, so that batch_size is the real bound.
        pending: collections.deque[_Handle] = collections.deque()
        while True:
            # Block only when nothing is generating (or, while gathering a batch, for a moment);
            # otherwise take what arrived and step.
            items: list[Any] = []
            try:
                if gathering_since is not None:
                    items.append(self.inbox.get(timeout=GATHER_GAP))
                else:
                    items.append(self.inbox.get(block=not active and not pending))
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            out: list[tuple[_Handle, Any]] = []
            for item in items:
                if item is _STOP:
                    for handle in [*active.values(), *pending]:
                        out.append((handle, RuntimeError("the server is shutting down")))
                    self._hand_off(out)
                    return
                if isinstance(item, _Handle):
                    pending.append(item)
            for handle in [h for h in pending if h.cancel.is_set()]:  # clients that left while waiting
                pending.remove(handle)
                self.metrics.cancelled.inc()
                out.append((handle, Finished("cancelled", 0)))
            for handle in list(active.values()):
                if handle.cancel.is_set() and not handle.cancel_sent:
                    handle.cancel_sent = True
                    if handle.state == "paused":
                        self.metrics.cancelled.inc()
                        out.append((handle, Finished("cancelled", handle.produced, max(0, handle.cached))))
                        self._close(handle, active)
                    elif handle.state == "running":
                        handle.request.cancel_turn(handle.turn)
            states = [h.state for h in active.values()]
            # From idle, wait while requests keep arriving (they come a few ms apart through HTTP).
            if not active and pending and len(pending) < batch:
                now = time.monotonic()
                if gathering_since is None:
                    gathering_since = now
                if items and now - gathering_since < GATHER_MAX:
                    self._hand_off(out)
                    continue
            gathering_since = None
            if pending and len(active) < batch and "running" in states and "pausing" not in states \
                    and self._worth_pausing(active):
                for handle in active.values():
                    if handle.state == "running":
                        handle.state = "pausing"
                        handle.request.cancel_turn(handle.turn)
                self.metrics.rebatches.inc()
            elif "running" not in states and "pausing" not in states:
                # A batch boundary: continue the paused requests and begin waiting ones, together.
                for handle in [h for h in active.values() if h.state == "paused"]:
                    self._continue(engine, handle, active, out)
                while pending and len(active) < batch:
                    self._begin(engine, pending.popleft(), active, out)
            if active and any(h.state != "paused" for h in active.values()):
                try:
                    events = engine.run(buffer)  # releases the GIL while the model computes
                except Exception as e:  # noqa: BLE001 - every request in flight fails, the server lives on
                    log.exception("the engine failed a step")
                    for handle in active.values():
                        out.append((handle, e))
                        handle.request.close()
                    active.clear()
                    events = []
                stepped: set[int] = set()
                for event in events:
                    found = active.get(id(event.request))
                    if found is None:
                        continue
                    handle = found
                    flags = event.flags.value
                    if flags & token_flag:
                        stepped.add(id(handle))
                        token = int(event.token)
                        handle.generated.append(token)
                        handle.turn_tokens += 1
                        out.append((handle, Piece(handle.stream.decode(token), token)))
                    if flags & failed_flag:
                        out.append((handle, RuntimeError(f"the engine failed the request: {event.error_code.name}")))
                        self._close(handle, active)
                    elif flags & finished_flag:
                        usage = event.usage
                        if handle.cached < 0 and usage is not None:
                            handle.cached = int(usage.cached_prompt_tokens)
                        if handle.state == "pausing" and event.finish_reason == cancelled_reason \
                                and not handle.cancel.is_set():
                            handle.state = "paused"
                        else:
                            out.append((handle, self._finished(og, event, handle)))
                            self._close(handle, active)
                if stepped:
                    self.metrics.batch_occupancy.set(len(stepped))
                    self.metrics.engine_step_batch.observe(len(stepped))
            if not active:
                self.metrics.batch_occupancy.set(0)
            self._hand_off(out)

    def _options(self, handle: _Handle) -> Any:
        og, s = self.runner.og, handle.sampling
        options = og.TurnOptions(handle.request)
        options.set_max_generated_tokens(handle.max_tokens - handle.produced)
        minimum = (handle.max_tokens if s.ignore_eos else s.min_tokens) - handle.produced
        if minimum > 0:
            options.set_min_generated_tokens(minimum)  # EOS is masked until then
        if s.temperature is not None:
            if s.temperature == 0:
                options.set_do_sample(False)
            else:
                options.set_do_sample(True)
                options.set_temperature(s.temperature)
        if s.top_p is not None:
            options.set_top_p(s.top_p)
        if s.top_k is not None:
            options.set_top_k(s.top_k)
        if s.repetition_penalty is not None:
            options.set_repetition_penalty(s.repetition_penalty)
        if s.guidance is not None:
            options.set_guidance(*s.guidance)
        return options

    def _begin(self, engine: Any, handle: _Handle, active: dict[int, _Handle],
               out: list[tuple[_Handle, Any]]) -> None:
        import numpy as np

        try:
            handle.request = engine.create_request()
            handle.turn = handle.request.begin_turn(np.asarray(handle.ids, dtype=np.int32), self._options(handle))
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            out.append((handle, e))
            if handle.request is not None:
                handle.request.close()
            return
        handle.stream = self.runner.tokenizer.create_stream()
        handle.state = "running"
        active[id(handle.request)] = handle

    @staticmethod
    def _worth_pausing(active: dict[int, _Handle]) -> bool:
        """Pause the batch for a newcomer when the steps it would wait cost more than the re-prefill.

        On CPU a decode step costs about as much as prefilling PREFILL_TOKENS_PER_STEP tokens.
        """
        running = [h for h in active.values() if h.state == "running"]
        if not all(h.rebatchable for h in running):
            return False
        wait_steps = max(h.max_tokens - h.produced for h in running)
        refeed = sum(len(h.ids) + h.produced for h in running)
        return wait_steps * PREFILL_TOKENS_PER_STEP > refeed

    def _continue(self, engine: Any, handle: _Handle, active: dict[int, _Handle],
                  out: list[tuple[_Handle, Any]]) -> None:
        """A paused request goes on as a new engine request: its prompt and what it generated as the input.

        (A static engine rewinds a request only when it is the only one resident.)
        """
        import numpy as np

        self._close(handle, active)
        try:
            handle.request = engine.create_request()
            handle.turn = handle.request.begin_turn(np.asarray([*handle.ids, *handle.generated], dtype=np.int32),
                                                    self._options(handle))
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            out.append((handle, e))
            handle.request.close()
            return
        active[id(handle.request)] = handle
        handle.turn_tokens = 0
        handle.state = "running"

    def _finished(self, og: Any, event: Any, handle: _Handle) -> Finished:
        reasons = og.FinishReason
        reason = event.finish_reason
        cached = max(0, handle.cached)
        if reason == reasons.CANCELLED:
            self.metrics.cancelled.inc()
            return Finished("cancelled", handle.produced, cached)
        if reason in (reasons.MAX_GENERATED_TOKENS, reasons.MAX_SESSION_TOKENS):
            return Finished("length", handle.produced, cached)
        return Finished("stop", handle.produced, cached)  # EOS (not emitted as a token) or a stop string

    @staticmethod
    def _close(handle: _Handle, active: dict[int, _Handle]) -> None:
        active.pop(id(handle.request), None)
        handle.request.close()

    @staticmethod
    def _hand_off(out: list[tuple[_Handle, Any]]) -> None:
        """One wake-up of the event loop per engine step, not one per token."""
        by_loop: dict[int, list[tuple[_Handle, Any]]] = {}
        for handle, item in out:
            by_loop.setdefault(id(handle.loop), []).append((handle, item))
        for items in by_loop.values():

            def deliver(items: list[tuple[_Handle, Any]] = items) -> None:
                for handle, item in items:
                    handle.deliver(item)

            try:
                items[0][0].loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the loop closed (shutdown): nobody is listening any more
                pass


# ---------------------------------------------------------------------------- the app


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("olive_server_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("olive_server_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("olive_server_cached_prompt_tokens", "Prompt tokens the engine reused",
                                     registry=r)
        self.completion_tokens = Counter("olive_server_completion_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("olive_server_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.latency = Histogram("olive_server_request_duration_seconds", "Request latency", ["endpoint"],
                                 buckets=buckets, registry=r)
        self.cancelled = Counter("olive_server_cancelled_generations", "Generations stopped early (client gone, "
                                 "stop sequence or shutdown)", registry=r)
        self.in_flight = Gauge("olive_server_requests_generating", "Requests generating now", registry=r)
        self.waiting = Gauge("olive_server_requests_waiting", "Requests waiting for a generation slot", registry=r)
        self.paths = Counter("olive_server_generations", "Generations by path (engine: batched; generator: "
                             "what the engine cannot serve, adapters included)", ["path"], registry=r)
        self.adapter_generations = Counter("olive_server_adapter_generations", "Generations with a LoRA adapter "
                                           "active (on the generator path: og.Engine has no adapter API)",
                                           ["adapter"], registry=r)
        self.loop_lag = Histogram("olive_server_event_loop_lag_seconds", "How late the event loop woke up (sampled "
                                  "every 20 ms)", buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02,
                                                           0.05, 0.1, 0.25, 1), registry=r)
        self.batch_occupancy = Gauge("olive_server_batch_occupancy", "Requests in the engine's last step", registry=r)
        self.rebatches = Counter("olive_server_engine_rebatches", "Running turns paused so that waiting requests "
                                 "join the batch", registry=r)
        self.engine_step_batch = Histogram("olive_server_engine_step_requests", "Requests that got a token in one "
                                           "engine step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)


class _Guarded(StreamingResponse):
    """A streaming response that always gives its admission ticket back, even if never iterated."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class Server:
    def __init__(self, folder: str | Path, *, model_id: str | None = None, max_concurrency: int | None = None,
                 queue_size: int = 16, max_body_bytes: int = MAX_BODY_BYTES, batch_size: int | None = None,
                 api_key: str | None = None, metrics_need_key: bool = False, use_engine: bool = True,
                 body_timeout: float = BODY_TIMEOUT):
        self.folder = Path(folder)
        self.model_id = model_id or _default_model_id(self.folder)
        self.requested_concurrency = max_concurrency
        self.max_concurrency = max_concurrency or batch_size or DEFAULT_BATCH_SIZE
        self.queue_size = queue_size
        self.max_body_bytes = max_body_bytes
        self.batch_size = batch_size
        self.use_engine = use_engine
        self.body_timeout = body_timeout
        self._api_key = api_key.encode() if api_key else None
        self.metrics_need_key = metrics_need_key
        self.runner: ModelRunner | None = None
        self.engine: EngineWorker | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.metrics = Metrics()
        self.pool: ThreadPoolExecutor | None = None
        self.slots: asyncio.Semaphore | None = None
        self.admitted = 0  # generating + waiting, counted at admission: the queue bound holds exactly
        self.waiting = 0
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )

    # -- lifecycle

    def load(self) -> None:
        started = time.monotonic()
        try:
            runner = ModelRunner(self.folder, batch_size=self.batch_size, use_engine=self.use_engine)
            if self.requested_concurrency is None:
                self.max_concurrency = runner.batch_size if runner.use_engine else DEFAULT_BATCH_SIZE
            if self.slots is not None:
                self.slots = asyncio.Semaphore(self.max_concurrency)
            if runner.use_engine:
                engine = EngineWorker(runner, self.metrics)
                engine.start()
                self.engine = engine
            self.pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="generate")
            self._warm_up(runner)
            self.runner = runner
            path = f"engine, batch size {runner.batch_size}" if runner.use_engine else "generator only"
            log.info("model %s loaded from %s in %.2fs (onnxruntime-genai %s, %s, %d at once, %d waiting)",
                     self.model_id, self.folder, time.monotonic() - started, runner.version, path,
                     self.max_concurrency, self.queue_size)
            if runner.adapter_names:
                log.info("adapters (on the generator path): %s",
                         ", ".join(f"{self.model_id}:{name}" for name in runner.adapter_names))
        except Exception as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model in %s: %s", self.folder, self.load_error)
        finally:
            self.loaded.set()

    def _warm_up(self, runner: ModelRunner) -> None:
        """One real token through every path, so that "loaded" means "can generate"."""
        ids = runner.encode(runner.chat_prompt([{"role": "user", "content": "Hi"}]))
        runner.generate(ids, Sampling(temperature=0), 1, threading.Event(), lambda piece: None)
        for name in runner.adapter_names:
            # An adapter that loads but does not fit the graph (another base, another rank) fails
            # only when it runs: run it now.
            try:
                runner.generate(ids, Sampling(temperature=0), 1, threading.Event(), lambda piece: None, adapter=name)
            except Exception as e:  # noqa: BLE001 - reported as what it is: this adapter is bad
                raise AdapterLoadError(f"the adapter `{name}` loads but cannot generate with this model "
                                       f"({_ort_message(e)}): was it trained on another base model? Rebuild it, or "
                                       f"remove it from {self.folder / ADAPTERS_DIR} to serve the model without it") \
                    from None
        if self.engine is not None:
            done = threading.Event()
            result: list[Any] = []

            def deliver(item: Any) -> None:
                if isinstance(item, (Finished, BaseException)):
                    result.append(item)
                    done.set()

            # No event loop yet in this thread: deliveries run through a private one-shot loop shim.
            handle = _Handle(ids, Sampling(temperature=0), 1, threading.Event(), _ImmediateLoop(),  # type: ignore[arg-type]
                             deliver)
            self.engine.submit(handle)
            if not done.wait(60):
                raise RuntimeError("the engine did not generate a token within 60 s")
            if isinstance(result[0], BaseException):
                raise result[0]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.slots = asyncio.Semaphore(self.max_concurrency)
        threading.Thread(target=self.load, name="load-model", daemon=True).start()
        watch = asyncio.ensure_future(self._watch_loop_lag())
        yield
        watch.cancel()
        if self.engine is not None:
            self.engine.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _watch_loop_lag(self, interval: float = 0.02) -> None:
        """How late the event loop wakes up: what any blocking work on it costs every client."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - due))

    # -- plain endpoints

    async def health(self, request: Request) -> Response:
        if self.runner is not None:
            body: dict[str, Any] = {"status": "ok", "model": self.model_id}
            if self.runner.adapter_names:
                body["adapters"] = [f"{self.model_id}:{n}" for n in self.runner.adapter_names]
            return JSONResponse(body)
        if self.load_error is not None:
            return JSONResponse({"status": "error", "error": self.load_error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            self.metrics.requests.labels("/v1/models", str(e.status)).inc()
            return e.response()
        self.metrics.requests.labels("/v1/models", "200").inc()
        data: list[dict[str, Any]] = [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "olive-builder"}]
        # Each adapter is a model of its own for clients; `parent` names its base (as vLLM lists LoRA modules).
        data += [{"id": f"{self.model_id}:{name}", "object": "model", "created": self.created,
                  "owned_by": "olive-builder", "parent": self.model_id}
                 for name in (self.runner.adapter_names if self.runner is not None else ())]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(self, request: Request) -> Response:
        if self.metrics_need_key:
            try:
                self._authorize(request)
            except ApiError as e:
                return e.response()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- completions

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", chat=False)

    async def _handle(self, request: Request, endpoint: str, *, chat: bool) -> Response:
        started = time.monotonic()
        try:
            self._authorize(request)
            response = await self._complete(request, started, chat=chat)
        except ApiError as e:
            response = e.response()
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug must still answer in the API's own shape
            log.exception("request to %s failed", endpoint)
            response = ApiError(500, f"Internal error: {type(e).__name__}: {e}", type_="server_error").response()
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    async def _complete(self, request: Request, started: float, *, chat: bool) -> Response:
        body = await self._json_body(request)
        runner = self._ready_runner()
        _check_fields(body, chat=chat)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "`model` is required: a string.", param="model")
        adapter = self._adapter_of(model, runner)
        sampling = _sampling(body, chat=chat, vocab_size=runner.vocab_size)
        stream = _optional(body, "stream", "bool", False)
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"include_usage"}:
                raise ApiError(400, "`stream_options` must be an object with at most `include_usage`.",
                               param="stream_options")
            include_usage = _optional(options, "include_usage", "bool", False)
            if not stream:
                raise ApiError(400, "`stream_options` is only allowed with `stream: true`.", param="stream_options")
        tools: ToolPlan | None = None
        if chat:
            tools = _tools(body)
            messages = _messages(body)
            if tools is not None and tools.guidance is not None:
                if sampling.guidance is not None:
                    raise ApiError(400, "`response_format` cannot be combined with a required tool call.",
                                   param="response_format")
                sampling.guidance = tools.guidance
            prompt = runner.chat_prompt(messages, tools.tools if tools and tools.choice != "none" else None)
        else:
            prompt = _prompt(body)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, runner.encode, prompt)
        if not ids:
            raise ApiError(400, "The prompt is empty after tokenization.", param="messages" if chat else "prompt")
        room = runner.context_length - len(ids)
        if room <= 0:
            raise ApiError(400, f"This model's maximum context length is {runner.context_length} tokens; "
                                f"the prompt has {len(ids)} tokens.", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {runner.context_length} tokens; "
                                f"the prompt has {len(ids)} and max_tokens asks for {sampling.max_tokens} more "
                                f"({room} fit).", param="max_tokens", code="context_length_exceeded")
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
        if sampling.min_tokens > max_tokens:
            raise ApiError(400, "`min_tokens` must not exceed `max_tokens`.", param="min_tokens")
        release = self._admit()
        try:
            job = _Job(self, runner, ids, sampling, max_tokens, started, release, model=model, adapter=adapter)
            kind = "chat.completion" if chat else "text_completion"
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if stream:
                return _Guarded(self._sse(job, rid, kind, chat, include_usage, tools), job.release,
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            text, pieces, finished = await job.collect(request)
        finally:
            if not stream:
                release()
        usage = _usage(len(ids), finished)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finished.reason, "logprobs": None}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = tools.parse(text) if tools is not None else None
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls"
            choice["message"] = message
            if sampling.logprobs:
                choice["logprobs"] = {"content": [self._chat_logprob(runner, p) for p in pieces]}
        else:
            choice["text"] = text
            if sampling.logprobs:
                choice["logprobs"] = _completion_logprobs(runner, pieces)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model,
                             "choices": [choice], "usage": usage})

    @staticmethod
    def _chat_logprob(runner: ModelRunner, piece: Piece) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = runner.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        item = entry(piece.token, piece.logprob if piece.logprob is not None else 0.0)
        item["top_logprobs"] = [entry(t, lp) for t, lp in piece.top or []]
        return item

    async def _sse(self, job: _Job, rid: str, kind: str, chat: bool, include_usage: bool,
                   tools: ToolPlan | None) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        runner = job.runner
        # With tools offered, the whole answer decides whether it is a call: hold it until the end.
        hold = tools is not None and tools.choice != "none"

        def event(choice: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
            data: dict[str, Any] = {"id": rid, "object": chunk_kind, "created": created, "model": job.model,
                                    "choices": [choice] if choice else []}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def piece(text: str, finish: str | None = None, pieces: list[Piece] | None = None) -> dict[str, Any]:
            logprobs: Any = None
            if job.sampling.logprobs and pieces:
                logprobs = ({"content": [self._chat_logprob(runner, p) for p in pieces]} if chat
                            else _completion_logprobs(runner, pieces))
            if chat:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None})
            held: list[Piece] = []
            async for text, pieces in job.texts():
                if hold:
                    held.extend(pieces)
                elif text or job.sampling.logprobs:
                    yield event(piece(text, pieces=pieces))
            finished = job.finished
            assert finished is not None
            reason = finished.reason
            if hold:
                assert tools is not None
                text = "".join(p.text for p in held)
                calls = tools.parse(text)
                if calls:
                    reason = "tool_calls"
                    deltas = [{**call, "index": i} for i, call in enumerate(calls)]
                    yield event({"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None,
                                 "logprobs": None})
                elif text:
                    yield event(piece(text, pieces=held))
            yield event(piece("", reason))
            if include_usage:
                yield event({}, _usage(len(job.ids), finished))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel_now()  # a client that went away stops its generation
            self.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
                time.monotonic() - job.started)

    # -- helpers

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise ApiError(401, "A valid API key is required: send `Authorization: Bearer <key>`.",
                           type_="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _adapter_of(self, model: str, runner: ModelRunner) -> str | None:
        """None for the base model, the adapter's name for ``<base>:<adapter>``; 404 for anything else."""
        if model == self.model_id:
            return None
        prefix = self.model_id + ":"
        if model.startswith(prefix) and model[len(prefix):] in runner.adapter_names:
            return model[len(prefix):]
        served = [self.model_id, *(prefix + name for name in runner.adapter_names)]
        listed = ", ".join(f"`{m}`" for m in served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
        what = "adapter" if model.startswith(prefix) else "model"
        raise ApiError(404, f"The {what} `{model}` does not exist; this server serves {listed} (GET /v1/models).",
                       param="model", code="model_not_found")

    def _ready_runner(self) -> ModelRunner:
        if self.runner is None:
            if self.load_error:
                raise ApiError(500, f"The model failed to load: {self.load_error}", type_="server_error")
            raise ApiError(503, "The model is still loading; retry shortly.", type_="server_error",
                           headers={"Retry-After": "1"})
        return self.runner

    def _admit(self) -> Callable[[], None]:
        """Count the request in (no await between the check and the count) or answer 429."""
        if self.admitted >= self.max_concurrency + self.queue_size:
            generating = min(self.admitted, self.max_concurrency)
            raise ApiError(429, f"The server is at capacity ({generating} generating, {self.admitted - generating} "
                                "waiting); retry shortly.", type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1

        return release

    async def _json_body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise ApiError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {self.body_timeout:g} s.",
                           headers={"Connection": "close"}) from None
        return _parse_json(b"".join(chunks))


def _usage(prompt: int, finished: Finished) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": finished.completion_tokens,
            "total_tokens": prompt + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens}}


def _completion_logprobs(runner: ModelRunner, pieces: list[Piece]) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and one {token: logprob} map per token."""
    tokens, logprobs, tops, offsets, offset = [], [], [], [], 0
    for p in pieces:
        tokens.append(runner.token_text(p.token))
        logprobs.append(p.logprob)
        top: dict[str, float] = {}
        for t, lp in p.top or []:
            top.setdefault(runner.token_text(t), lp)  # best first: tokens that decode alike keep the best
        tops.append(top)
        offsets.append(offset)
        offset += len(p.text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


class _ImmediateLoop:
    """Stands in for an event loop where deliveries may run on the engine thread itself (warm-up)."""

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        callback()


class _Job:
    """One generation on either path, its text handed to the event loop."""

    def __init__(self, server: Server, runner: ModelRunner, ids: list[int], sampling: Sampling, max_tokens: int,
                 started: float, release: Callable[[], None], *, model: str, adapter: str | None = None):
        self.server, self.runner, self.ids = server, runner, ids
        self.sampling, self.max_tokens, self.started = sampling, max_tokens, started
        self.release = release
        self.model, self.adapter = model, adapter  # the id the client asked for, and its adapter (None: the base)
        self.cancel = threading.Event()
        self.finished: Finished | None = None
        # og.Engine (0.18) cannot activate an adapter for one request: adapter requests take the generator path.
        self.on_engine = server.engine is not None and adapter is None and runner.engine_can_serve(sampling)

    def cancel_now(self) -> None:
        if not self.cancel.is_set():
            self.cancel.set()
            if self.on_engine and self.server.engine is not None:
                self.server.engine.wake()

    def _start(self, loop: asyncio.AbstractEventLoop,
               queue_: asyncio.Queue[Piece | Finished | BaseException]) -> threading.Semaphore | None:
        server = self.server
        server.metrics.paths.labels("engine" if self.on_engine else "generator").inc()
        if self.adapter is not None:
            server.metrics.adapter_generations.labels(self.adapter).inc()
        if self.on_engine:
            assert server.engine is not None
            server.engine.submit(_Handle(self.ids, self.sampling, self.max_tokens, self.cancel, loop,
                                         queue_.put_nowait))
            # The engine steps every request together and cannot pause one: a slow reader's
            # pieces wait here, bounded by its max_tokens.
            return None

        # Backpressure: the generator may run at most AHEAD pieces ahead of the HTTP writer, so a
        # request's memory is bounded and a client that left is noticed while generation still runs.
        credits = threading.Semaphore(AHEAD)

        def emit(piece: Piece) -> None:
            while not credits.acquire(timeout=0.1):
                if self.cancel.is_set():
                    return
            try:
                loop.call_soon_threadsafe(queue_.put_nowait, piece)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                self.cancel.set()

        def work() -> None:
            try:
                result: Finished | BaseException = self.runner.generate(
                    self.ids, self.sampling, self.max_tokens, self.cancel, emit, adapter=self.adapter)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                result = e
            if isinstance(result, Finished) and result.reason == "cancelled":
                server.metrics.cancelled.inc()
            try:
                loop.call_soon_threadsafe(queue_.put_nowait, result)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                pass

        assert server.pool is not None
        loop.run_in_executor(server.pool, work)  # it reports through the queue
        return credits

    async def texts(self) -> AsyncIterator[tuple[str, list[Piece]]]:
        """Text with stop sequences applied, with the pieces it came from; sets ``self.finished`` at the end."""
        server, loop = self.server, asyncio.get_running_loop()
        queue_: asyncio.Queue[Piece | Finished | BaseException] = asyncio.Queue()
        assert server.slots is not None
        server.waiting += 1
        server.metrics.waiting.set(server.waiting)
        try:
            await server.slots.acquire()
        finally:
            server.waiting -= 1
            server.metrics.waiting.set(server.waiting)
        server.metrics.in_flight.inc()
        server.metrics.prompt_tokens.inc(len(self.ids))
        first = True
        stops = self.sampling.stop
        held = ""
        held_pieces: list[Piece] = []
        consumed = 0
        try:
            credits = self._start(loop, queue_)
            while True:
                item = await queue_.get()
                if isinstance(item, BaseException):
                    raise ApiError(500, f"Generation failed: {item}", type_="server_error")
                if isinstance(item, Finished):
                    self.finished = item
                    if held or held_pieces:
                        yield held, held_pieces
                    break
                if credits is not None:
                    credits.release()
                consumed += 1  # one piece per generated token
                if first:
                    server.metrics.ttft.observe(time.monotonic() - self.started)
                    first = False
                held += item.text
                held_pieces.append(item)
                cut = _find_stop(held, stops)
                if cut is not None:
                    self.cancel_now()
                    if held[:cut]:
                        yield held[:cut], held_pieces
                    final = await _drain(queue_)  # the generation stops at its next token
                    # Usage counts the tokens up to the one that completed the stop sequence,
                    # not those generated after it.
                    cached = final.cached_tokens if isinstance(final, Finished) else 0
                    self.finished = Finished("stop", consumed, cached)
                    break
                keep = _stop_prefix_len(held, stops)
                if len(held) > keep:
                    yield held[: len(held) - keep], held_pieces
                    held, held_pieces = held[len(held) - keep :], []
        finally:
            self.cancel_now()
            server.metrics.in_flight.dec()
            server.slots.release()
            if self.finished is not None:
                server.metrics.completion_tokens.inc(self.finished.completion_tokens)
                server.metrics.cached_tokens.inc(self.finished.cached_tokens)

    async def collect(self, request: Request) -> tuple[str, list[Piece], Finished]:
        """The whole answer of a non-streaming request, cancelled if the client goes away."""
        texts: list[str] = []
        pieces: list[Piece] = []

        async def consume() -> None:
            async for text, more in self.texts():
                texts.append(text)
                pieces.extend(more)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    self.cancel_now()
        except BaseException:
            task.cancel()
            raise
        task.result()
        assert self.finished is not None
        return "".join(texts), pieces, self.finished


async def _drain(queue_: asyncio.Queue[Any]) -> Any:
    """Wait for the generation's final item (it stops at the next token once cancelled)."""
    while True:
        item = await queue_.get()
        if isinstance(item, (Finished, BaseException)):
            return item


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------- request fields


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _check_json(body, "", 0)
    return body


def _check_json(value: Any, where: str, depth: int) -> None:
    """Refuse what JSON allows but nothing downstream can take: deep nesting, lone UTF-16 surrogates."""
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", param=where or None)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"`{where}` holds invalid Unicode (a lone UTF-16 surrogate).",
                           param=where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, where or "(a key)", depth + 1)
            _check_json(item, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"`{where}` must be a finite number.", param=where or None)


# Fields with an effect.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
           "ignore_eos", "min_tokens", "repetition_penalty", "logprobs", "user", "guided_regex", "guided_json"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                   "parallel_tool_calls"}
_COMPLETIONS = _COMMON | {"prompt"}
# Accepted only at the value that means "off", so that a client sending its defaults is served.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
}
_NEUTRAL_COMPLETIONS: dict[str, Callable[[Any], bool]] = {
    **_NEUTRAL,
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
}


def _check_fields(body: dict[str, Any], *, chat: bool) -> None:
    """Anything accepted has an effect: an unknown or unsupported field is a 400 that names it."""
    known, neutral = (_CHAT, _NEUTRAL) if chat else (_COMPLETIONS, _NEUTRAL_COMPLETIONS)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    for name, value in body.items():
        if value is None or name in known:
            continue
        if name in neutral:
            if neutral[name](value):
                continue
            raise ApiError(400, f"`{name}` is not supported by this server on {endpoint}: only its default "
                                "(off) is accepted.", param=name, code="unsupported_parameter")
        raise ApiError(400, f"`{name}` is not a field this server supports on {endpoint}.",
                       param=name, code="unsupported_parameter")


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "bool": ((bool,), "a boolean"),
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
}


def _optional(body: dict[str, Any], name: str, kind: str, default: Any) -> Any:
    """``body[name]`` if present and of ``kind`` (bool, int, number), else ``default``; 400 on a wrong type."""
    value = body.get(name)
    if value is None:
        return default
    types, expected = _KINDS[kind]
    if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
        raise ApiError(400, f"`{name}` must be {expected}, not {json.dumps(value)[:50]}.", param=name)
    return value


def _int_in(body: dict[str, Any], name: str, low: int, high: int, default: Any, what: str = "") -> Any:
    """An integer field within [low, high]: nothing out of range reaches the binding (which would raise)."""
    value = _optional(body, name, "int", default)
    if value is not default and not low <= value <= high:
        raise ApiError(400, f"`{name}` must be {what or f'between {low} and {high}'}.", param=name)
    return value


def _sampling(body: dict[str, Any], *, chat: bool, vocab_size: int = 0) -> Sampling:
    n = _optional(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
    max_tokens = _optional(body, "max_completion_tokens", "int", None) if chat else None
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", "int", None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "`max_tokens` must be at least 1.", param="max_tokens")
    temperature = _optional(body, "temperature", "number", None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(400, "`temperature` must be between 0 and 2.", param="temperature")
    top_p = _optional(body, "top_p", "number", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, "`top_p` must be greater than 0 and at most 1.", param="top_p")
    top_k = _int_in(body, "top_k", 0, INT32_MAX, None, f"an integer from 0 to {INT32_MAX}")
    if top_k is not None and vocab_size:
        top_k = min(top_k, vocab_size)  # more than the vocabulary means all of it
    seed = _int_in(body, "seed", INT64_MIN, INT64_MAX, None, "a 64-bit integer")
    min_tokens = _int_in(body, "min_tokens", 0, INT32_MAX, 0, f"an integer from 0 to {INT32_MAX}")
    repetition_penalty = _optional(body, "repetition_penalty", "number", None)
    if repetition_penalty is not None and not 0 < repetition_penalty <= 10:
        raise ApiError(400, "`repetition_penalty` must be greater than 0 and at most 10.", param="repetition_penalty")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(400, "`stop` must be a string or an array of strings.", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise ApiError(400, f"`stop` takes 1 to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    ignore_eos = _optional(body, "ignore_eos", "bool", False)
    if chat:
        logprobs = _optional(body, "logprobs", "bool", False)
        top_logprobs = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        if top_logprobs and not logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
    else:
        # The legacy field: an integer, how many alternatives per token (0 means only the chosen one).
        legacy = _int_in(body, "logprobs", 0, 5, None)
        logprobs, top_logprobs = legacy is not None, legacy or 0
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stops,
                    ignore_eos=ignore_eos, min_tokens=min_tokens, repetition_penalty=repetition_penalty,
                    guidance=_guidance(body, chat=chat), logprobs=logprobs, top_logprobs=top_logprobs)


def _compact_schema(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}})


def _guidance(body: dict[str, Any], *, chat: bool) -> tuple[str, str] | None:
    """``response_format`` (chat) and vLLM's ``guided_regex`` / ``guided_json`` as onnxruntime-genai guidance."""
    chosen: list[tuple[str, tuple[str, str]]] = []
    fmt = body.get("response_format") if chat else None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            pass
        elif kind == "json_object":
            chosen.append(("response_format", ("json_schema", _compact_schema({"type": "object"}))))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "`response_format.json_schema` must be an object with a `schema` object.",
                               param="response_format.json_schema")
            chosen.append(("response_format", ("json_schema", _compact_schema(spec.get("schema") or {}))))
        else:
            raise ApiError(400, "`response_format.type` must be text, json_object or json_schema.",
                           param="response_format.type")
    regex = body.get("guided_regex")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ApiError(400, "`guided_regex` must be a non-empty string.", param="guided_regex")
        chosen.append(("guided_regex", ("regex", regex)))
    schema = body.get("guided_json")
    if schema is not None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise ApiError(400, "`guided_json` must be a JSON schema.", param="guided_json") from None
        if not isinstance(schema, dict):
            raise ApiError(400, "`guided_json` must be a JSON schema object.", param="guided_json")
        chosen.append(("guided_json", ("json_schema", _compact_schema(schema))))
    if len(chosen) > 1:
        raise ApiError(400, f"Only one of {', '.join(f'`{n}`' for n, _ in chosen)} may be given.", param=chosen[1][0])
    return chosen[0][1] if chosen else None


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]
    choice: str  # "auto" | "none" | "required" | "function"
    names: list[str]
    guidance: tuple[str, str] | None

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The model's tool calls in ``text`` (a JSON object or Hermes-style ``<tool_call>`` blocks), or None."""
        if self.choice == "none":
            return None
        candidates: list[str] = []
        stripped = text.strip()
        if "<tool_call>" in stripped:
            for part in stripped.split("<tool_call>")[1:]:
                candidates.append(part.split("</tool_call>")[0].strip())
        else:
            candidates.append(stripped)
        calls = []
        for candidate in candidates:
            try:
                value = json.loads(candidate)
            except ValueError:
                return None
            if not isinstance(value, dict) or value.get("name") not in self.names:
                return None
            arguments = value.get("arguments", value.get("parameters", {}))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": value["name"],
                                       "arguments": json.dumps(arguments, separators=(",", ":"))}})
        return calls or None


def _tools(body: dict[str, Any]) -> ToolPlan | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "`parallel_tool_calls` must be a boolean.", param="parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "`tool_choice` needs `tools`.", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "`tools` must be a non-empty array of function tools.", param="tools")
    names, schemas = [], {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                           param=f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"`tools[{i}].function.parameters` must be a JSON schema object.",
                           param=f"tools[{i}].function.parameters")
        names.append(fn["name"])
        schemas[fn["name"]] = params
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise ApiError(400, "`tool_choice` names a function that is not in `tools`.", param="tool_choice")
        wanted: list[str] = [str(name)]
        kind = "function"
    elif choice in ("auto", "none", "required"):
        wanted, kind = names, choice
    else:
        raise ApiError(400, "`tool_choice` must be none, auto, required or {\"type\": \"function\", ...}.",
                       param="tool_choice")
    guidance = None
    if kind in ("required", "function"):
        # A required call is constrained decoding: one JSON object {name, arguments} valid for a tool.
        options = [{"type": "object", "properties": {"name": {"const": n}, "arguments": schemas[n]},
                    "required": ["name", "arguments"], "additionalProperties": False} for n in wanted]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        guidance = ("json_schema", _compact_schema(schema))
    return ToolPlan(tools=tools, choice=kind, names=wanted, guidance=guidance)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` is required: a non-empty array of {role, content} objects.", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"`messages[{i}]` must be an object.", param=f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"`messages[{i}].role` must be system, user, assistant, developer or tool.",
                           param=f"messages[{i}].role")
        extra = set(message) - {"role", "content", "name", "tool_calls", "tool_call_id"}
        if extra:
            name = sorted(extra)[0]
            raise ApiError(400, f"`messages[{i}].{name}` is not a field this server supports.",
                           param=f"messages[{i}].{name}", code="unsupported_parameter")
        if isinstance(content, list):  # content parts: only text can be served by a text model
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"`messages[{i}].content` may hold only text parts.", param=f"messages[{i}].content")
            content = "".join(str(t) for t in texts)
        calls = message.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"`messages[{i}].content` must be a string.", param=f"messages[{i}].content")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise ApiError(400, f"`messages[{i}].tool_calls` must be an array on an assistant message.",
                               param=f"messages[{i}].tool_calls")
            item["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                if not isinstance(message[key], str):
                    raise ApiError(400, f"`messages[{i}].{key}` must be a string.", param=f"messages[{i}].{key}")
                item[key] = message[key]
        out.append(item)
    return out


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "`prompt` is required: a non-empty string.", param="prompt")
    return prompt


def _default_model_id(folder: Path) -> str:
    """The build's first tag from its record; the folder's name for a folder not made by a build."""
    info = folder / INFO_FILE
    try:
        data = json.loads(info.read_text())
        return str(data["tags"][0])
    except FileNotFoundError:
        return folder.resolve().name
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        log.warning("cannot read the model id from %s (%s: %s); serving as `%s` (set --model-id)",
                    info, type(e).__name__, e, folder.resolve().name)
        return folder.resolve().name


# ---------------------------------------------------------------------------- connections


def _protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, with a deadline for each request's headers.

    uvicorn closes idle keep-alive connections only after a first response; a connection that
    never sends a complete request (or sends a byte now and then) would stay open for ever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE,):
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline

    return Protocol


# ---------------------------------------------------------------------------- entry point


def run(folder: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
        max_concurrency: int | None = None, queue_size: int = 16, drain_seconds: float = 30.0,
        batch_size: int | None = None, api_key: str | None = None, metrics_need_key: bool = False,
        use_engine: bool = True, header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT) -> int:
    import uvicorn

    if not logging.getLogger().handlers:  # `build serve` calls this without main(): still show the log
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        print(f"error: {folder} is not an ONNX Runtime GenAI model folder (no genai_config.json).", flush=True)
        return 2
    for name, value in (("--batch-size", batch_size), ("--max-concurrency", max_concurrency)):
        if value is not None and not 1 <= value <= 256:
            print(f"error: {name} must be between 1 and 256, not {value}.", flush=True)
            return 2
    if queue_size < 0:
        print(f"error: --queue-size must be 0 or more, not {queue_size}.", flush=True)
        return 2
    server = Server(folder, model_id=model_id, max_concurrency=max_concurrency, queue_size=queue_size,
                    batch_size=batch_size, api_key=api_key, metrics_need_key=metrics_need_key, use_engine=use_engine,
                    body_timeout=body_timeout)
    if api_key:
        log.info("API key required on /v1%s", " and /metrics" if metrics_need_key else "")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use the model "
                    "(set --api-key or %s)", host, API_KEY_ENV)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="info", http=_protocol(header_timeout),
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                            timeout_graceful_shutdown=int(drain_seconds), access_log=False)
    userver = uvicorn.Server(config)

    def watch_load() -> None:
        # A server that cannot load its model must not linger: stop, so the container exits non-zero.
        server.loaded.wait()
        if server.load_error is not None:
            userver.should_exit = True

    threading.Thread(target=watch_load, daemon=True).start()
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: make that
    # handler a no-op, so a clean drain ends with exit code 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    userver.run()
    return 1 if server.load_error is not None else 0


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get

    def optional_int(value: str | None) -> int | None:
        return int(value) if value else None

    parser = argparse.ArgumentParser(prog="python -m builder.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=env("OLIVE_MODEL_DIR", "/model"), help="model folder")
    parser.add_argument("--host", default=env("OLIVE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("OLIVE_PORT", "8000")))
    parser.add_argument("--model-id", default=env("OLIVE_MODEL_ID"), help="id clients use in `model`")
    parser.add_argument("--max-concurrency", type=int, default=optional_int(env("OLIVE_MAX_CONCURRENCY")),
                        help="requests generating at once (default: the batch size)")
    parser.add_argument("--queue-size", type=int, default=int(env("OLIVE_QUEUE_SIZE", "16")))
    parser.add_argument("--batch-size", type=int, default=optional_int(env("OLIVE_BATCH_SIZE")),
                        help=f"the engine's batch size (default: the model's genai_config, else {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--no-engine", action="store_true", help="generate with og.Generator only (for comparison)")
    parser.add_argument("--drain-seconds", type=float, default=float(env("OLIVE_DRAIN_SECONDS", "30")))
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}); prefer the "
                             "variable: a command line is visible to other users")
    parser.add_argument("--metrics-need-key", action="store_true", help="/metrics needs the API key too")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT,
                        help="seconds a connection may take to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                        help="seconds a request may take to send its body (408 after)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(run(args.model, host=args.host, port=args.port, model_id=args.model_id,
                         max_concurrency=args.max_concurrency, queue_size=args.queue_size,
                         drain_seconds=args.drain_seconds, batch_size=args.batch_size,
                         api_key=args.api_key or env(API_KEY_ENV) or None, metrics_need_key=args.metrics_need_key,
                         use_engine=not args.no_engine, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout))


if __name__ == "__main__":
    main()
