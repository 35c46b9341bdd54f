"""The completion endpoints: a parsed request becomes a ``Job`` for the scheduler, and its
generation becomes one JSON response or a stream of server-sent events, in OpenAI's shapes for
chat and legacy completions (tool calls, logprobs and usage included)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from builder.serve.errors import ApiError
from builder.serve.generator import ModelRunner
from builder.serve.metrics import Metrics
from builder.serve.protocol import LARGE_BODY, ApiRequest, ChatCompletionRequest, CompletionRequest, parse_json
from builder.serve.sampling import Finished, Piece
from builder.serve.scheduler import Generation, Job
from builder.serve.state import ServedModel


async def complete(state: ServedModel, endpoint: type[ChatCompletionRequest] | type[CompletionRequest],
                   raw: bytes, *, started: float, disconnected: Callable[[], Awaitable[bool]]) -> Response:
    """Answer one completion request (its body as it arrived): a JSON response, or an SSE stream
    with ``stream: true``."""
    # Parsing, validating, templating and tokenizing take ~0.1-1 s of CPU for a 1 MiB body: off the
    # event loop (which answers /health and streams tokens), in a few threads of their own.
    loop = asyncio.get_running_loop()
    workers = state.preparing if len(raw) < LARGE_BODY else state.preparing_large
    request, ids = await loop.run_in_executor(workers, _prepare, state, endpoint, raw)
    runner, scheduler = state.ready()
    max_tokens = _max_tokens(runner, request, ids)
    generation = scheduler.generate(Job(ids, request.sampling, max_tokens, request.adapter, started))
    rid = request.id_prefix + uuid.uuid4().hex
    if request.stream:
        return _Guarded(_sse(runner, state.metrics, generation, request, rid), generation.release,
                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        text, pieces, finished = await generation.collect(disconnected)
    finally:
        generation.release()
    usage = _usage(len(ids), finished)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finished.reason, "logprobs": None}
    if isinstance(request, ChatCompletionRequest):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = request.tools.parse(text) if request.tools is not None else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
        choice["message"] = message
        if request.sampling.logprobs:
            choice["logprobs"] = {"content": [_chat_logprob(runner, p) for p in pieces]}
    else:
        choice["text"] = text
        if request.sampling.logprobs:
            choice["logprobs"] = _completion_logprobs(runner, pieces)
    return JSONResponse({"id": rid, "object": request.kind, "created": int(time.time()), "model": request.model,
                         "choices": [choice], "usage": usage})


def _prepare(state: ServedModel, endpoint: type[ChatCompletionRequest] | type[CompletionRequest],
             raw: bytes) -> tuple[ApiRequest, list[int]]:
    """The request and its prompt's tokens, from the body's bytes (in a worker thread)."""
    runner, _ = state.ready()
    body = parse_json(raw, context_length=runner.context_length if endpoint.chat else None)
    request = endpoint.parse(body, vocab_size=runner.vocab_size, adapter_of=state.adapter_of,
                             context_length=runner.context_length)
    return request, runner.encode(request.prompt_text(runner))


def _max_tokens(runner: ModelRunner, request: ApiRequest, ids: list[int]) -> int:
    """How many tokens the generation may make: what the request asks for, if the context has room."""
    if not ids:
        raise ApiError(400, "The prompt is empty after tokenization.", param=request.prompt_param)
    room = runner.context_length - len(ids)
    if room <= 0:
        raise ApiError(400, f"This model's maximum context length is {runner.context_length} tokens; "
                            f"the prompt has {len(ids)} tokens.", param=request.prompt_param,
                       code="context_length_exceeded")
    sampling = request.sampling
    if sampling.max_tokens is not None and sampling.max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {runner.context_length} tokens; "
                            f"the prompt has {len(ids)} and max_tokens asks for {sampling.max_tokens} more "
                            f"({room} fit).", param="max_tokens", code="context_length_exceeded")
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
    if sampling.min_tokens > max_tokens:
        raise ApiError(400, "`min_tokens` must not exceed `max_tokens`.", param="min_tokens")
    return max_tokens


class _Guarded(StreamingResponse):
    """A streaming response that always gives its admission ticket back, even if never iterated."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # A stream cut short (the client left, or stopped reading past the write timeout) is
                # stopped here, not when the garbage collector gets to it: its generation ends and
                # its slot is free at once.
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()
            finally:
                self._release()


async def _sse(runner: ModelRunner, metrics: Metrics, generation: Generation, request: ApiRequest,
               rid: str) -> AsyncIterator[str]:
    chat = isinstance(request, ChatCompletionRequest)
    tools = request.tools if isinstance(request, ChatCompletionRequest) else None
    sampling, usage = request.sampling, request.usage
    prompt_tokens = len(generation.job.ids)
    created = int(time.time())
    # With tools offered, the whole answer decides whether it is a call: hold it until the end.
    hold = tools is not None and tools.choice != "none"
    produced = 0  # tokens generated so far (the usage of vLLM's continuous_usage_stats)

    def event(choice: dict[str, Any], final: dict[str, Any] | None = None) -> str:
        data: dict[str, Any] = {"id": rid, "object": request.chunk_kind, "created": created, "model": request.model,
                                "choices": [choice] if choice else []}
        if final is not None:
            data["usage"] = final
        elif usage.continuous:
            data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                             "total_tokens": prompt_tokens + produced}
        elif usage.include:
            data["usage"] = None  # as OpenAI: every chunk but the last has `usage: null`
        return f"data: {json.dumps(data)}\n\n"

    def piece(text: str, finish: str | None = None, pieces: list[Piece] | None = None) -> dict[str, Any]:
        logprobs: Any = None
        if sampling.logprobs and pieces:
            logprobs = ({"content": [_chat_logprob(runner, p) for p in pieces]} if chat
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
        async for text, pieces in generation.texts():
            produced += len(pieces)
            if hold:
                held.extend(pieces)
            elif text or sampling.logprobs:
                yield event(piece(text, pieces=pieces))
        finished = generation.finished
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
        total = _usage(prompt_tokens, finished)
        yield event(piece("", reason), total if usage.continuous else None)
        if usage.include:
            yield event({}, total)
        yield "data: [DONE]\n\n"
    finally:
        generation.abort()  # a client that went away stops its generation
        metrics.latency.labels(request.endpoint).observe(time.monotonic() - generation.job.started)


def _usage(prompt: int, finished: Finished) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": finished.completion_tokens,
            "total_tokens": prompt + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens}}


def _chat_logprob(runner: ModelRunner, piece: Piece) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = runner.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    item = entry(piece.token, piece.logprob if piece.logprob is not None else 0.0)
    item["top_logprobs"] = [entry(t, lp) for t, lp in piece.top or []]
    return item


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
