"""The HTTP app: Starlette routes over a ``ServedModel``, the API-key guard, and ``run``, which
serves it with uvicorn.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health
(200 only once the model is loaded), GET /metrics (Prometheus).

The server runs in the runtime images, so its package imports only the standard library,
Starlette, uvicorn, prometheus_client, numpy and onnxruntime_genai, and ``builder.contract``:
never the build-side stack. Its rooms:

- ``protocol``: the typed request of each endpoint, validated into sampling parameters
  (``tools``: tool calls and guidance specs);
- ``serving``: a request to a job, and the job's output to a JSON response or an SSE stream;
- ``scheduler``: admission (generation slots, waiting requests, 429) and the choice of path;
- ``engine``: the engine path (onnxruntime-genai >= 0.18, ``og.Engine``): continuous batching
  on one dedicated thread that creates and owns the engine;
- ``generator``: the loaded model, its adapters, and the ``og.Generator`` path: what the engine
  cannot serve. With static batching (the CPU engine) that is a sampled request with a seed (a
  per-turn seed needs dynamic batching), ``logprobs`` (the engine exposes no logits) and a
  request with a LoRA adapter (the engine has no adapter API in 0.18: only
  ``Generator.set_active_adapter``); with an older onnxruntime-genai, everything;
- ``state``: the model folder being served and its loading; ``metrics``: Prometheus (with the
  Gateway API Inference Extension's names for what routers read);
- ``workers``: thread pools whose threads end when idle, and handing free memory back.

Hostile clients: bodies are parsed off the event loop (``serving``), a client that stops
reading is dropped after ``write_timeout`` (``_protocol``), and once requests stop the server
collects garbage and trims its heap (``_trim_when_idle``).

Adapters: a finetuned build's folder carries ``adapters/<name>.onnx_adapter`` beside its base
model. All of them are loaded at start (``og.Adapters``; one that cannot be loaded, or cannot
generate, stops the server); ``model: "<base>:<name>"`` picks one, ``model: "<base>"`` gets the
base model (its LoRA inputs are optional: with no adapter active it is the base).

SIGTERM stops accepting connections and lets in-flight requests finish for up to
``drain_seconds``. With a drain delay (``OLIVE_DRAIN_DELAY`` seconds), /health answers 503 at once
but the server keeps serving for that long before it stops listening, so that a load balancer's
health checks take it out of rotation first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from builder.serve import serving
from builder.serve.errors import ApiError
from builder.serve.protocol import ChatCompletionRequest, CompletionRequest
from builder.serve.state import ServedModel
from builder.serve.workers import trim_memory

log = logging.getLogger("olive-builder.server")  # one logger for the whole server

MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
BODY_TIMEOUT = 30.0  # seconds a request may take to send its body
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
WRITE_TIMEOUT = 10.0  # seconds a response may wait for its client to read (then the connection is closed)
SEND_BUFFER = 64 * 1024  # bytes the kernel holds for a client past what it has read (SO_SNDBUF)
TRIM_AFTER = 2.0  # seconds without requests after which memory a burst left is handed back
API_KEY_ENV = "OLIVE_BUILDER_API_KEY"
DRAIN_DELAY_ENV = "OLIVE_DRAIN_DELAY"  # seconds /health says 503 before a SIGTERM stops listening


def build_app(state: ServedModel, *, api_key: str | None = None, metrics_need_key: bool = False,
              max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """The Starlette app over ``state``; its lifespan loads the model (in a thread) and closes it."""
    api = _Endpoints(state, api_key=api_key, metrics_need_key=metrics_need_key, max_body_bytes=max_body_bytes,
                     body_timeout=body_timeout)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/metrics", api.prometheus, methods=["GET"]),
        ],
        lifespan=api.lifespan,
    )


class _Endpoints:
    """The routes' handlers: each checks the API key where the route needs one, then serves ``state``."""

    def __init__(self, state: ServedModel, *, api_key: str | None, metrics_need_key: bool, max_body_bytes: int,
                 body_timeout: float):
        self.state, self.metrics = state, state.metrics
        self._api_key = api_key.encode() if api_key else None
        self.metrics_need_key = metrics_need_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self._requests = 0  # completion requests received (the idle trim looks for new ones)
        self._open = 0  # completion requests between arrival and response

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=self.state.load, name="load-model", daemon=True).start()
        watch = asyncio.ensure_future(self.metrics.watch_loop_lag())
        trim = asyncio.ensure_future(self._trim_when_idle())
        yield
        watch.cancel()
        trim.cancel()
        self.state.close()

    async def _trim_when_idle(self) -> None:
        """Once a burst is over (requests came, none for TRIM_AFTER seconds, nothing generating),
        collect garbage and hand the C heap's free pages back (``workers.trim_memory``)."""
        loop = asyncio.get_running_loop()
        trimmed, quiet_since, seen = 0, loop.time(), 0
        while True:
            await asyncio.sleep(TRIM_AFTER / 2)
            scheduler = self.state.scheduler
            if self._requests != seen or self._open or (scheduler is not None and scheduler.busy):
                seen, quiet_since = self._requests, loop.time()
            elif self._requests != trimmed and loop.time() - quiet_since >= TRIM_AFTER:
                trimmed = self._requests
                await loop.run_in_executor(self.state.preparing, _collect_and_trim)

    def _authorize(self, request: Request) -> None:
        """The API-key guard of /v1 (and of /metrics with ``metrics_need_key``): 401 without the key."""
        if self._api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise ApiError(401, "A valid API key is required: send `Authorization: Bearer <key>`.",
                           type_="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- plain endpoints

    async def health(self, request: Request) -> Response:
        if getattr(request.app.state, "draining", False):  # set by run() on SIGTERM with a drain delay
            return JSONResponse({"status": "draining"}, status_code=503)
        body, status = self.state.health()
        return JSONResponse(body, status_code=status)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            self.metrics.requests.labels("/v1/models", str(e.status)).inc()
            return e.response()
        self.metrics.requests.labels("/v1/models", "200").inc()
        state = self.state
        base, *adapters = state.served_ids()
        data: list[dict[str, object]] = [
            {"id": base, "object": "model", "created": state.created, "owned_by": "olive-builder"}]
        # Each adapter is a model of its own for clients; `parent` names its base (as vLLM lists LoRA modules).
        data += [{"id": model, "object": "model", "created": state.created, "owned_by": "olive-builder",
                  "parent": base} for model in adapters]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(self, request: Request) -> Response:
        if self.metrics_need_key:
            try:
                self._authorize(request)
            except ApiError as e:
                return e.response()
        content, media_type = self.metrics.exposition()
        return Response(content, media_type=media_type)

    # -- completions

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest)

    async def _complete(self, request: Request,
                        endpoint: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
        started = time.monotonic()
        self._requests += 1
        self._open += 1
        try:
            self._authorize(request)
            raw = await self._body(request)
            response = await serving.complete(self.state, endpoint, raw, started=started,
                                              disconnected=request.is_disconnected)
        except ApiError as e:
            response = e.response()
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug must still answer in the API's own shape
            log.exception("request to %s failed", endpoint.endpoint)
            response = ApiError(500, f"Internal error: {type(e).__name__}: {e}", type_="server_error").response()
        finally:
            self._open -= 1
        self.metrics.requests.labels(endpoint.endpoint, str(response.status_code)).inc()
        if not isinstance(response, StreamingResponse):
            self.metrics.latency.labels(endpoint.endpoint).observe(time.monotonic() - started)
        return response

    async def _body(self, request: Request) -> bytes:
        """The request's body, within the size limit and the body timeout (parsed later, off the event loop)."""
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
        return b"".join(chunks)


def _collect_and_trim() -> None:
    gc.collect()  # what a burst's cycles hold (exceptions with their frames, parsed bodies)
    trim_memory()


# ---------------------------------------------------------------------------- connections


def _protocol(header_timeout: float, write_timeout: float = WRITE_TIMEOUT,
              dropped: Callable[[], None] = lambda: None) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, with a deadline for each request's headers, and one for a client
    to read what it was sent.

    uvicorn closes idle keep-alive connections only after a first response; a connection that
    never sends a complete request (or sends a byte now and then) would stay open for ever.

    uvicorn has no write timeout: a streaming client that stops reading (the socket buffers
    full, the transport paused) held its generation slot for ever; 60 of them held every slot
    and queue place. When writing stays paused for ``write_timeout`` seconds, the connection is
    dropped: Starlette sees the disconnect, the stream is stopped, its generation cancelled and
    its slot freed. A slow reader that reads at all resumes writing and keeps its connection.
    The kernel's send buffer is fixed at SEND_BUFFER: autotuned (up to 4 MiB on Linux), it took in
    12 s of a stalled stream (~2,400 tokens, ~550 KB) without the writer ever pausing, so a
    stalled client went unnoticed for most of its generation (a 64 KiB buffer still carries
    ~300 KB/s to a client 200 ms away: ample for tokens).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

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
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # asyncio: the transport's buffer is full
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_late)

        def resume_writing(self) -> None:  # asyncio: the client read, the buffer drained
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def _write_late(self) -> None:
            self._write_timer = None
            log.info("dropped a connection whose client read nothing for %g s (--write-timeout)", write_timeout)
            dropped()
            self.transport.abort()  # close() would wait for the unread buffer to flush

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
        use_engine: bool = True, header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
        drain_delay: float | None = None, write_timeout: float = WRITE_TIMEOUT) -> int:
    """Serve the model in ``folder`` until SIGTERM or Ctrl-C: 0 after a clean stop, 1 when the model
    cannot be loaded, 2 for bad options. ``drain_delay`` (default: ``$OLIVE_DRAIN_DELAY``, else 0):
    seconds between SIGTERM and closing the listener, /health answering 503 meanwhile."""
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
    if not write_timeout > 0:
        print(f"error: --write-timeout must be more than 0 seconds, not {write_timeout:g}.", flush=True)
        return 2
    state = ServedModel(folder, model_id=model_id, max_concurrency=max_concurrency, queue_size=queue_size,
                        batch_size=batch_size, use_engine=use_engine)
    app = build_app(state, api_key=api_key, metrics_need_key=metrics_need_key, body_timeout=body_timeout)
    if api_key:
        log.info("API key required on /v1%s", " and /metrics" if metrics_need_key else "")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use the model "
                    "(set --api-key or %s)", host, API_KEY_ENV)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            http=_protocol(header_timeout, write_timeout, state.metrics.stalled_dropped.inc),
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                            timeout_graceful_shutdown=int(drain_seconds), access_log=False)
    userver = uvicorn.Server(config)

    def watch_load() -> None:
        # A server that cannot load its model must not linger: stop, so the container exits non-zero.
        state.load_finished.wait()
        if state.load_error is not None:
            userver.should_exit = True

    threading.Thread(target=watch_load, daemon=True).start()
    delay = drain_delay if drain_delay is not None else float(os.environ.get(DRAIN_DELAY_ENV) or 0)
    stop_listening = userver.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        # Behind a load balancer, closing the listener at once loses requests: a connection the
        # balancer opens just then is reset unanswered (a 502 it may not retry: it cannot tell
        # whether the request started). So first fail /health, keep serving until the balancer's
        # checks have taken this replica out, then stop listening and drain. A second signal stops now.
        if sig == signal.SIGTERM and delay > 0 and not getattr(app.state, "draining", False):
            app.state.draining = True
            log.info("SIGTERM: /health answers 503; closing the listener in %g s", delay)
            timer = threading.Timer(delay, stop_listening, (sig, frame))
            timer.daemon = True
            timer.start()
        else:
            stop_listening(sig, frame)

    userver.handle_exit = handle_exit  # type: ignore[method-assign]  # uvicorn installs it for SIGTERM/SIGINT
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: make that
    # handler a no-op, so a clean drain ends with exit code 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    userver.run()
    return 1 if state.load_error is not None else 0
