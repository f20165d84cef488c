"""Sampler: allowed sets of top-k/top-p/min-p, penalties, seeds, stops, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kiln import LLM
from kiln.kernels.reference import uniform_noise
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.sampler import SamplingBatch, apply_penalties, sample

VOCAB = 50


def batch_for(params: list[SamplingParams], outputs: list[list[int]] | None = None,
              step: int = 0) -> SamplingBatch:
    requests = []
    for i, p in enumerate(params):
        r = Request(str(i), [1, 2, 3], p, 100)
        r.token_ids += (outputs or [[]] * len(params))[i]
        r.sampling_seed = 1000 * i + step
        requests.append(r)
    return SamplingBatch.from_requests(requests, VOCAB, torch.device("cpu"))


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    seen = set()
    for step in range(n):
        tokens, _, _ = sample(logits[None].clone(), batch_for([params], step=step))
        seen.add(tokens.item())
    return seen


LOGITS = torch.linspace(3, -3, VOCAB)  # token 0 most likely, 49 least


def test_greedy_picks_argmax():
    logits = torch.randn(4, VOCAB)
    tokens, _, _ = sample(logits.clone(), batch_for([SamplingParams(temperature=0)] * 4))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_never_leaves_the_top_k():
    assert draws(LOGITS, SamplingParams(temperature=1.5, top_k=5)) == set(range(5))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(LOGITS, -1)
    nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1
    assert draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.6)) <= set(range(nucleus))
    assert len(draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.6))) > 1


def test_min_p_drops_unlikely_tokens():
    probs = torch.softmax(LOGITS, -1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    got = draws(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))
    assert got <= allowed and len(got) > 1


def test_sampling_follows_the_distribution():
    logits = torch.tensor([math.log(0.6), math.log(0.3), math.log(0.1)] + [-1e9] * (VOCAB - 3))
    counts = torch.zeros(VOCAB)
    for step in range(3000):
        token, _, _ = sample(logits[None].clone(), batch_for([SamplingParams()], step=step))
        counts[token] += 1
    freq = counts[:3] / 3000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_noise_is_uniform_and_a_pure_function():
    seeds, steps = torch.tensor([1, 2, 1]), torch.tensor([0, 0, 0])
    u = uniform_noise(seeds, steps, 10000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_penalties_match_direct_computation():
    logits = torch.randn(2, VOCAB)
    outputs = [[4, 4, 7], [9]]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.25), SamplingParams(frequency_penalty=-1.0)]
    batch = batch_for(params, outputs)
    got = apply_penalties(logits.clone(), batch.penalties)
    want = logits.clone()
    for row, (p, out) in enumerate(zip(params, outputs)):
        for token in set([1, 2, 3] + out):  # prompt and output tokens: repetition penalty
            x = want[row, token]
            want[row, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token in set(out):
            want[row, token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
    assert torch.allclose(got, want)


def test_min_tokens_and_bad_words_are_banned():
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])
    r = Request("0", [1], params, 10, eos_token_ids=(0,))
    r.bad_words_token_ids = [[9], [3, 8]]
    r.token_ids += [3]  # output so far ends with 3: the bad word [3, 8] bans 8 next
    batch = SamplingBatch.from_requests([r], VOCAB, torch.device("cpu"))
    assert set(torch.nonzero(batch.banned[0]).flatten().tolist()) == {0, 5, 9, 8}


def test_tiny_repetition_penalty_samples_no_nan():
    """A repetition penalty so small that seen logits divided by it overflow float32 (QA:
    1e-45 gave NaN and token 0): they are capped at float32's max, so a seen token wins."""
    batch = batch_for([SamplingParams(temperature=0, repetition_penalty=1e-45),
                       SamplingParams(temperature=1.0, repetition_penalty=1e-45, seed=1)])
    logits = torch.full((2, VOCAB), -1.0)
    logits[:, [2, 3]] = 0.5  # seen (prompt 1, 2, 3), positive
    penalized = apply_penalties(logits, batch.penalties)
    assert penalized.isfinite().all()
    tokens, _, _ = sample(logits, batch)
    assert set(tokens.tolist()) <= {2, 3}


def test_grammar_wins_over_min_tokens():
    """min_tokens bans EOS, but a grammar that allows only EOS (a complete value) must
    still end: the ban is dropped for that row; a row the grammar leaves more keeps it."""
    pytest.importorskip("xgrammar")
    import dataclasses

    params = SamplingParams(temperature=0, min_tokens=5)
    requests = [Request(str(i), [1], params, 10, eos_token_ids=(4,)) for i in range(2)]
    batch = SamplingBatch.from_requests(requests, VOCAB, torch.device("cpu"))
    bitmask = torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32)
    bitmask[0, 0] = 1 << 4  # row 0: EOS only
    bitmask[1, 0] = 1 << 4 | 1 << 7  # row 1: EOS or 7
    batch = dataclasses.replace(batch, grammar=(bitmask, [0, 1]))
    logits = torch.zeros(2, VOCAB)
    logits[:, 4] = 5.0  # EOS most likely
    tokens, _, _ = sample(logits, batch)
    assert tokens.tolist() == [4, 7]


@pytest.fixture(scope="module")
def engine(tiny_engines):
    return LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))


def generate(engine, prompt, params, request_id="x"):
    engine.add_request(prompt, params, request_id)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                return out


@pytest.mark.parametrize("overlap", [False, True])
def test_seeded_request_is_the_same_alone_or_in_a_batch(engine, overlap):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    alone = generate(engine, [5, 6, 7], params).token_ids
    engine.overlap = overlap
    engine.add_request([5, 6, 7], params, "seeded")
    for i in range(6):
        engine.add_request([9 + i] * (3 + i), SamplingParams(max_tokens=25, temperature=1.0),
                           f"noise{i}")
    results = {}
    while engine.has_unfinished():
        results.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert results["seeded"] == alone
    engine.overlap = False
    assert generate(engine, [5, 6, 7], SamplingParams(max_tokens=20, temperature=0.9,
                                                       seed=99)).token_ids != alone


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_token_ids_and_max_tokens(engine, overlap):
    engine.overlap = overlap
    free = generate(engine, [5, 6, 7], SamplingParams(max_tokens=12, temperature=0,
                                                       ignore_eos=True))
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = generate(engine, [5, 6, 7], SamplingParams(max_tokens=12, temperature=0,
                                                      stop_token_ids=[stop_at], ignore_eos=True))
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    engine.overlap = False


def test_logprobs_are_consistent(engine):
    out = generate(engine, [5, 6, 7], SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                      ignore_eos=True))
    completion = out.outputs[0]
    assert len(completion.logprobs) == 6
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and len(entry) <= 4
        assert entry[token] == max(entry.values())  # greedy picks the top logprob
        total += entry[token]
    assert completion.cumulative_logprob == pytest.approx(total)


def test_prompt_logprobs_match_transformers(tiny_checkpoints, tiny_engines):
    _, hf = tiny_checkpoints["llama"]
    llm = LLM(tiny_engines["llama"], device="cpu", max_num_tokens=16)  # chunked prompt
    prompt = list(range(20, 60))
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]] == pytest.approx(want[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(entry) <= 3
