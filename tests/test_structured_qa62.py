"""Structured output QA (62nd session): a forced tool call whose parameters reference
their own `$defs` (what openai.pydantic_function_tool writes for a nested model) is
generated under them (it was a 400: the references pointed past the call's schema);
malformed schemas (a `type` that is not a string, JSON nested deeper than Python parses)
are a 400 naming the field or a RequestError (they were "could not be added: TypeError"
or a 500); a free answer or an assistant message of JSON nested that deep is text, not a
500. Random weights: only the grammar makes these answers match at all."""

from __future__ import annotations

import json

import httpx
import pytest

from kiln import LLM, SamplingParams
from kiln.errors import RequestError
from tests.test_serve_support import MODEL, tiny_chat_engine

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

MESSAGES = [{"role": "user", "content": "Forecast, please."}]
# pydantic's layout: the nested model under $defs, referenced from the properties
FORECAST = {"$defs": {"Loc": {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}},
    "type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["where", "days"], "additionalProperties": False}
# the same $defs name, another schema; and a reference to the parameters' root
TREE = {"$defs": {"Loc": {"type": "integer", "minimum": 5, "maximum": 7}},
        "type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}, "next": {
            "anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["loc", "next"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}}
         for n, p in (("forecast", FORECAST), ("tree", TREE))]
PARAMETERS = {"forecast": FORECAST, "tree": TREE}


@pytest.fixture(scope="module")
def tiny():
    return LLM(tiny_chat_engine(), device="cpu")


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 60, **body})


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "forecast"}}])
def test_forced_call_with_refs_in_its_parameters(client, choice):
    names = set()
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                               tool_choice=choice, seed=seed, max_tokens=60)
        [call] = reply.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments),
                            PARAMETERS[call.function.name])
        names.add(call.function.name)
    assert names <= ({"forecast"} if isinstance(choice, dict) else {"forecast", "tree"})


@pytest.mark.parametrize("tools,where", [
    (TOOLS[:1], "$.properties.arguments.$defs.Loc"),
    (TOOLS, "$.anyOf[0].properties.arguments.$defs.Loc"),  # a reference through anyOf's list
])
def test_unenforced_keywords_behind_a_tools_refs_are_refused(server, tools, where):
    bad = {**FORECAST, "$defs": {"Loc": {"type": "array", "uniqueItems": True}}}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": bad}},
             *tools[1:]]
    reply = _post(server, {"tools": tools, "tool_choice": "required"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "tools" and f"uniqueItems at {where}" in error["message"], error


MALFORMED = [{"type": 5}, {"const": 1, "type": [[1]]},
             {"oneOf": [{"type": 5}, {"type": "string"}]}, {"enum": [1], "type": [{"x": 1}]}]


@pytest.mark.parametrize("schema", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_type_is_a_clear_error(tiny, server, schema):
    """Refused by the compiler ("Type should be a string") or by the keyword check, not
    with a TypeError from the check."""
    with pytest.raises(RequestError, match="^json_schema: "):
        tiny.generate("x", SamplingParams(json_schema=schema, max_tokens=4))
    reply = _post(server, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "response_format", error
    assert error["message"].startswith("response_format: "), error


DEEP = '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000


@pytest.mark.parametrize("extra,param", [({"guided_json": DEEP}, "guided_json"),
                                         ({"structured_outputs": {"json": DEEP}},
                                          "structured_outputs")])
def test_a_schema_nested_too_deeply_is_a_400(server, extra, param):
    reply = _post(server, extra)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "nested too deeply" in error["message"], error
    assert _post(server, {"max_tokens": 2}).status_code == 200


def test_python_schemas_that_are_not_json_are_request_errors(tiny):
    deep: dict = {}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    for schema, words in ((DEEP, "nested too deeply"), (deep, "not JSON data"),
                          ({"enum": {1, 2}}, "not JSON data")):
        with pytest.raises(RequestError, match="json_schema: .*" + words):
            tiny.generate("x", SamplingParams(json_schema=schema, max_tokens=4))
    assert tiny.generate("x", SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_json_nested_too_deeply_is_text_not_a_call(server):
    """A looping model's free answer of a thousand "[" (tool_choice auto) is its text, and
    an assistant message's arguments nested that deep go to the template as they came."""
    from kiln.serve.openai_tools import _functions, parse_tool_calls, tool_calls

    text = "[" * 5000
    assert parse_tool_calls(text, _functions(TOOLS)) == (text, [])
    assert parse_tool_calls(f"<tool_call>{text}</tool_call>", _functions(TOOLS))[1] == []
    assert tool_calls(text) is None
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "tree", "arguments": text}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    reply = httpx.post(server.v1 + "/chat/completions", timeout=120, json={
        "model": MODEL, "messages": history, "tools": TOOLS, "max_tokens": 1})
    assert reply.status_code == 200, reply.text


def test_compiled_grammars_kept_are_bounded(monkeypatch):
    """A server that sees a new schema from every client keeps the last CACHE_ENTRIES
    used, not all of them."""
    from kiln.runtime import grammar
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    engine = LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu"))
    compiler = engine._grammar_compiler()
    monkeypatch.setattr(grammar, "CACHE_ENTRIES", 2)
    for pattern in ("a+", "b+", "a+", "c+"):  # a+ used again: b+ is the oldest
        compiler.matcher(("regex", pattern))
    assert list(compiler._compiled) == [("regex", "a+"), ("regex", "c+")]


def test_a_slow_grammar_compiles_while_others_run(monkeypatch):
    """A constraint that takes long to compile (thousands of `choice` options take
    seconds) no longer stops the engine: a free request sent after it finishes first, the
    constrained one then runs, a bad one still fails alone, and one whose client left
    while it compiled never runs."""
    import asyncio
    import time

    from kiln.runtime import grammar
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.serve import AsyncLLM

    slow = grammar.GrammarCompiler._compile

    def compile_slowly(self, kind, text):
        if "slow" in text:
            time.sleep(1.5)
        return slow(self, kind, text)

    monkeypatch.setattr(grammar.GrammarCompiler, "_compile", compile_slowly)
    engine = LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu"))
    added: list[str] = []
    add = engine.add_request

    def add_request(prompt, params, request_id):
        added.append(request_id)
        return add(prompt, params, request_id)

    monkeypatch.setattr(engine, "add_request", add_request)
    front = AsyncLLM(engine)
    ended: dict[str, float] = {}

    async def one(name: str, params: SamplingParams) -> str:
        outputs = [out async for out in front.generate("Pick one:", params, name)]
        ended[name] = time.monotonic()
        return outputs[-1].text

    async def run() -> tuple:
        constrained = asyncio.create_task(one("constrained", SamplingParams(
            max_tokens=8, choice=["slow one", "slow two"])))
        await asyncio.sleep(0.1)
        free = await one("free", SamplingParams(max_tokens=4, ignore_eos=True))
        with pytest.raises(RequestError, match="regex"):
            await one("bad", SamplingParams(max_tokens=4, regex="(unclosed slow"))
        left = asyncio.create_task(one("left", SamplingParams(
            max_tokens=4, regex="[a-z]+ slow")))
        await asyncio.sleep(0.1)
        left.cancel()
        return free, await constrained

    start = time.monotonic()
    try:
        free, chosen = asyncio.run(run())
        assert ended["free"] - start < 1.5 < ended["constrained"] - start, ended
        assert chosen in ("slow one", "slow two") and free
        time.sleep(2.0)  # the left one's compile ends: it is not added
        assert "left" not in added and "constrained" in added and front.num_unfinished == 0
    finally:
        front.shutdown()
