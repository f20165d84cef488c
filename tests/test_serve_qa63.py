"""vLLM's allowed_token_ids extension on the OpenAI routes, against a real kiln server."""

from __future__ import annotations

import httpx

from tests.conftest import SERVE_PROMPT as PROMPT
from tests.test_serve_support import MODEL

QUOTE = 18  # '"' in SmolLM2's vocabulary


def test_allowed_token_ids_restrict_the_completion(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "allowed_token_ids": [QUOTE]}
    reply = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == '"""'
    chat = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        **{k: v for k, v in body.items() if k != "prompt"},
        "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == '"""'


def test_allowed_token_ids_past_the_vocabulary_are_400(server):
    reply = httpx.post(server.v1 + "/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 2, "allowed_token_ids": [10**7]})
    assert reply.status_code == 400, reply.text
    assert "allowed_token_ids: token id 10000000 is not in the vocabulary" in reply.text
