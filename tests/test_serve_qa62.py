"""Serving QA (62nd session): OpenAI's request fields are nullable, and the openai client
sends an option passed as None as null (`n=None` -> `"n": null`). A null `n`, `stream`,
`echo`, chat `logprobs`, `stream_options.include_usage` or vLLM extension was a 400
("n: Input should be a valid integer"); it now means the field's default, as in OpenAI's
API and vLLM, while a null required field (prompt, messages) is still a 400."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_serve_support import MODEL

MESSAGES = [{"role": "user", "content": "Hello"}]
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
              "skip_special_tokens", "include_stop_str_in_output")


def test_openai_client_none_options_mean_the_defaults(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                           temperature=0)
    nulls = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                           temperature=0, n=None, logprobs=None, stream=None)
    assert len(nulls.choices) == 1 and nulls.choices[0].logprobs is None
    assert nulls.choices[0].message.content == plain.choices[0].message.content
    # (the second reads the first's prompt blocks from the prefix cache)
    assert nulls.usage.model_dump(exclude={"prompt_tokens_details"}) == \
        plain.usage.model_dump(exclude={"prompt_tokens_details"})

    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    nulls = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                      n=None, echo=None, stream=None)
    assert [c.text for c in nulls.choices] == [plain.choices[0].text]  # no echo, one choice


@pytest.mark.parametrize("route,body", [
    ("chat/completions", {"messages": MESSAGES, "add_generation_prompt": None}),
    ("completions", {"prompt": "Hello", "echo": None}),
])
def test_null_extensions_and_stream_options(server, route, body):
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0, "n": None, **body,
            **dict.fromkeys(EXTENSIONS)}
    whole = httpx.post(f"{server.v1}/{route}", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.json()["usage"]["completion_tokens"] == 3
    with httpx.stream("POST", f"{server.v1}/{route}", timeout=60, json={
            **body, "stream": True, "stream_options": {"include_usage": None}}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["choices"] for line in lines[:-1])  # no usage chunk


@pytest.mark.parametrize("route,body,param", [
    ("completions", {"prompt": None}, "prompt"),
    ("chat/completions", {"messages": None}, "messages"),
])
def test_a_null_required_field_is_still_a_400(server, route, body, param):
    r = httpx.post(f"{server.v1}/{route}", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_call_arguments_keep_their_characters():
    """Arguments are JSON text with the characters as they are (OpenAI and vLLM send
    UTF-8, not \\u escapes), from a forced call and from a free answer."""
    from kiln.serve.openai_tools import parse_tool_calls, tool_calls

    forced = tool_calls('{"name": "weather", "arguments": {"city": "Zürich", "note": "晴"}}')
    assert forced[0]["function"]["arguments"] == '{"city": "Zürich", "note": "晴"}'
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call>',
        [{"name": "weather"}])
    assert calls[0]["function"]["arguments"] == '{"city": "Zürich"}'
