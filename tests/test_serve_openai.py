"""The OpenAI API through the real `openai` client (sync, async, streaming) against a
kiln server: the answers equal the engine's own for the same prompt and parameters."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kiln import SamplingParams
from tests.test_serve_support import MODEL

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."}]
GREEDY = dict(temperature=0, max_tokens=8)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert models[0].model_extra["chat_template"] is True  # kiln's field (the playground's)


def test_completions_match_engine(client, reference):
    want = reference.generate(PROMPTS, SamplingParams(**GREEDY))
    for prompt, expected in zip(PROMPTS, want):
        got = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
        assert got.choices[0].text == expected.text
        assert got.choices[0].finish_reason == expected.finish_reason
        assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert got.usage.completion_tokens == len(expected.token_ids)


def test_batched_and_token_id_prompts(client, reference):
    want = reference.generate(PROMPTS, SamplingParams(**GREEDY))
    got = client.completions.create(model=MODEL, prompt=PROMPTS, **GREEDY)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    by_ids = client.completions.create(model=MODEL, prompt=want[0].prompt_token_ids, **GREEDY)
    assert by_ids.choices[0].text == want[0].text


def test_streamed_completion_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True,
                                            stream_options={"include_usage": True},
                                            **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_string_is_cut_in_streams_too(client):
    text = client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0,
                                     max_tokens=16).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0,
                                      max_tokens=16, stop=[stop])
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0,
                                         max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_choices_are_seeded(client, reference):
    params = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**params)
    again = client.completions.create(**params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    want = reference.generate(PROMPTS[2], SamplingParams(n=3, max_tokens=6, seed=7))[0]
    assert [c.text for c in first.choices] == [c.text for c in want.outputs]
    assert first.usage.completion_tokens == sum(len(c.token_ids) for c in want.outputs)


def test_sampling_parameters_match_engine(client, reference):
    extra = dict(temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5,
                 frequency_penalty=0.3, max_tokens=8)
    want = reference.generate(PROMPTS[0], SamplingParams(**extra))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], **extra)
    assert got.choices[0].text == want.text


def test_completion_logprobs(client):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=2, **GREEDY)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == got.usage.completion_tokens == len(lp.token_logprobs)
    assert "".join(lp.tokens) == got.choices[0].text
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the sampled is the best


def test_chat_matches_engine_chat(client, reference):
    want = reference.chat(CHAT, SamplingParams(**GREEDY))[0]
    got = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                         max_completion_tokens=8)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    # max_tokens is the older name of max_completion_tokens
    old = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert old.choices[0].message.content == want.text


def test_chat_logprobs(client):
    got = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
               for t in content)
    assert b"".join(bytes(t.bytes) for t in content).decode() == got.choices[0].message.content


def test_async_client_chat_streaming(server, reference):
    want = reference.chat(CHAT, SamplingParams(**GREEDY))[0]

    async def run() -> tuple[list, list[str]]:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        whole = await asyncio.gather(*[client.chat.completions.create(
            model=MODEL, messages=CHAT, **GREEDY) for _ in range(4)])
        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True},
            **GREEDY)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    assert all(w.choices[0].message.content == want.text for w in whole)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_streamed_n_choices_finish_once_each(client):
    """Choices that stop early are not re-announced while their siblings go on."""
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, n=4,
                                       temperature=1.0, seed=3, stop=["e"], stream=True)
    finishes: dict[int, int] = {}
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason is not None:
                finishes[c.index] = finishes.get(c.index, 0) + 1
    assert finishes == {0: 1, 1: 1, 2: 1, 3: 1}
