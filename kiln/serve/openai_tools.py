"""Function calling on /v1/chat/completions.

With `tool_choice: "required"` or a named function, the answer is generated under a JSON
schema (structured output) of `{"name": <one of the functions>, "arguments": <its
parameters schema>}`, so it is always a well-formed call, and is returned as OpenAI's
`tool_calls`. The tools also go to the model's chat template (`tools`), for templates
that describe them to the model.

`tool_choice: "auto"` (OpenAI's default when tools are given): the model answers freely,
and the answer is read as tool calls when it is written in one of the formats chat
models are trained to call tools with (parse_tool_calls): Hermes / Qwen / SmolLM
`<tool_call>{...}</tool_call>` blocks (text around them stays the message content), or a
whole answer that is one JSON call or a list of them, optionally after Llama 3.1's
`<|python_tag|>` or inside a ```json fence. A call names one of the request's functions
and has `arguments` (or `parameters`) that are an object; anything else is plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from kiln.serve.errors import APIError


def _functions(tools: list[Any]) -> list[dict[str, Any]]:
    functions = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, "each tool must be {'type': 'function', 'function': {'name': "
                           "..., 'parameters': {...}}}", param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools: parameters of {function['name']!r} must be a JSON "
                           "schema object", param="tools")
        functions.append(function)
    return functions


def forced_tools(body: Any) -> list[dict[str, Any]] | None:
    """The functions one of which the answer must call, or None for a plain answer."""
    tools, choice = getattr(body, "tools", None), getattr(body, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    if choice == "none":
        return None
    if choice == "required":
        return functions
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "a named tool_choice is {'type': 'function', 'function': "
                           "{'name': ...}}, the name of one of the tools", param="tool_choice")
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                           param="tool_choice")
        return named
    if choice in (None, "auto"):
        return None  # free text, read for calls afterwards (auto_tools, parse_tool_calls)
    raise APIError(400, f"tool_choice {choice!r} is not one of none, auto, required or a "
                   "named function", param="tool_choice")


def tool_call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """{"name": ..., "arguments": ...} of one of the functions. Each one's parameters move
    into it, so their references into themselves ("#/$defs/...", as pydantic writes
    nested models) are made to point to where the parameters now lie."""
    where = ["#/properties/arguments"] if len(functions) == 1 else \
        [f"#/anyOf/{i}/properties/arguments" for i in range(len(functions))]
    options = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": _moved(f.get("parameters") or {"type": "object"}, at)},
        "required": ["name", "arguments"], "additionalProperties": False}
        for f, at in zip(functions, where)]
    return options[0] if len(options) == 1 else {"anyOf": options}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_VALUES = ("const", "enum", "default", "examples")  # JSON values, not schemas


def _moved(node: Any, to: str) -> Any:
    """A schema (or a list of them) with its references "#" and "#/..." put under `to`."""
    if isinstance(node, list):
        return [_moved(n, to) for n in node]
    if not isinstance(node, dict):
        return node
    moved = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or
                                                         value.startswith("#/")):
            value = to + value[1:]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: _moved(schema, to) for name, schema in value.items()}
        elif key not in _VALUES:
            value = _moved(value, to)
        moved[key] = value
    return moved


def tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The generated call (JSON under tool_call_schema) as OpenAI's tool_calls, or None
    when the text is not a whole call: `max_tokens`, a `stop` string or a
    `stop_token_ids` token cut it short (the answer is then that text)."""
    try:
        call = json.loads(text)
    except (ValueError, RecursionError):  # (JSON nested deeper than Python parses)
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or \
            "arguments" not in call:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"],
                          "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]


def auto_tools(body: Any) -> list[dict[str, Any]] | None:
    """The functions a free answer may call (tool_choice "auto" or unset, with tools)."""
    tools, choice = getattr(body, "tools", None), getattr(body, "tool_choice", None)
    return _functions(tools) if tools and choice in (None, "auto") else None


# Openings of an answer that may be a call: held back while streaming until it is clear.
CALL_OPENINGS = ("<tool_call>", "<|python_tag|>", "```", "{", "[")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_tool_calls(text: str, functions: list[dict[str, Any]]
                     ) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a free answer: ([], the text) when it holds no call."""
    names = {f["name"] for f in functions}

    def call(obj: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": obj["name"],
                             "arguments": json.dumps(args, ensure_ascii=False)}}

    def load(s: str) -> Any:
        try:
            return json.loads(s)
        except (ValueError, RecursionError):  # a free answer of a thousand "[" is text
            return None

    tagged = _TAGGED.findall(text)
    if tagged:
        calls = [call(load(body)) for body in tagged]
        if all(calls):
            return unsent_content(text), calls  # type: ignore[return-value]
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    fenced = _FENCE.match(body)
    obj = load(fenced.group(1) if fenced else body)
    objs = obj if isinstance(obj, list) and obj else [obj]
    calls = [call(o) for o in objs]
    if all(calls):
        return None, calls  # type: ignore[return-value]
    return text, []


def may_open_call(text: str) -> bool:
    """Whether a streamed answer so far could still turn out to be a call."""
    s = text.lstrip()
    return any(s.startswith(o) or o.startswith(s) for o in CALL_OPENINGS)


def visible_text(text: str) -> str:
    """The part of a free answer so far that a stream can send: it cannot belong to a
    call, nor be whitespace that parse_tool_calls strips from content around calls."""
    if may_open_call(text):
        return ""
    tag = "<tool_call>"
    at = text.find(tag)
    if at < 0:
        at = len(text) - next((k for k in range(len(tag) - 1, 0, -1)
                               if text.endswith(tag[:k])), 0)
    return text[:at].rstrip()


def unsent_content(text: str, sent: int = 0) -> str | None:
    """The content around a free answer's tagged calls (the text without them, without
    trailing whitespace, and without leading whitespace unless text comes before the first
    call) that a stream has not sent yet, having sent text[:sent] (visible_text)."""
    rest = _TAGGED.sub("", text[sent:]).rstrip()
    before = text[:text.find("<tool_call>")]
    return (rest if before.strip() else rest.lstrip()) or None
