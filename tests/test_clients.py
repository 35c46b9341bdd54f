"""The clients people use, against a real server process serving the tiny model on loopback.

Each client's answer is held to the server's own answer for the same request sent raw (greedy
decoding makes it exact): the `openai` Python client where tests/test_server.py does not already
cover it (content parts, the developer role, `parse`, the stream helper, the async client, errors),
the `openai` npm client run with node (tests/clients/, installed by .ci/run with `npm ci`), litellm
and langchain-openai (neither may reach the network: the cost map and tracing stay local), and the
request bodies of the vLLM ecosystem's load-testing clients (`vllm bench serve`, guidellm), sent
raw: content as a list of text parts, `ignore_eos`, `min_tokens` and
`stream_options.continuous_usage_stats` (usage in every chunk). What the server cannot honour is
a 400 that names the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from conftest import need
from test_server import MODEL_ID, Running, chat_ids, serve, served_model  # noqa: F401 (served_model: a fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "clients"
# Where .ci/run installs the npm client (`npm ci` from tests/clients/package-lock.json).
NPM_CLIENTS = Path(os.environ.get("OLIVE_BUILDER_NPM_CLIENTS") or REPO / ".ci-state" / "npm-clients" / "node_modules")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
HI = [{"role": "user", "content": "hi"}]  # the random model ends this one with EOS after a few tokens
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def server(served_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:  # noqa: F811
    with serve(served_model, tmp_path_factory.mktemp("clients-server"), "--max-concurrency", "2") as running:
        yield running


def raw(server: Running, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The server's answer to ``body`` sent as plain HTTP: the reference every client is held to."""
    code, _, answer = server.post(path, body)
    assert code == 200, answer
    return answer


def raw_events(server: Running, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed answer's events, read the way the load-testing clients read them (``data: `` lines)."""
    code, headers, data = server.request("POST", path, json.dumps(body))
    assert code == 200 and headers["content-type"].startswith("text/event-stream"), data[:500]
    lines = [line[len("data: "):] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


# A process-wide record of connection attempts (audit hooks cannot be removed, so one is installed
# once and records only while a test watches): litellm fetches its cost map from GitHub and
# LangChain traces to LangSmith unless told not to; neither may leave the machine here.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_outbound: list[object] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    seen = _outbound  # read once: another thread may stop the watch meanwhile
    if seen is None:
        return
    if event == "socket.connect":
        if not isinstance(args[1], tuple):
            return  # a Unix socket
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if (host.decode() if isinstance(host, bytes) else host) not in LOOPBACK:
        seen.append((event, args[:2]))  # list.append is atomic


@contextlib.contextmanager
def no_outbound_connections() -> Iterator[None]:
    """Fail if anything in this process connects (or resolves a name) beyond loopback meanwhile."""
    global _outbound, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _outbound = []
    try:
        yield
        assert _outbound == [], f"a client tried to reach the network: {_outbound}"
    finally:
        _outbound = None


# ----------------------------------------------------------------------------- openai (Python)


@pytest.fixture(scope="module")
def openai_client(server: Running) -> Any:
    need(_has("openai"), "the openai package is not installed")
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_python_content_parts_and_the_developer_role(server: Running, openai_client: Any,
                                                           served_model: Path) -> None:  # noqa: F811
    """What newer SDKs and agent frameworks send: a `developer` message (the system's role) and
    content as text parts (joined with newlines, as vLLM joins them)."""
    plain = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a\ncolor."}]
    reference = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": plain, "max_tokens": 12,
                                                     "temperature": 0})
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "color."}]}]
    r = openai_client.chat.completions.create(model=MODEL_ID, messages=parts, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == reference["choices"][0]["message"]["content"] != ""
    assert r.usage.prompt_tokens == reference["usage"]["prompt_tokens"] == len(chat_ids(served_model, plain))
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (12, "length")


def test_openai_python_parse_stream_helper_async_and_errors(server: Running, openai_client: Any) -> None:
    import openai
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: Literal["bob", "al"]
        age: int = Field(ge=0, le=99)

    # `parse`: the SDK turns a pydantic model into a strict json_schema and parses the answer back.
    parsed = openai_client.chat.completions.parse(model=MODEL_ID, messages=MESSAGES, response_format=Person,
                                                  max_tokens=60, temperature=0)
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop" and isinstance(message.parsed, Person)
    assert message.parsed == Person.model_validate_json(message.content)

    # The stream helper assembles the chunks itself (and refuses an answer cut by the limit: "hi" ends with EOS).
    reference = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": HI, "max_tokens": 200,
                                                     "temperature": 0})
    assert reference["choices"][0]["finish_reason"] == "stop"
    with openai_client.chat.completions.stream(model=MODEL_ID, messages=HI, max_tokens=200, temperature=0,
                                               stream_options={"include_usage": True}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert final.choices[0].message.content == deltas == reference["choices"][0]["message"]["content"] != ""
    assert final.usage.completion_tokens == reference["usage"]["completion_tokens"]

    async def streamed() -> str:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        async with client:
            chunks = await client.chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=200,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    assert asyncio.run(streamed()) == reference["choices"][0]["message"]["content"]

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL_ID, messages=HI, n=2)
    assert (info.value.status_code, info.value.param, info.value.type) == (400, "n", "invalid_request_error")
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="gpt-4o", messages=HI)


# ----------------------------------------------------------------------------- openai (npm, with node)


def _npm_client() -> tuple[str, Path]:
    node = shutil.which("node")
    need(node is not None, "node is not installed (.ci/run installs nodejs and npm)")
    assert node is not None
    installed = NPM_CLIENTS / "openai" / "package.json"
    need(installed.is_file(), f"the npm openai client is not installed at {NPM_CLIENTS} (.ci/run installs it: "
                              f"cp tests/clients/package*.json .ci-state/npm-clients/ && (cd .ci-state/npm-clients "
                              "&& npm ci); or point OLIVE_BUILDER_NPM_CLIENTS at a node_modules folder)")
    locked = json.loads((CLIENTS / "package-lock.json").read_text())["packages"]["node_modules/openai"]["version"]
    version = json.loads(installed.read_text())["version"]
    assert version == locked, f"{NPM_CLIENTS} holds openai {version}, the lock file pins {locked}: run npm ci again"
    return node, NPM_CLIENTS


def test_openai_npm_client(server: Running) -> None:
    node, modules = _npm_client()
    chat = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    completion = {"model": MODEL_ID, "prompt": "the model build", "max_tokens": 8, "temperature": 0}
    tool = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 60,
            "temperature": 0, "tools": [WEATHER], "tool_choice": "required"}
    plan = {"baseURL": server.url + "/v1", "apiKey": "unused", "chat": chat, "completion": completion,
            "tool": tool, "bad": {**chat, "n": 2}}
    proc = subprocess.run([node, str(CLIENTS / "openai_client.cjs")], input=json.dumps(plan), capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NODE_PATH": str(modules)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    ref_chat = raw(server, "/v1/chat/completions", chat)
    text, usage = ref_chat["choices"][0]["message"]["content"], ref_chat["usage"]
    assert out["models"] == [MODEL_ID]
    assert out["chat"] == {"object": "chat.completion", "model": MODEL_ID, "role": "assistant", "content": text,
                           "finishReason": "length", "usage": usage}
    assert text and usage["completion_tokens"] == 12
    stream = out["stream"]
    assert (stream["firstRole"], stream["text"], stream["finishReasons"]) == ("assistant", text, ["length"])
    assert stream["usage"] == usage and stream["chunks"] > 3
    assert out["helper"] == {"content": text, "finishReason": "length", "deltas": text}
    ref_completion = raw(server, "/v1/completions", completion)
    assert out["completion"] == {"text": ref_completion["choices"][0]["text"], "finishReason": "length",
                                 "usage": ref_completion["usage"]}
    ref_call = raw(server, "/v1/chat/completions", tool)["choices"][0]["message"]["tool_calls"][0]
    (call,) = out["tool"]["calls"]
    assert out["tool"]["finishReason"] == "tool_calls" and out["tool"]["content"] is None
    assert (call["type"], call["name"]) == ("function", ref_call["function"]["name"]) and call["id"]
    assert json.loads(call["arguments"]) == json.loads(ref_call["function"]["arguments"])
    assert out["bad"]["status"] == 400 and out["bad"]["param"] == "n" and "n=1" in out["bad"]["message"]
    print(f"npm openai {out['version']} on node {out['node']}")


# ----------------------------------------------------------------------------- litellm


@pytest.fixture(scope="module")
def litellm() -> Iterator[Any]:
    need(_has("litellm"), "litellm is not installed (pip install -e '.[test]')")
    with pytest.MonkeyPatch.context() as mp:
        # Read when the cost map is first used (and at import): the map bundled with the package,
        # never the one on GitHub; LITELLM_OFFLINE_MODE covers its other fetched catalogs.
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        mp.setenv("LITELLM_OFFLINE_MODE", "true")
        with no_outbound_connections():
            import litellm

        yield litellm


def test_litellm_completion_and_stream(server: Running, litellm: Any) -> None:
    reference = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 12,
                                                     "temperature": 0})
    text = reference["choices"][0]["message"]["content"]
    options = {"model": f"openai/{MODEL_ID}", "api_base": server.url + "/v1", "api_key": "unused",
               "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "num_retries": 0}
    with no_outbound_connections():
        r = litellm.completion(**options)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (reference["usage"]["prompt_tokens"], 12)
        chunks = list(litellm.completion(**options, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert [c.usage.completion_tokens for c in chunks if getattr(c, "usage", None)] == [12]
        # What cost accounting reads: from the bundled map, without a download.
        assert len(litellm.model_cost) > 100


# ----------------------------------------------------------------------------- langchain-openai


@pytest.fixture(scope="module")
def chat_model(server: Running) -> Iterator[Any]:
    need(_has("langchain_openai"), "langchain-openai is not installed (pip install -e '.[test]')")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2"):
            mp.setenv(name, "false")
        from langchain_openai import ChatOpenAI

        def make(max_tokens: int) -> Any:
            return ChatOpenAI(base_url=server.url + "/v1", model=MODEL_ID, api_key="unused", max_tokens=max_tokens,
                              temperature=0, max_retries=0)

        yield make


def test_langchain_invoke_and_stream(server: Running, chat_model: Any) -> None:
    reference = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 12,
                                                     "temperature": 0})
    text = reference["choices"][0]["message"]["content"]
    conversation = [("system", "You are terse."), ("human", "Name a color.")]
    with no_outbound_connections():
        answer = chat_model(12).invoke(conversation)
        assert answer.content == text and answer.response_metadata["finish_reason"] == "length"
        assert answer.usage_metadata["input_tokens"] == reference["usage"]["prompt_tokens"]
        assert answer.usage_metadata["output_tokens"] == 12
        chunks = list(chat_model(12).stream(conversation, stream_usage=True))
        total = chunks[0]
        for chunk in chunks[1:]:
            total = total + chunk
        assert total.content == text and len(chunks) > 3
        assert total.usage_metadata["output_tokens"] == 12


def test_langchain_tools_and_structured_output(server: Running, chat_model: Any) -> None:
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: Literal["bob", "al"]
        age: int = Field(ge=0, le=99)

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    reference = raw(server, "/v1/chat/completions", {
        "model": MODEL_ID, "messages": ask, "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    ref_call = reference["choices"][0]["message"]["tool_calls"][0]["function"]
    with no_outbound_connections():
        answer = chat_model(60).bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
        assert answer.response_metadata["finish_reason"] == "tool_calls"
        (call,) = answer.tool_calls
        assert (call["name"], call["args"]) == ("get_weather", json.loads(ref_call["arguments"]))
        for method in ("json_schema", "function_calling"):
            out = chat_model(60).with_structured_output(Person, method=method, include_raw=True).invoke("A person")
            assert out["parsing_error"] is None and isinstance(out["parsed"], Person), (method, out)
            sent = out["raw"].tool_calls[0]["args"] if method == "function_calling" else json.loads(out["raw"].content)
            assert out["parsed"] == Person.model_validate(sent)


# ----------------------------------------------------------------------------- vLLM's load-testing clients


def test_vllm_bench_chat_request(server: Running) -> None:
    """`vllm bench serve --backend openai-chat --ignore-eos`: content as text parts, max_completion_tokens,
    usage at the end; it counts output tokens from that usage and must get exactly what it asked for.
    (It sends no temperature: the model's default, greedy for this model, as the load-testing bodies below.)"""
    output_len = 40
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": output_len, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    natural = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": HI, "max_tokens": output_len,
                                                   "temperature": 0})
    assert natural["usage"]["completion_tokens"] < output_len  # EOS comes first without ignore_eos
    events = raw_events(server, "/v1/chat/completions", body)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    usage = [e["usage"] for e in events if not e["choices"]]
    assert usage[-1]["completion_tokens"] == output_len
    assert usage[-1]["prompt_tokens"] == natural["usage"]["prompt_tokens"]
    assert text.startswith(natural["choices"][0]["message"]["content"]) and len(text) > len(
        natural["choices"][0]["message"]["content"])


def test_vllm_bench_completions_request(server: Running) -> None:
    """`vllm bench serve --backend vllm`: the legacy endpoint, with the defaults it always sends."""
    body = {"model": MODEL_ID, "prompt": "the model build", "repetition_penalty": 1.0, "max_tokens": 30,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    events = raw_events(server, "/v1/completions", body)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    (usage,) = [e["usage"] for e in events if not e["choices"]]
    reference = raw(server, "/v1/completions", {**body, "stream": False, "stream_options": None})
    assert text == reference["choices"][0]["text"] != "" and usage == reference["usage"]
    assert usage["completion_tokens"] == 30


def test_min_tokens_holds_eos_back(server: Running) -> None:
    natural = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": HI, "max_tokens": 200,
                                                   "temperature": 0})
    n = natural["usage"]["completion_tokens"]
    assert natural["choices"][0]["finish_reason"] == "stop" and n < 150
    held = raw(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": HI, "max_tokens": 200,
                                                "temperature": 0, "min_tokens": n + 10})
    assert held["usage"]["completion_tokens"] >= n + 10
    # Greedy: the same first tokens, then more where EOS was.
    text, first = held["choices"][0]["message"]["content"], natural["choices"][0]["message"]["content"]
    assert text.startswith(first) and len(text) > len(first)


GUIDELLM_CHAT = {"model": MODEL_ID, "stream": True,
                 "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                 "max_completion_tokens": 24, "stop": None, "ignore_eos": True,
                 "messages": [{"role": "system", "content": "You are terse."},
                              {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]}
GUIDELLM_COMPLETIONS = {"model": MODEL_ID, "stream": True,
                        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                        "max_tokens": 24, "stop": None, "ignore_eos": True, "prompt": "the model build"}


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", GUIDELLM_CHAT),
                                            ("/v1/completions", GUIDELLM_COMPLETIONS)], ids=["chat", "completions"])
def test_continuous_usage_stats_put_usage_in_every_chunk(server: Running, path: str, body: dict[str, Any]) -> None:
    """guidellm's request (and vLLM's semantics): with `include_usage` and `continuous_usage_stats`,
    every chunk carries the usage so far, and a last chunk without choices the final usage."""
    chat = path.endswith("chat/completions")
    events = raw_events(server, path, body)
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    reference = raw(server, path, plain)
    prompt = reference["usage"]["prompt_tokens"]
    assert all(isinstance(e.get("usage"), dict) for e in events), [e.get("usage") for e in events]
    for e in events:
        u = e["usage"]
        assert u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"], u
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 24  # ignore_eos: exactly max_tokens
    *chunks, last = events
    assert last["choices"] == []
    if chat:
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant" and counts[0] == 0
    pieces = [(e["choices"][0]["delta"].get("content") if chat else e["choices"][0]["text"]) or "" for e in chunks]
    assert "".join(pieces) == (reference["choices"][0]["message"]["content"] if chat
                               else reference["choices"][0]["text"])
    # Each chunk that brings text brings at least one token more than the one before it.
    with_text = [e["usage"]["completion_tokens"] for e, p in zip(chunks, pieces, strict=True) if p]
    assert len(with_text) > 3 and all(b > a for a, b in zip(with_text, with_text[1:], strict=False)), with_text
    finishing = [e for e in chunks if e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in finishing] == ["length"]
    assert finishing[0]["usage"]["completion_tokens"] == 24


def test_continuous_usage_stats_need_include_usage(server: Running) -> None:
    """As in vLLM: `continuous_usage_stats` alone adds nothing (usage is asked for by `include_usage`)."""
    events = raw_events(server, "/v1/chat/completions", {**GUIDELLM_CHAT, "stream_options": {
        "continuous_usage_stats": True}})
    assert events and all(e.get("usage") is None for e in events)
    assert all(e["choices"] for e in events)


# ----------------------------------------------------------------------------- what cannot be honoured

CHAT = {"model": MODEL_ID, "messages": HI, "max_tokens": 2}
REFUSED = [
    # sent by the clients above when asked for what a single-sequence text server cannot do
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True,
                                                                         "include_obfuscation": False}},
     "stream_options"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 2, 3]}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), REFUSED, ids=[f"{p.split('/')[2]}-{f}" for p, _, f in REFUSED])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(server: Running, path: str, body: dict[str, Any],
                                                           param: str) -> None:
    code, _, answer = server.post(path, body)
    error = answer["error"]
    assert code == 400 and error["type"] == "invalid_request_error", answer
    assert error["param"] is not None and error["param"].startswith(param), error
    assert param.split("[")[0] in error["message"], error
