"""OpenAI completions extras against a real kiln server with the `openai` client: echo,
logit_bias (completions and chat, mixed in a batch with requests without it), best_of,
and vLLM's prompt_logprobs."""

from __future__ import annotations

import concurrent.futures
import math

import httpx
import pytest

from kiln import SamplingParams
from tests.conftest import SERVE_PROMPT as PROMPT
from tests.test_serve_support import MODEL

GREEDY = dict(temperature=0, max_tokens=6)


def test_echo_prepends_prompt(client, reference):
    want = reference.generate(PROMPT, SamplingParams(**GREEDY))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, **GREEDY)
    assert got.choices[0].text == PROMPT + want.text
    by_ids = client.completions.create(model=MODEL, prompt=want.prompt_token_ids, echo=True,
                                       **GREEDY)
    assert by_ids.choices[0].text == PROMPT + want.text
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, stream=True,
                                       **GREEDY)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + want.text


def test_echo_with_logprobs_covers_prompt_tokens(client, reference):
    want = reference.generate(PROMPT, SamplingParams(**GREEDY, prompt_logprobs=1))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, **GREEDY)
    lp = got.choices[0].logprobs
    n_prompt = len(want.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + got.usage.completion_tokens
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI
    for i in range(1, n_prompt):
        token = want.prompt_token_ids[i]
        assert lp.token_logprobs[i] == pytest.approx(want.prompt_logprobs[i][token], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(PROMPT)
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])


def test_max_tokens_0_scores_the_prompt(client, reference):
    """echo + logprobs + max_tokens 0, as evaluation harnesses score a text: the prompt
    and its tokens' logprobs, nothing generated."""
    want = reference.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1,
                                    max_tokens=0)
    choice = got.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert got.usage.completion_tokens == 0
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.prompt_token_ids) and lp.token_logprobs[0] is None
    for token, value, expected in zip(want.prompt_token_ids[1:], lp.token_logprobs[1:],
                                      want.prompt_logprobs[1:]):
        assert value == pytest.approx(expected[token], abs=1e-4)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert plain.choices[0].text == "" and plain.usage.completion_tokens == 0


def test_top_logprobs_hold_the_sampled_token(client):
    """Completions (OpenAI's legacy API): each position's top_logprobs has the token that
    was sampled, even where it is not among the top `logprobs` (then logprobs + 1)."""
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, n=3,
                                    temperature=1.5, seed=3, logprobs=1)
    outside = 0
    for choice in got.choices:
        lp = choice.logprobs
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[token] == pytest.approx(value) and len(top) in (1, 2)
            outside += len(top) == 2
    assert outside  # at this temperature some sampled tokens are not the most likely


def test_prompt_logprobs_extension(client, reference):
    want = reference.generate(PROMPT, SamplingParams(**GREEDY, prompt_logprobs=2))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY,
                                    extra_body={"prompt_logprobs": 2})
    rows = got.choices[0].model_extra["prompt_logprobs"]
    assert len(rows) == len(want.prompt_token_ids) and rows[0] is None
    for token, row, expected in zip(want.prompt_token_ids[1:], rows[1:],
                                    want.prompt_logprobs[1:]):
        assert str(token) in row
        assert row[str(token)]["logprob"] == pytest.approx(expected[token], abs=1e-4)
        ranks = sorted(r["rank"] for r in row.values() if r["rank"] is not None)
        assert ranks == [1, 2]
    assert got.choices[0].text == want.text  # without echo the text is unchanged


def test_logit_bias_forces_a_token_in_a_mixed_batch(client, reference):
    target = 1000
    piece = reference.engine.tokenizer.decode([target])
    request = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    alone = client.completions.create(**request)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(client.completions.create, **request) for _ in range(2)]
        forced = [pool.submit(client.completions.create, **request,
                              logit_bias={str(target): 100}, logprobs=0) for _ in range(2)]
        plain = [f.result() for f in plain]
        forced = [f.result() for f in forced]
    assert all(p.choices[0].text == alone.choices[0].text for p in plain)
    assert all(f.choices[0].text == piece * 4 for f in forced)
    # logprobs are the model's (before the bias), as OpenAI reports them
    assert all(lp < 0 for lp in forced[0].choices[0].logprobs.token_logprobs)
    # -100 on the greedy tokens: never sampled
    greedy = reference.engine.tokenizer.encode(alone.choices[0].text, add_special_tokens=False)
    banned = client.completions.create(**request, logprobs=0,
                                       logit_bias={str(t): -100 for t in set(greedy)})
    assert banned.choices[0].text != alone.choices[0].text


def test_chat_logit_bias(client, reference):
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_completion_tokens=4)
    forced = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_completion_tokens=4, logit_bias={"1000": 100})
    piece = reference.engine.tokenizer.decode([1000])
    assert forced.choices[0].message.content == piece * 4
    assert plain.choices[0].message.content != forced.choices[0].message.content


def test_best_of_returns_the_most_likely_candidates(client):
    request = dict(model=MODEL, prompt=PROMPT, temperature=1.0, max_tokens=5, seed=7)
    got = client.completions.create(**request, n=2, best_of=5, logprobs=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage.completion_tokens <= 25  # all candidates count
    scores = [math.fsum(c.logprobs.token_logprobs) for c in got.choices]
    assert scores[0] >= scores[1]
    # The same seeds: the candidates are the engine's n=5 choices; the best two are kept.
    every = client.completions.create(**request, n=5, logprobs=0)
    ranked = sorted(every.choices, key=lambda c: -math.fsum(c.logprobs.token_logprobs))
    assert [c.text for c in got.choices] == [c.text for c in ranked[:2]]
    without = client.completions.create(**request, n=1, best_of=5)
    assert without.choices[0].text == ranked[0].text and without.choices[0].logprobs is None


@pytest.mark.parametrize("body, param, words", [
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"49152": 1}}, "logit_bias", "not in the vocabulary"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "not in the vocabulary"),
    ({"best_of": 1, "n": 2}, "best_of", "at least n"),
    ({"best_of": 3, "stream": True}, "best_of", "stream"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
])
def test_bad_extras_are_400(server, body, param, words):
    reply = httpx.post(server.v1 + "/completions",
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_num_speculative_tokens_extension(server):
    """kiln's per-request draft count reaches the engine: this server's engine does not
    speculate, so asking for drafts is a 400 naming why, and 0 (plain) is served."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    reply = httpx.post(server.v1 + "/completions", json={**body, "num_speculative_tokens": 2})
    assert reply.status_code == 400, reply.text
    assert "without speculative decoding" in reply.json()["error"]["message"]
    assert reply.json()["error"]["param"] == "num_speculative_tokens"
    reply = httpx.post(server.v1 + "/completions", json={**body, "num_speculative_tokens": 0})
    assert reply.status_code == 200, reply.text


def test_chat_bad_logit_bias_is_400(server):
    reply = httpx.post(server.v1 + "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "logit_bias": {"7": 500}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "logit_bias"


def test_logit_bias_in_one_engine_batch(reference):
    """The sampler applies each row's bias: biased and plain requests in the same steps."""
    engine = reference.engine
    plain = SamplingParams(temperature=0, max_tokens=4)
    biased = SamplingParams(temperature=0, max_tokens=4, logit_bias={1000: 100.0})
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=4, logit_bias={1000: 100.0})
    for request_id, params in (("a", plain), ("b", biased), ("c", sampled), ("d", plain)):
        engine.add_request(PROMPT, params, request_id)
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.token_ids
    alone = reference.generate(PROMPT, plain)[0].token_ids
    assert done["a"] == done["d"] == alone
    assert done["b"] == done["c"] == [1000] * 4
