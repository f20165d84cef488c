"""Edges of the OpenAI routes found by a QA pass, against a real kiln server: a forced
tool call cut by a stop, completions' text_offset where tokens split a character or a
stop string cuts the text, echoed token ids with special tokens, the seed's range, an
unknown model (404), a prompt too long (context_length_exceeded) and max_tokens 0 in the
metrics."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import SERVE_PROMPT as PROMPT
from tests.test_serve_support import MODEL, metric

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]
QUOTE = 18  # '"' in SmolLM2's vocabulary: the token after "{" in a forced call, greedily
EMOJI = [10813, 242, 218, 40303]  # "😀" in three tokens, then " " and 3 bytes of another


def _post(server, route: str, body: dict) -> dict:
    response = httpx.post(server.v1 + route, json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _events(server, route: str, body: dict) -> list[dict]:
    """A stream's data events (not [DONE]); none of them an error."""
    events = []
    with httpx.stream("POST", server.v1 + route, json={"model": MODEL, **body, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert not [e for e in events if "error" in e], events
    return events


# -- a forced tool call cut short by a stop is its text, as when max_tokens cuts it ------

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("cut", [{"stop": ['"']}, {"stop_token_ids": [QUOTE]}])
def test_forced_call_cut_by_a_stop_is_its_text(server, choice, cut):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 30,
            "temperature": 0, "n": 2, **cut}
    for c in _post(server, "/chat/completions", body)["choices"]:
        assert c["finish_reason"] == "stop"
        assert c["message"]["content"] == "{" and c["message"]["tool_calls"] is None
    last = {}
    for event in _events(server, "/chat/completions", body):
        for c in event["choices"]:
            if c["finish_reason"] is not None:
                assert c["index"] not in last  # each choice ends once
                last[c["index"]] = c
    assert sorted(last) == [0, 1]
    for c in last.values():
        assert c["finish_reason"] == "stop"
        assert c["delta"]["content"] == "{" and c["delta"]["tool_calls"] is None


def test_forced_call_with_a_stop_it_does_not_meet_is_a_call(server):
    """Clients that always send a stop (agents' "\\nObservation:") still get their call."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 30,
            "temperature": 0, "stop": ["\nObservation:"]}
    choice = _post(server, "/chat/completions", body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "f"


# -- completions logprobs.text_offset: character positions in the choice's text ----------

def _streamed_logprobs(server, body: dict) -> tuple[str, list[str], list[int]]:
    text, tokens, offsets = "", [], []
    for event in _events(server, "/completions", body):
        for c in event["choices"]:
            text += c["text"]
            if c.get("logprobs"):
                tokens += c["logprobs"]["tokens"]
                offsets += c["logprobs"]["text_offset"]
    return text, tokens, offsets


def _check_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, offset in zip(tokens, offsets):
        if not token.startswith("bytes:") and offset < len(text):
            assert text[offset:offset + len(token)] == token, (token, offset, text)


def test_text_offset_where_tokens_split_a_character(server):
    body = {"prompt": EMOJI, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    choice = _post(server, "/completions", body)["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith("😀 \ufffd")
    # the emoji's three tokens start at 0; " " + 3 bytes at 1; the generated token after
    # the replacement character the unfinished bytes decode to
    assert lp["text_offset"] == [0, 0, 0, 1, 3]
    _check_offsets(text, lp["tokens"], lp["text_offset"])
    assert _streamed_logprobs(server, body) == (text, lp["tokens"], lp["text_offset"])


def test_text_offset_of_a_text_prompt_with_special_tokens_and_split_characters(server):
    body = {"prompt": "<|im_start|>user\nhi 日本", "max_tokens": 3, "echo": True,
            "logprobs": 0, "temperature": 0}
    got = _post(server, "/completions", body)
    text, lp = got["choices"][0]["text"], got["choices"][0]["logprobs"]
    assert any(t.startswith("bytes:") for t in lp["tokens"])  # 日 is split
    assert lp["text_offset"][lp["tokens"].index("本")] == text.index("本")
    first = got["usage"]["prompt_tokens"]  # the first generated token
    assert lp["text_offset"][first] == len(body["prompt"])
    _check_offsets(text, lp["tokens"], lp["text_offset"])
    assert _streamed_logprobs(server, body) == (text, lp["tokens"], lp["text_offset"])


def test_text_offset_stays_in_a_text_cut_by_a_stop_string(server):
    """The tokens that complete a stop string are in logprobs, their text is not: their
    offsets are the text's end, streamed too (tokens wait while their text is held)."""
    plain = {"prompt": PROMPT, "max_tokens": 16, "logprobs": 0, "temperature": 0}
    whole = _post(server, "/completions", plain)["choices"][0]
    full, lp = whole["text"], whole["logprobs"]
    offsets = lp["text_offset"]
    assert "".join(lp["tokens"]) == full
    k = next(k for k in range(2, 12) if full.find(full[offsets[k]:offsets[k + 2] + 1])
             == offsets[k] and offsets[k + 2] > offsets[k + 1] > offsets[k])
    stop = full[offsets[k]:offsets[k + 2] + 1]  # three tokens, the last one in part
    body = {**plain, "stop": [stop]}
    choice = _post(server, "/completions", body)["choices"][0]
    text, cut = choice["text"], choice["logprobs"]
    assert text == full[:offsets[k]] and choice["finish_reason"] == "stop"
    assert cut["tokens"] == lp["tokens"][:k + 3]
    assert cut["text_offset"] == offsets[:k] + [len(text)] * 3
    streamed = _streamed_logprobs(server, body)
    assert streamed == (text, cut["tokens"], cut["text_offset"])
    echoed = _post(server, "/completions", {**body, "echo": True})["choices"][0]
    assert echoed["logprobs"]["text_offset"][-3:] == [len(echoed["text"])] * 3


def test_echo_of_token_ids_keeps_special_tokens(server):
    body = {"prompt": [1, 19556], "max_tokens": 1, "echo": True, "logprobs": 0,
            "temperature": 0}
    choice = _post(server, "/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("<|im_start|>Hello")
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [0, 12, 17]
    assert _streamed_logprobs(server, body)[0] == choice["text"]


# -- seed, model, context length, metrics --------------------------------------------------

@pytest.mark.parametrize(("seed", "extra", "ok"), [
    (2**63 - 1, {}, True), (2**63, {}, False),
    (2**63 - 2, {"n": 2}, True), (2**63 - 1, {"n": 2}, False),
    (2**63 - 2, {"best_of": 2}, True), (2**63 - 1, {"best_of": 2}, False),
    (-2**63, {}, True), (-2**63 - 1, {}, False),
])
def test_seed_range(server, seed, extra, ok):
    """Choice i samples with seed + i: the last must fit in a signed 64-bit integer."""
    response = httpx.post(server.v1 + "/completions", json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": seed, **extra})
    assert response.status_code == (200 if ok else 400), response.text
    if not ok:
        assert response.json()["error"]["param"] == "seed"


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="gpt-17", prompt="Hi", max_tokens=2)
    assert error.value.code == "model_not_found" and "gpt-17" in error.value.message
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-17", messages=MESSAGES, max_tokens=2,
                                           stream=stream)
    response = httpx.post(server.v1 + "/completions", json={"model": "gpt-17", "prompt": "Hi"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"], "type": "not_found_error",
        "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize(("route", "body", "param"), [
    ("completions", {"prompt": "word " * 400}, "prompt"),
    ("completions", {"prompt": "Hi", "max_tokens": 1000}, "prompt"),
    ("chat", {"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": 1000}, "messages"),
])
def test_prompt_too_long_is_context_length_exceeded(client, route, body, param):
    create = client.completions.create if route == "completions" else \
        client.chat.completions.create
    with pytest.raises(openai.BadRequestError, match="max_seq_len") as error:
        create(model=MODEL, **body)
    assert error.value.code == "context_length_exceeded" and error.value.param == param


def test_max_tokens_0_generates_no_tokens_in_the_metrics(server):
    def generated() -> float:
        text = httpx.get(server.url + "/metrics").text
        return metric(text, "kiln_generation_tokens_total", 0.0)

    before = generated()
    got = _post(server, "/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True,
                                         "logprobs": 0})
    assert got["usage"]["completion_tokens"] == 0
    assert generated() == before
    two = _post(server, "/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2,
                                         "ignore_eos": True})
    assert generated() == before + two["usage"]["completion_tokens"] == before + 4
