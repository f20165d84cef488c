"""Function calling on /v1/chat/completions with a forced tool choice.

With `tool_choice: "required"` or a named function, the answer is generated under a JSON
schema (structured output) of `{"name": <one of the functions>, "arguments": <its
parameters schema>}`, so it is always a well-formed call, and is returned as OpenAI's
`tool_calls`. The tools also go to the model's chat template (`tools`), for templates
that describe them to the model. `tool_choice: "auto"` (OpenAI's default when tools are
given) needs a per-model parser of free text that kiln does not have: it is a 400 that
says what to send instead.
"""

from __future__ import annotations

import json
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
        name = (choice.get("function") or {}).get("name")
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                           param="tool_choice")
        return named
    if choice in (None, "auto"):
        raise APIError(400, "tool_choice 'auto' is not supported (kiln has no parser for "
                       "free-text tool calls); send tool_choice 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    raise APIError(400, f"tool_choice {choice!r} is not one of none, auto, required or a "
                   "named function", param="tool_choice")


def tool_call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    options = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_calls(text: str) -> list[dict[str, Any]]:
    """The generated call (JSON under tool_call_schema) as OpenAI's tool_calls."""
    call = json.loads(text)
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
