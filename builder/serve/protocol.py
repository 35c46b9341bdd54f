"""The API's requests: one typed class per endpoint (``ChatCompletionRequest``,
``CompletionRequest``), each parsed and validated from the JSON body into the sampling
parameters its generation runs with. Every refusal is an ``ApiError`` (400) that names the field.

Nothing here knows the model beyond its vocabulary size and which ids it serves.
"""

from __future__ import annotations

import gc
import json
import json.scanner
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from builder.serve.errors import ApiError
from builder.serve.sampling import INT32_MAX, Sampling
from builder.serve.tools import ToolPlan, guidance, tool_plan

MAX_STOP_SEQUENCES = 4
MAX_JSON_DEPTH = 32  # request bodies are shallow; deeper ones are refused before any recursion can fail
MAX_TOP_LOGPROBS = 20
LARGE_BODY = 64 * 1024  # bytes from which a body is decoded by the GIL-yielding decoder (parse_json)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ChatTemplate(Protocol):
    """What renders a chat into the model's prompt (the loaded model's tokenizer)."""

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str: ...


@dataclass
class CompletionRequest:
    """``POST /v1/completions``: a prompt to continue."""

    endpoint: ClassVar[str] = "/v1/completions"
    chat: ClassVar[bool] = False
    kind: ClassVar[str] = "text_completion"  # the response's `object`
    chunk_kind: ClassVar[str] = "text_completion"  # a streamed chunk's `object`
    id_prefix: ClassVar[str] = "cmpl-"
    prompt_param: ClassVar[str] = "prompt"  # the field an error about the prompt names

    model: str  # the id the client asked for
    adapter: str | None  # the adapter that id names (None: the base model)
    sampling: Sampling
    stream: bool
    usage: Usage
    prompt: str

    @classmethod
    def parse(cls, body: dict[str, Any], *, vocab_size: int, adapter_of: Callable[[str], str | None],
              context_length: int | None = None) -> CompletionRequest:
        """Validate ``body``; ``adapter_of`` maps the requested model id to its adapter (or refuses it)."""
        model, adapter, sampling, stream, usage = _common(body, chat=False, vocab_size=vocab_size,
                                                          adapter_of=adapter_of)
        return cls(model, adapter, sampling, stream, usage, _prompt(body))

    def prompt_text(self, template: ChatTemplate) -> str:
        return self.prompt


@dataclass
class ChatCompletionRequest:
    """``POST /v1/chat/completions``: messages, maybe tools, answered as the assistant."""

    endpoint: ClassVar[str] = "/v1/chat/completions"
    chat: ClassVar[bool] = True
    kind: ClassVar[str] = "chat.completion"
    chunk_kind: ClassVar[str] = "chat.completion.chunk"
    id_prefix: ClassVar[str] = "chatcmpl-"
    prompt_param: ClassVar[str] = "messages"

    model: str
    adapter: str | None
    sampling: Sampling
    stream: bool
    usage: Usage
    messages: list[dict[str, Any]]
    tools: ToolPlan | None

    @classmethod
    def parse(cls, body: dict[str, Any], *, vocab_size: int, adapter_of: Callable[[str], str | None],
              context_length: int | None = None) -> ChatCompletionRequest:
        """Validate ``body``; ``adapter_of`` maps the requested model id to its adapter (or refuses it);
        a chat of more messages than ``context_length`` cannot fit and is refused before templating."""
        model, adapter, sampling, stream, usage = _common(body, chat=True, vocab_size=vocab_size,
                                                          adapter_of=adapter_of)
        tools = tool_plan(body)
        messages = _messages(body, context_length)
        if tools is not None and tools.guidance is not None:
            if sampling.guidance is not None:
                raise ApiError(400, "`response_format` cannot be combined with a required tool call.",
                               param="response_format")
            sampling.guidance = tools.guidance
        return cls(model, adapter, sampling, stream, usage, messages, tools)

    def prompt_text(self, template: ChatTemplate) -> str:
        offered = self.tools.tools if self.tools and self.tools.choice != "none" else None
        return template.chat_prompt(self.messages, offered)


ApiRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Usage:
    """Where a stream reports usage: a last chunk (``include_usage``), and every chunk (``continuous``)."""

    include: bool
    continuous: bool


def _common(body: dict[str, Any], *, chat: bool, vocab_size: int, adapter_of: Callable[[str], str | None],
            ) -> tuple[str, str | None, Sampling, bool, Usage]:
    """The fields both endpoints share, checked in the order the API has always refused them."""
    _check_fields(body, chat=chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required: a string.", param="model")
    adapter = adapter_of(model)
    sampling = _sampling(body, chat=chat, vocab_size=vocab_size)
    stream = _optional(body, "stream", "bool", False)
    return model, adapter, sampling, stream, _stream_options(body, stream)


def _stream_options(body: dict[str, Any], stream: bool) -> Usage:
    """``stream_options``: ``include_usage`` (OpenAI: a last chunk with the usage) and vLLM's
    ``continuous_usage_stats`` (the usage so far in every chunk too; as in vLLM, only with ``include_usage``)."""
    options = body.get("stream_options")
    if options is None:
        return Usage(False, False)
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object (`include_usage`, `continuous_usage_stats`).",
                       param="stream_options")
    for name, value in options.items():
        if name not in ("include_usage", "continuous_usage_stats") and value is not None:
            raise ApiError(400, f"`stream_options.{name}` is not a field this server supports (it takes "
                                "`include_usage` and `continuous_usage_stats`).", param=f"stream_options.{name}",
                           code="unsupported_parameter")
    if not stream:
        raise ApiError(400, "`stream_options` is only allowed with `stream: true`.", param="stream_options")
    include = _optional(options, "include_usage", "bool", False)
    continuous = _optional(options, "continuous_usage_stats", "bool", False)
    return Usage(include, include and continuous)


def parse_json(raw: bytes, *, context_length: int | None = None) -> dict[str, Any]:
    """The body as a JSON object, checked for what nothing downstream can take; with ``context_length``
    (chat), a chat that cannot fit is refused first, before the walk over every value."""
    try:
        body = json.loads(raw) if len(raw) < LARGE_BODY else _decode_yielding(raw)
    except RecursionError:
        raise ApiError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if isinstance(messages, list):
        _check_message_count(messages, context_length)
    _check_json(body, "", 0)
    return body


def _decode_yielding(raw: bytes) -> Any:
    """``json.loads``, with the stdlib's pure-Python scanner (strings still decoded in C).

    The C decoder holds the GIL from start to end: measured on 2 cores, 27 ms for 1 MiB of
    30,000 small messages, ~0.4 s for 1 MiB of nested empty arrays, while the event loop (which
    answers /health and streams every client's tokens) waits. The Python scanner lets other
    threads run every switch interval (5 ms), at 3-4x the CPU for bodies of many small values
    and the same for text. The garbage collector is paused meanwhile: a full collection amid
    300,000 new lists is a GIL-holding pause of its own (and JSON makes no cycles).
    """
    decoder = json.JSONDecoder()
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads decodes bytes
    collecting = gc.isenabled()
    gc.disable()
    try:
        return decoder.decode(text)
    finally:
        if collecting:
            gc.enable()


def _check_message_count(messages: list[Any], context_length: int | None) -> None:
    # Every message takes at least a token of the chat template's: more messages than the context
    # has tokens cannot fit. Refused before anything walks them (30,000 messages: ~0.1 s to check,
    # ~0.6 s to render, and onnxruntime-genai renders a template holding the GIL).
    if context_length is not None and len(messages) > context_length:
        raise ApiError(400, f"This model's maximum context length is {context_length} tokens; the chat has "
                            f"{len(messages)} messages, and each takes at least one.", param="messages",
                       code="context_length_exceeded")


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
    """The request's sampling parameters, each checked to a range the binding accepts."""
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
                    guidance=guidance(body, chat=chat), logprobs=logprobs, top_logprobs=top_logprobs)




def _messages(body: dict[str, Any], context_length: int | None = None) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` is required: a non-empty array of {role, content} objects.", param="messages")
    _check_message_count(messages, context_length)
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
            content = "\n".join(str(t) for t in texts)  # as vLLM joins text parts
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
