"""An OpenAI-compatible HTTP server over one ONNX Runtime GenAI model folder.

    python -m builder.server --model DIR [--host 0.0.0.0] [--port 8000]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health
(200 only once the model is loaded), GET /metrics (Prometheus).

It runs in the runtime images, so it imports only the standard library, Starlette,
uvicorn, prometheus_client and onnxruntime_genai: never the build-side stack.

Concurrency: each generation runs in a thread of a bounded pool (onnxruntime-genai calls
block), handing tokens to the event loop through a queue. At most ``max_concurrency``
generate at once; at most ``queue_size`` more wait; beyond that a request gets 429 with
Retry-After. A client that disconnects cancels its generation at the next token. SIGTERM
stops accepting connections and lets in-flight requests finish for up to ``drain_seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
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

log = logging.getLogger("olive-builder.server")

MAX_BODY_BYTES = 1 << 20
MAX_STOP_SEQUENCES = 4
AHEAD = 64  # text pieces a generation may run ahead of its HTTP writer


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


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int


# ---------------------------------------------------------------------------- the model


class ModelRunner:
    """One loaded model, its tokenizer, and the blocking generate loop."""

    def __init__(self, folder: str | Path):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(folder)
        config = json.loads((self.folder / "genai_config.json").read_text())
        model = config.get("model", {})
        search = config.get("search", {})
        # The KV cache is sized by search.max_length: that, not the model's native context, is the limit.
        self.context_length = int(search.get("max_length") or model.get("context_length") or 2048)
        eos = model.get("eos_token_id", [])
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.model = og.Model(str(self.folder))
        self.tokenizer = og.Tokenizer(self.model)
        self.version = getattr(og, "__version__", "")

    def warm_up(self) -> None:
        """One real token through the whole path, so that "loaded" means "can generate"."""
        ids = self.encode(self.chat_prompt([{"role": "user", "content": "Hi"}]))
        self.generate(ids, Sampling(temperature=0), 1, threading.Event(), lambda text: None)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return str(self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(self, ids: list[int], sampling: Sampling, max_tokens: int, cancel: threading.Event,
                 emit: Callable[[str], None]) -> Finished:
        """Blocking: generate up to ``max_tokens`` after ``ids``, calling ``emit`` with each text piece."""
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
            options["random_seed"] = sampling.seed
        if sampling.ignore_eos:
            options["min_length"] = len(ids) + max_tokens  # genai masks EOS until min_length
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids)
        stream = self.tokenizer.create_stream()
        produced = 0
        while produced < max_tokens and not generator.is_done():
            if cancel.is_set():
                return Finished("cancelled", produced)
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids and not sampling.ignore_eos:
                return Finished("stop", produced)
            produced += 1
            emit(stream.decode(token))
        return Finished("length", produced)


# ---------------------------------------------------------------------------- the app


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("olive_server_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("olive_server_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("olive_server_completion_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("olive_server_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.latency = Histogram("olive_server_request_duration_seconds", "Request latency", ["endpoint"],
                                 buckets=buckets, registry=r)
        self.cancelled = Counter("olive_server_cancelled_generations", "Generations stopped early (client gone, "
                                 "stop sequence or shutdown)", registry=r)
        self.in_flight = Gauge("olive_server_requests_generating", "Requests generating now", registry=r)
        self.waiting = Gauge("olive_server_requests_waiting", "Requests waiting for a generation slot", registry=r)


class Server:
    def __init__(self, folder: str | Path, *, model_id: str | None = None, max_concurrency: int = 4,
                 queue_size: int = 16, max_body_bytes: int = MAX_BODY_BYTES):
        self.folder = Path(folder)
        self.model_id = model_id or _default_model_id(self.folder)
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.max_body_bytes = max_body_bytes
        self.runner: ModelRunner | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self.slots: asyncio.Semaphore | None = None
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
            runner = ModelRunner(self.folder)
            runner.warm_up()
            self.runner = runner
            log.info("model %s loaded from %s in %.2fs", self.model_id, self.folder, time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model in %s: %s", self.folder, self.load_error)
        finally:
            self.loaded.set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.slots = asyncio.Semaphore(self.max_concurrency)
        threading.Thread(target=self.load, name="load-model", daemon=True).start()
        yield
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- plain endpoints

    async def health(self, request: Request) -> Response:
        if self.runner is not None:
            return JSONResponse({"status": "ok", "model": self.model_id})
        if self.load_error is not None:
            return JSONResponse({"status": "error", "error": self.load_error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def models(self, request: Request) -> Response:
        self.metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "olive-builder"}]})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- completions

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "/v1/completions", chat=False)

    async def _handle(self, request: Request, endpoint: str, *, chat: bool) -> Response:
        started = time.monotonic()
        try:
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
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "`model` is required: a string.", param="model")
        if model != self.model_id:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`.",
                           param="model", code="model_not_found")
        sampling = _sampling(body, chat=chat)
        stream = _optional(body, "stream", "bool", False)
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise ApiError(400, "`stream_options` must be an object.", param="stream_options")
            include_usage = bool(options.get("include_usage", False))
        if chat:
            prompt = runner.chat_prompt(_messages(body))
        else:
            prompt = _prompt(body)
        ids = await asyncio.get_running_loop().run_in_executor(None, runner.encode, prompt)
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
        self._admit()
        job = _Job(self, runner, ids, sampling, max_tokens, started)
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if stream:
            return StreamingResponse(self._sse(job, rid, kind, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finished = await job.collect(request)
        usage = {"prompt_tokens": len(ids), "completion_tokens": finished.completion_tokens,
                 "total_tokens": len(ids) + finished.completion_tokens}
        choice: dict[str, Any] = {"index": 0, "finish_reason": finished.reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": self.model_id,
                             "choices": [choice], "usage": usage})

    async def _sse(self, job: _Job, rid: str, kind: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(choice: dict[str, Any], usage: dict[str, int] | None = None) -> str:
            data: dict[str, Any] = {"id": rid, "object": chunk_kind, "created": created, "model": self.model_id,
                                    "choices": [choice] if choice else []}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def piece(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None})
            async for text in job.pieces():
                yield event(piece(text))
            finished = job.finished
            assert finished is not None
            yield event(piece("", finished.reason))
            if include_usage:
                n = finished.completion_tokens
                yield event({}, {"prompt_tokens": len(job.ids), "completion_tokens": n,
                                 "total_tokens": len(job.ids) + n})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that went away stops its generation
            self.metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
                time.monotonic() - job.started)

    # -- helpers

    def _ready_runner(self) -> ModelRunner:
        if self.runner is None:
            if self.load_error:
                raise ApiError(500, f"The model failed to load: {self.load_error}", type_="server_error")
            raise ApiError(503, "The model is still loading; retry shortly.", type_="server_error",
                           headers={"Retry-After": "1"})
        return self.runner

    def _admit(self) -> None:
        assert self.slots is not None
        if self.slots.locked() and self.waiting >= self.queue_size:
            raise ApiError(429, f"The server is at capacity ({self.max_concurrency} generating, {self.waiting} "
                                "waiting); retry shortly.", type_="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"The request body is larger than {self.max_body_bytes} bytes.")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body


class _Job:
    """One generation: runs in the pool, hands text pieces to the event loop."""

    def __init__(self, server: Server, runner: ModelRunner, ids: list[int], sampling: Sampling, max_tokens: int,
                 started: float):
        self.server, self.runner, self.ids = server, runner, ids
        self.sampling, self.max_tokens, self.started = sampling, max_tokens, started
        self.cancel = threading.Event()
        self.finished: Finished | None = None

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces with stop sequences applied; sets ``self.finished`` at the end."""
        server, loop = self.server, asyncio.get_running_loop()
        queue: asyncio.Queue[str | Finished | BaseException] = asyncio.Queue()
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

        # Backpressure: the generator may run at most AHEAD pieces ahead of the HTTP writer, so a
        # request's memory is bounded and a client that left is noticed while generation still runs.
        credits = threading.Semaphore(AHEAD)

        def emit(text: str) -> None:
            while not credits.acquire(timeout=0.1):
                if self.cancel.is_set():
                    return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, text)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                self.cancel.set()

        def work() -> None:
            try:
                result: Finished | BaseException = self.runner.generate(
                    self.ids, self.sampling, self.max_tokens, self.cancel, emit)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                result = e
            if isinstance(result, Finished) and result.reason == "cancelled":
                server.metrics.cancelled.inc()
            try:
                loop.call_soon_threadsafe(queue.put_nowait, result)
            except RuntimeError:  # the loop closed while we generated (shutdown)
                pass

        loop.run_in_executor(server.pool, work)  # it reports through the queue
        stops = self.sampling.stop
        held = ""
        consumed = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise ApiError(500, f"Generation failed: {item}", type_="server_error")
                if isinstance(item, Finished):
                    self.finished = item
                    if held:
                        yield held
                    break
                credits.release()
                consumed += 1  # one piece per generated token
                if first:
                    server.metrics.ttft.observe(time.monotonic() - self.started)
                    first = False
                held += item
                cut = _find_stop(held, stops)
                if cut is not None:
                    self.cancel.set()
                    if held[:cut]:
                        yield held[:cut]
                    await _drain(queue)  # the thread stops at its next token
                    # Usage counts the tokens up to the one that completed the stop sequence,
                    # not those the thread produced after it.
                    self.finished = Finished("stop", consumed)
                    break
                keep = _stop_prefix_len(held, stops)
                if len(held) > keep:
                    yield held[: len(held) - keep]
                    held = held[len(held) - keep :]
        finally:
            self.cancel.set()
            server.metrics.in_flight.dec()
            server.slots.release()
            if self.finished is not None:
                server.metrics.completion_tokens.inc(self.finished.completion_tokens)

    async def collect(self, request: Request) -> tuple[str, Finished]:
        """Whole text for a non-streaming request, cancelled if the client goes away."""
        parts: list[str] = []

        async def consume() -> None:
            async for text in self.pieces():
                parts.append(text)

        task = asyncio.ensure_future(consume())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                self.cancel.set()
        task.result()
        assert self.finished is not None
        return "".join(parts), self.finished


async def _drain(queue: asyncio.Queue[Any]) -> Any:
    """Wait for the generation thread's final item (it stops at the next token once cancelled)."""
    while True:
        item = await queue.get()
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


def _sampling(body: dict[str, Any], *, chat: bool) -> Sampling:
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
    top_k = _optional(body, "top_k", "int", None)
    if top_k is not None and top_k < 0:
        raise ApiError(400, "`top_k` must be 0 or more.", param="top_k")
    seed = _optional(body, "seed", "int", None)
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
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stops,
                    ignore_eos=ignore_eos)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
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
        if isinstance(content, list):  # content parts: only text can be served by a text model
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"`messages[{i}].content` may hold only text parts.", param=f"messages[{i}].content")
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"`messages[{i}].content` must be a string.", param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "`prompt` is required: a non-empty string.", param="prompt")
    return prompt


def _default_model_id(folder: Path) -> str:
    info = folder / "olive-builder.json"
    try:
        data = json.loads(info.read_text())
        return str(data["tags"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return folder.resolve().name


# ---------------------------------------------------------------------------- entry point


def run(folder: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
        max_concurrency: int = 4, queue_size: int = 16, drain_seconds: float = 30.0) -> int:
    import uvicorn

    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        print(f"error: {folder} is not an ONNX Runtime GenAI model folder (no genai_config.json).", flush=True)
        return 2
    server = Server(folder, model_id=model_id, max_concurrency=max_concurrency, queue_size=queue_size)
    config = uvicorn.Config(server.app, host=host, port=port, log_level="info",
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
    parser = argparse.ArgumentParser(prog="python -m builder.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("OLIVE_MODEL_DIR", "/model"), help="model folder")
    parser.add_argument("--host", default=os.environ.get("OLIVE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("OLIVE_PORT", "8000")))
    parser.add_argument("--model-id", default=os.environ.get("OLIVE_MODEL_ID"), help="id clients use in `model`")
    parser.add_argument("--max-concurrency", type=int, default=int(os.environ.get("OLIVE_MAX_CONCURRENCY", "4")))
    parser.add_argument("--queue-size", type=int, default=int(os.environ.get("OLIVE_QUEUE_SIZE", "16")))
    parser.add_argument("--drain-seconds", type=float, default=float(os.environ.get("OLIVE_DRAIN_SECONDS", "30")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(run(args.model, host=args.host, port=args.port, model_id=args.model_id,
                         max_concurrency=args.max_concurrency, queue_size=args.queue_size,
                         drain_seconds=args.drain_seconds))


if __name__ == "__main__":
    main()
