"""Structured output (xgrammar): every constrained answer parses as JSON and validates
against its schema (checked with the independent `jsonschema` package), over several
schemas and seeds, batched with unconstrained requests that stay as they are alone; on
the Python API, the OpenAI endpoint (`response_format`) and the real SmolLM2."""

from __future__ import annotations

import json

import pytest

from kiln import LLM, SamplingParams
from kiln.errors import KilnError
from tests.test_serve_support import MODEL, tiny_chat_engine

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "color"], "additionalProperties": False},
    {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
     "required": ["n", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"x": {"type": "null"}, "y": {"const": "k"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "name": {"type": "string", "pattern": "^[a-z]{1,5}$"}},
     "required": ["inner", "name"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def tiny():
    return LLM(tiny_chat_engine(), device="cpu")


def _check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_every_output_validates_batched_with_free_requests(tiny):
    """Random weights: only the grammar makes these answers JSON at all."""
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in range(3)]
    prompts, params = [], []
    for seed in range(3):
        for schema in SCHEMAS:
            prompts.append(f"Answer {seed} as JSON:")
            params.append(SamplingParams(max_tokens=48, temperature=1.0, seed=seed,
                                         json_schema=schema))
    free_prompts = [f"Free text {s}" for s in range(3)]
    outs = tiny.generate(prompts + free_prompts, params + free)
    for out, p in zip(outs, params):
        assert out.finish_reason == "stop", out.text  # the JSON closed, not cut at max_tokens
        _check(out.text, p.json_schema)
    alone = tiny.generate(free_prompts, free)
    assert [o.token_ids for o in outs[len(params):]] == [o.token_ids for o in alone]


def test_any_json_object(tiny):
    outs = tiny.generate(["{", "{"], [SamplingParams(max_tokens=64, temperature=0.7, seed=s,
                                                     json_schema={"type": "object"})
                                      for s in range(2)])
    for out in outs:
        if out.finish_reason == "stop":  # free-form objects may run past 64 tokens
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_bad_schema_is_a_request_error(tiny):
    with pytest.raises(KilnError, match="json_schema"):
        tiny.generate("x", SamplingParams(json_schema={"type": "no-such-type"}))


def test_smollm2_fills_a_schema(smollm2_engine):
    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}
    llm = LLM(smollm2_engine, device="cpu")
    [out] = llm.generate("Describe Paris as JSON with its city, country and population:",
                         SamplingParams(max_tokens=40, temperature=0, json_schema=schema))
    assert out.finish_reason == "stop"
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert list(value) == ["city", "country", "population_millions"]  # the schema's order


def test_openai_response_format(client):
    import openai

    schema = SCHEMAS[0]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "colour?"}], max_tokens=48,
        seed=1, response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    _check(reply.choices[0].message.content, schema)
    stream = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=48, seed=2,
                                       stream=True, extra_body={"response_format": {
                                           "type": "json_schema",
                                           "json_schema": {"name": "a", "schema": SCHEMAS[3]}}})
    _check("".join(c.choices[0].text for c in stream if c.choices), SCHEMAS[3])
    for bad in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "json_schema", "json_schema": {"schema": {"type": "no-such"}}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, response_format=bad, messages=[
                {"role": "user", "content": "hi"}])


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_tool_calls(client):
    import openai

    messages = [{"role": "user", "content": "Weather in Paris? Or add 2 and 3."}]
    for seed in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                               tool_choice="required", seed=seed,
                                               max_tokens=48)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments),
                            PARAMETERS[call.function.name])
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=48, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}})
    calls = [(c.choices[0].delta.tool_calls, c.choices[0].finish_reason) for c in stream
             if c.choices and (c.choices[0].delta.tool_calls or c.choices[0].finish_reason)]
    [(delta, finish)] = calls
    assert finish == "tool_calls" and delta[0].function.name == "add"
    jsonschema.validate(json.loads(delta[0].function.arguments), PARAMETERS["add"])
    for bad in ({"tool_choice": "any"},
                {"tool_choice": {"type": "function", "function": {"name": "nope"}}}):
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, **bad)
    plain = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=4)
    assert plain.choices[0].message.tool_calls is None


def test_forced_call_cut_at_its_last_token_is_still_a_call(client):
    """A forced call whose JSON is whole when max_tokens stops it (before the end token)
    is a tool call; one cut inside its JSON is the text so far, finish_reason "length"."""
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice="required", seed=4, max_tokens=48)
    assert whole.choices[0].finish_reason == "tool_calls"
    used = whole.usage.completion_tokens  # the call's tokens and the end token
    cut = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                         tool_choice="required", seed=4, max_tokens=used - 1)
    assert cut.usage.completion_tokens == used - 1
    assert cut.choices[0].finish_reason == "tool_calls"
    [a], [b] = cut.choices[0].message.tool_calls, whole.choices[0].message.tool_calls
    assert (a.function.name, a.function.arguments) == (b.function.name, b.function.arguments)
    short = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice="required", seed=4, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.tool_calls is None
    assert short.choices[0].message.content.startswith("{")


def test_tool_results_go_back_to_the_model(client, reference):
    """The tool-calling loop: the assistant's call and a `tool` message with its result
    are templated into the next turn (the tiny model's template renders any role)."""
    messages = [{"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=5)
    text = reference.engine.tokenizer.apply_chat_template(
        [messages[0], {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
         {"role": "tool", "content": "5", "tool_call_id": "call_1"}], True)
    want = reference.generate(reference.engine.tokenizer.encode(text, add_special_tokens=False),
                              SamplingParams(temperature=0, max_tokens=5))[0]
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(want.prompt_token_ids)


def test_tool_choice_auto_reads_calls_from_free_text(client):
    """tool_choice "auto" (and unset, OpenAI's default with tools): a free answer, read for
    calls; greedy, the stream ends with the same message as the plain response."""
    messages = [{"role": "user", "content": "Use a tool: add 2 and 3."}]
    for choice in ({"tool_choice": "auto"}, {}):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                               temperature=0, max_tokens=40, **choice)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        if message.tool_calls:
            assert finish == "tool_calls"
            for call in message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments),
                                    {"type": "object"})
                assert call.function.name in PARAMETERS
        else:
            assert finish in ("stop", "length") and message.content
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                            temperature=0, max_tokens=40, stream=True)
    text, calls, finishes = "", [], []
    for c in stream:
        if c.choices:
            text += c.choices[0].delta.content or ""
            calls += c.choices[0].delta.tool_calls or []
            finishes += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
    assert finishes == [reply.choices[0].finish_reason]
    assert (text or None) == (message.content or None)
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"]}}}]
CALL_SCHEMA = {"type": "json_schema", "json_schema": {"name": "call", "schema": {
    "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}}}


@pytest.mark.parametrize("how", [{"tool_choice": "required"},
                                 {"tool_choice": "auto", "response_format": CALL_SCHEMA}])
def test_each_choice_streams_its_call_once(client, how):
    """n > 1: choices finish at different steps, and the engine's later outputs repeat the
    finished ones; each choice's call still goes out once, with an id of its own."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in range(3):
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, tools=WEATHER, n=2, seed=seed, max_tokens=60,
            stream=True, **how)
        calls: dict[int, list] = {0: [], 1: []}
        finishes: dict[int, list] = {0: [], 1: []}
        for chunk in stream:
            for choice in chunk.choices:
                calls[choice.index] += choice.delta.tool_calls or []
                finishes[choice.index] += [choice.finish_reason] if choice.finish_reason \
                    else []
        assert finishes == {0: ["tool_calls"], 1: ["tool_calls"]}, (seed, finishes)
        assert [len(calls[0]), len(calls[1])] == [1, 1], (seed, calls)
        assert calls[0][0].id != calls[1][0].id
        for [call] in calls.values():
            assert json.loads(call.function.arguments)["city"]


def test_identical_choices_get_calls_of_their_own(client):
    """Greedy n = 2: the same answer twice, read as a call; each choice's call has its
    own id (ids name calls, not texts)."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=WEATHER, tool_choice="auto", response_format=CALL_SCHEMA, n=2, temperature=0,
        max_tokens=60)
    first, second = (c.message.tool_calls for c in reply.choices)
    assert [(c.function.name, c.function.arguments) for c in first] == \
        [(c.function.name, c.function.arguments) for c in second]
    assert first[0].id != second[0].id


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', None,
     [("add", {"a": 2, "b": 3})]),
    ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", '
     '"unit": "C"}}</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}'
     '</tool_call>', "Let me look.",
     [("get_weather", {"city": "Rome", "unit": "C"}), ("add", {"a": 1})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 4, "b": 5}}', None,
     [("add", {"a": 4, "b": 5})]),
    ('```json\n[{"name": "add", "arguments": {}}, {"name": "add", "arguments": {"a": 1}}]\n```',
     None, [("add", {}), ("add", {"a": 1})]),
    ('{"name": "subtract", "arguments": {}}', None, []),  # not one of the tools
    ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', None, []),  # not an object
    ('{"name": "add"', None, []),  # cut short
    ("The answer is 5.", None, []),
])
def test_parse_tool_calls(text, content, calls):
    from kiln.serve.openai_tools import _functions, parse_tool_calls

    got_content, got_calls = parse_tool_calls(text, _functions(TOOLS))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in got_calls] == calls
    assert got_content == (content if calls else text)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)


def test_streamed_answer_is_held_only_while_it_may_be_a_call():
    from kiln.serve.openai_tools import may_open_call

    assert may_open_call("  {") and may_open_call("<tool") and may_open_call("``")
    assert may_open_call("") and may_open_call("<|python")
    assert not may_open_call("Sure") and not may_open_call("<b>") and not may_open_call("1")


# ---- keywords the grammar would not enforce are refused, never ignored ----------------
REFUSED = [  # (schema, the keyword and JSON path the error names)
    ({"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2},
        "minItems": 3, "maxItems": 3, "uniqueItems": True}}, "required": ["tags"]},
     "uniqueItems at $.properties.tags"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]},
     "required at $ names 'b'"),
    ({"type": "integer", "minimum": 0, "maximum": 12, "not": {"enum": list(range(10))}},
     "not at $"),
    ({"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "v": {"type": "integer"}},
      "required": ["k", "v"], "if": {"properties": {"k": {"const": "x"}}},
      "then": {"properties": {"v": {"const": 1}}}}, "if at $"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}}, "dependentRequired at $"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "contains at $"),
    ({"type": "array", "items": {"anyOf": [{"type": "integer"}], "minimum": 3}},
     "minimum at $.items is ignored beside anyOf"),
    ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n", "maximum": 3},
     "maximum at $ is ignored beside $ref"),
    ({"$defs": {"n": {"type": "array", "uniqueItems": True}}, "$ref": "#/$defs/n"},
     "uniqueItems at $.$defs.n"),
    ({"allOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}]},
     "allOf at $"),
    ({"oneOf": [{"type": "integer"}, {"type": "integer", "minimum": 0}]}, "oneOf at $"),
    ({"type": "integer", "multipleOf": 7, "minimum": 1}, "multipleOf at $"),
    ({"type": "integer", "multipleOf": 2000}, "multipleOf at $"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf at $"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 2}, "maxLength at $"),
    ({"type": "string", "format": "uri", "maxLength": 20}, "maxLength at $"),
    ({"type": "string", "format": "regex"}, "format at $"),
    ({"minimum": 3}, "minimum at $ is not enforced without a \"type\""),
    ({"type": "string", "enum": ["a", 1]}, "type at $ is ignored beside enum"),
    ({"properties": {"when": {"const": "now", "maxLength": 1}}},
     "maxLength at $.properties.when"),
]


@pytest.mark.parametrize("schema,where", REFUSED, ids=[w.split(" at ")[0] + str(i)
                                                      for i, (_, w) in enumerate(REFUSED)])
def test_unenforced_keywords_are_refused(tiny, schema, where):
    with pytest.raises(KilnError, match="json_schema: " + where.replace("$", r"\$")
                       .replace("[", r"\[")):
        tiny.generate("x", SamplingParams(json_schema=schema, max_tokens=4))
    # and not a word of it was generated: the engine goes on
    assert tiny.generate("x", SamplingParams(max_tokens=2, temperature=0))[0].token_ids


ENFORCED = [  # (schema, text it must reject) where the grammar does what the keyword says
    ({"type": "integer", "multipleOf": 7}, "15"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 9999}, "10"),
    ({"type": "integer", "exclusiveMinimum": 5, "maximum": 6}, "5"),
    ({"type": "number", "minimum": 1.5}, "1.2"),
    ({"type": "string", "minLength": 3, "maxLength": 4}, '"ab"'),
    ({"type": "string", "format": "date"}, '"2024-13-01"'),
    ({"type": "string", "format": "email", "description": "an annotation"}, '"x"'),
    ({"type": "string", "format": "no-such-format", "maxLength": 2}, '"abc"'),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 1},
     "[1, 1]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1, 2]"),
    ({"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
     '{"a": 1}'),
    ({"type": "object", "maxProperties": 1, "additionalProperties": {"type": "integer"}},
     '{"a": 1, "b": 2}'),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
      "additionalProperties": False}, '{"y": 1}'),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, '{"abc": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}},
      "unevaluatedProperties": False}, '{"a": 1, "b": 2}'),
    ({"type": ["integer", "string"], "minimum": 3}, "1"),
    ({"type": "string", "const": "x"}, '"y"'),
    ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n", "title": "n"}, '"s"'),
    ({"anyOf": [{"type": "integer", "maximum": 5}, {"type": "boolean"}]}, "9"),
    ({"allOf": [{"type": "integer", "maximum": 5}]}, "9"),
    ({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}, "-1"),
    # a discriminated union (pydantic's layout): the branches cannot overlap
    ({"$defs": {k: {"type": "object", "properties": {"kind": {"const": k}, "n": {
        "type": "integer"}}, "required": ["kind", "n"]} for k in ("cat", "dog")},
      "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}],
      "discriminator": {"propertyName": "kind"}}, '{"kind": "cow", "n": 1}'),
]


@pytest.mark.parametrize("schema,bad", ENFORCED, ids=[str(i) for i in range(len(ENFORCED))])
def test_enforced_keywords_are_accepted(tiny, schema, bad):
    """What check_schema lets through, the grammar enforces: it rejects a text the schema
    rejects, and generated answers validate."""
    validator = jsonschema.Draft202012Validator(schema,
                                                format_checker=jsonschema.FormatChecker())
    assert not validator.is_valid(json.loads(bad))
    matcher = tiny.engine._grammar_compiler().matcher(schema)
    assert not (matcher.accept_string(bad) and matcher.is_completed())
    for out in tiny.generate(["JSON:"] * 2, [SamplingParams(
            json_schema=schema, max_tokens=32, temperature=1.0, seed=s) for s in range(2)]):
        if out.finish_reason == "stop":
            validator.validate(json.loads(out.text))


# ---- min_tokens: the grammar wins ------------------------------------------------------
SMALL = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5}},
         "required": ["a"], "additionalProperties": False}


def _ends_with_the_json(out, eos: tuple[int, ...]) -> None:
    _check(out.text, SMALL)
    assert out.finish_reason == "stop" and out.token_ids[-1] in eos
    assert len(out.token_ids) < 20  # short of min_tokens: nothing follows the JSON


def test_min_tokens_stops_when_the_json_is_complete(tiny):
    """min_tokens holds the end back only while the grammar allows something else: once
    the JSON is complete the answer ends there (it went on with free text after an end
    token in the middle of the output); greedy, sampled, n > 1 and with ignore_eos."""
    eos = tiny.engine.eos_token_ids
    [greedy] = tiny.generate("Give JSON:", SamplingParams(
        json_schema=SMALL, min_tokens=20, max_tokens=30, temperature=0))
    _ends_with_the_json(greedy, eos)
    [group] = tiny.generate("Give JSON:", SamplingParams(
        json_schema=SMALL, min_tokens=20, max_tokens=30, temperature=1.0, seed=3, n=3))
    assert len(group.outputs) == 3
    for out in group.outputs:
        _ends_with_the_json(out, eos)
    [no_eos] = tiny.generate("Give JSON:", SamplingParams(
        json_schema=SMALL, min_tokens=20, max_tokens=30, temperature=0, ignore_eos=True))
    _ends_with_the_json(no_eos, eos)
    # a number the grammar may go on with: min_tokens makes it longer, within the schema
    [digits] = tiny.generate("Give JSON:", SamplingParams(
        json_schema={"type": "integer", "minimum": 0, "maximum": 99999}, min_tokens=3,
        max_tokens=10, temperature=0))
    assert digits.finish_reason == "stop" and len(digits.token_ids) >= 3
    assert 0 <= json.loads(digits.text) <= 99999


def test_min_tokens_with_a_schema_on_a_speculative_engine(tiny):
    """Constrained requests decode plainly on a speculative engine: the same answers."""
    spec = LLM(tiny_chat_engine(), device="cpu", speculative_config={
        "method": "ngram", "num_speculative_tokens": 3})
    params = [SamplingParams(json_schema=SMALL, min_tokens=20, max_tokens=30, temperature=0),
              SamplingParams(json_schema=SMALL, min_tokens=20, max_tokens=30, seed=5, n=2),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    prompts = ["Give JSON:", "More JSON:", "free text free text free text"]
    got, want = spec.generate(prompts, params), tiny.generate(prompts, params)
    for a, b in zip(got, want):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    for out in got[0].outputs + got[1].outputs:
        _ends_with_the_json(out, tiny.engine.eos_token_ids)


def test_a_finished_grammar_allows_only_its_end(tiny):
    """Its bitmask row (were it sampled again) holds the end tokens, not every token."""
    from types import SimpleNamespace

    import torch

    from kiln.runtime.grammar import grammar_bitmask

    eos = tiny.engine.eos_token_ids
    matcher = tiny.engine._grammar_compiler().matcher(SMALL)
    assert matcher.accept_string('{"a": 1}') and matcher.accept_token(eos[0])
    assert matcher.is_terminated()
    vocab = tiny.engine.config.model.vocab_size
    done = SimpleNamespace(grammar=matcher, eos_token_ids=eos)
    free = SimpleNamespace(grammar=None, eos_token_ids=eos)
    bitmask, rows = grammar_bitmask([free, done], vocab, torch.device("cpu"))
    assert rows == [1]
    logits = torch.zeros(2, vocab)
    from kiln.runtime.grammar import apply_grammar

    allowed = apply_grammar(logits, (bitmask, rows))[1].isfinite().nonzero().flatten()
    assert allowed.tolist() == sorted(t for t in eos if t < vocab)


def test_openai_min_tokens_and_a_schema(client):
    """The server: the answer is the JSON, finish_reason "stop", fewer than min_tokens."""
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give JSON"}], temperature=0,
            max_completion_tokens=30, stream=stream, extra_body={"min_tokens": 20},
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": SMALL}})
        if stream:
            chunks = [c for c in reply if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
            assert reply.usage.completion_tokens < 20
        _check(text, SMALL)
        assert finish == "stop"


# ---- vLLM's constrained-decoding fields -------------------------------------------------
def test_vllm_guided_json_and_structured_outputs(client):
    messages = [{"role": "user", "content": "colour?"}]
    for extra in ({"guided_json": SCHEMAS[0]}, {"guided_json": json.dumps(SCHEMAS[0])},
                  {"structured_outputs": {"json": SCHEMAS[0]}},
                  {"guided_json": SCHEMAS[0], "guided_decoding_backend": "xgrammar"}):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,
                                               seed=1, extra_body=extra)
        assert reply.choices[0].finish_reason == "stop", extra
        _check(reply.choices[0].message.content, SCHEMAS[0])
    reply = client.completions.create(model=MODEL, prompt="{", max_tokens=64, seed=2,
                                      extra_body={"structured_outputs": {"json_object": True}})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].text), dict)
    else:
        assert reply.choices[0].text.startswith("{")


@pytest.mark.parametrize("extra,param,words", [
    ({"guided_choice": "red"}, "guided_choice", "list of non-empty strings"),
    ({"guided_regex": "[0-9"}, "guided_regex", "regular expression does not compile"),
    ({"guided_grammar": 'root ::= foo'}, "guided_grammar", "grammar does not compile"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "exclude each other"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "whitespace"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs",
     "give one of"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs",
     "structured_outputs.structural_tag"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "jsn"),
    ({"guided_json": "not json"}, "guided_json", "JSON schema object"),
    ({"guided_json": {"type": "object"}, "guided_decoding_backend": "outlines"},
     "guided_decoding_backend", "xgrammar"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}},
     "guided_json", "exclude each other"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json",
     "uniqueItems at $"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}}}},
     "response_format", "required at $ names 'b'"),
    ({"structured_outputs": {"json": {"type": "no-such"}}}, "structured_outputs",
     "does not compile"),
])
def test_unserved_constraints_are_400(client, extra, param, words):
    """Never ignored: a 400 whose param is the field and whose message says what to use."""
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, max_tokens=4, extra_body=extra,
                                       messages=[{"role": "user", "content": "Pick"}])
    body = error.value.body
    assert body["param"] == param and words in body["message"], body
