"""Tools and guidance: the ``tools`` / ``tool_choice`` fields of a chat request as a ``ToolPlan``
(what the prompt offers, the guidance a required call needs, how the answer is read back as
tool calls), and ``response_format`` / ``guided_regex`` / ``guided_json`` as onnxruntime-genai
guidance specs."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from builder.serve.errors import ApiError

# Compact JSON: no free whitespace. Small models otherwise emit whitespace until the token limit.
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def compact_schema(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}})


def guidance(body: dict[str, Any], *, chat: bool) -> tuple[str, str] | None:
    """``response_format`` (chat) and vLLM's ``guided_regex`` / ``guided_json`` as onnxruntime-genai guidance."""
    chosen: list[tuple[str, tuple[str, str]]] = []
    fmt = body.get("response_format") if chat else None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            pass
        elif kind == "json_object":
            chosen.append(("response_format", ("json_schema", compact_schema({"type": "object"}))))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "`response_format.json_schema` must be an object with a `schema` object.",
                               param="response_format.json_schema")
            chosen.append(("response_format", ("json_schema", compact_schema(spec.get("schema") or {}))))
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
        chosen.append(("guided_json", ("json_schema", compact_schema(schema))))
    if len(chosen) > 1:
        raise ApiError(400, f"Only one of {', '.join(f'`{n}`' for n, _ in chosen)} may be given.", param=chosen[1][0])
    return chosen[0][1] if chosen else None


@dataclass
class ToolPlan:
    """The tools a chat request offers, and how its answer is read."""

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


def tool_plan(body: dict[str, Any]) -> ToolPlan | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request; None without tools."""
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
    required = None
    if kind in ("required", "function"):
        # A required call is constrained decoding: one JSON object {name, arguments} valid for a tool.
        options = [{"type": "object", "properties": {"name": {"const": n}, "arguments": schemas[n]},
                    "required": ["name", "arguments"], "additionalProperties": False} for n in wanted]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        required = ("json_schema", compact_schema(schema))
    return ToolPlan(tools=tools, choice=kind, names=wanted, guidance=required)
