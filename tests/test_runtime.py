"""Engine behaviour under traffic: batch invariance, chunked prefill, preemption, prefix reuse."""

from __future__ import annotations

import random

import pytest

from kiln.errors import RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(1, 90))] for _ in range(count)]


def run_all(engine: LLMEngine, prompts, params, arrivals=None) -> dict[str, list[int]]:
    """Run prompts to completion; arrivals[i] is the step at which prompt i is added."""
    arrivals = arrivals or [0] * len(prompts)
    results, step = {}, 0
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            p = params[i] if isinstance(params, list) else params
            engine.add_request(prompts[i], p, request_id=str(i))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    return results


@pytest.fixture(scope="module")
def alone(tiny_engines) -> dict[str, list[int]]:
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    prompts = make_prompts(16)
    lengths = [random.Random(i).randrange(1, 40) for i in range(16)]
    out = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=lengths[i], **GREEDY)
        out[str(i)] = run_all(engine, [prompt], params)["0"]
    return out


@pytest.mark.parametrize("chunked, budget, overlap", [
    (True, 24, False), (True, 512, False), (False, 512, False), (True, 24, True)])
def test_batch_invariance(tiny_engines, alone, chunked, budget, overlap):
    """Each request's greedy tokens are the same alone or among 15 others arriving at
    different steps, with chunked prefill on (small and large token budgets) and off,
    and with overlap scheduling (step N+1 launched before step N's tokens are read)."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", enable_chunked_prefill=chunked, max_num_tokens=budget,
        overlap_scheduling=overlap))
    prompts = make_prompts(16)
    params = [SamplingParams(max_tokens=len(alone[str(i)]), **GREEDY) for i in range(16)]
    arrivals = [random.Random(100 + i).randrange(0, 12) for i in range(16)]
    assert run_all(engine, prompts, params, arrivals) == alone
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_under_small_kv_pool(tiny_engines, alone, overlap):
    # 16 blocks of 16 tokens: room for about 3 requests at once; 16 requests want more.
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu", num_kv_blocks=16,
                                                            overlap_scheduling=overlap))
    prompts = make_prompts(16)
    params = [SamplingParams(max_tokens=len(alone[str(i)]), **GREEDY) for i in range(16)]
    assert run_all(engine, prompts, params) == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_guaranteed_no_evict_never_preempts(tiny_engines, alone):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", num_kv_blocks=16, scheduler_policy="guaranteed_no_evict"))
    prompts = make_prompts(16)
    params = [SamplingParams(max_tokens=len(alone[str(i)]), **GREEDY) for i in range(16)]
    assert run_all(engine, prompts, params) == alone
    assert engine.scheduler.num_preemptions == 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_frees_everything(tiny_engines, overlap):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu", num_kv_blocks=16,
                                                            overlap_scheduling=overlap))
    for i, prompt in enumerate(make_prompts(8)):
        engine.add_request(prompt, SamplingParams(max_tokens=50, n=1 + i % 3, **GREEDY), str(i))
    for _ in range(5):
        engine.step()
    assert engine.kv.num_used_blocks > 0
    for i in range(8):
        engine.abort(str(i))
    assert not engine.has_unfinished()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.step() == []


def test_prefix_reuse_computes_fewer_tokens(tiny_engines):
    system = list(range(10, 110))  # a 100-token shared "system prompt"
    params = SamplingParams(max_tokens=8, **GREEDY)
    off = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                         enable_prefix_caching=False))
    on = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    want = [run_all(off, [system + [200 + i]], params)["0"] for i in range(3)]
    got, cached = [], []
    for i in range(3):
        rid = on.add_request(system + [200 + i], params)
        while on.has_unfinished():
            for out in on.step():
                if out.finished:
                    got.append(out.token_ids)
                    cached.append(out.metrics.num_cached_tokens)
        assert rid
    assert got == want
    assert cached[0] == 0 and cached[1] == cached[2] == 96  # 6 full blocks of 16
    assert on.kv.hit_rate > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_n_sequences_share_the_prompt(tiny_engines, overlap):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                            overlap_scheduling=overlap))
    prompt = list(range(5, 70))
    engine.add_request(prompt, SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=7),
                       "r")
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.finished]
    (out,) = outputs
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds
    # Siblings reused the first sequence's 4 full prompt blocks.
    assert engine.kv.num_cache_hits == 3 * 64
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_too_long_request_fails_alone(tiny_engines):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, **GREEDY), "good")
    with pytest.raises(RequestError, match="max_seq_len"):
        engine.add_request(list(range(3, 250)) * 2, SamplingParams(max_tokens=5), "long")
    with pytest.raises(RequestError, match="exceeds max_seq_len"):
        engine.add_request([5, 6], SamplingParams(max_tokens=1000), "greedy")
    with pytest.raises(RequestError, match="temperature"):
        engine.add_request([5, 6], SamplingParams(temperature=-1), "bad")
    done = [o for _ in range(10) for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"] and len(done[0].token_ids) == 5


def test_request_stats(tiny_engines):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=3, **GREEDY), "a")
    out = [o for _ in range(5) for o in engine.step() if o.finished][0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0


def test_overlap_with_penalties_and_early_stops(tiny_engines, alone):
    """Penalties make the engine apply in-flight tokens before launching; requests those
    tokens finish must drop out of the step (regression: IndexError in prepare)."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu", num_kv_blocks=16,
                                                            overlap_scheduling=True))
    prompts = make_prompts(8)
    stops = [alone[str(i)][len(alone[str(i)]) // 2] for i in range(8)]
    params = [SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.2,
                             stop_token_ids=[stops[i]]) for i in range(8)]
    done = run_all(engine, prompts, params)
    assert len(done) == 8
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_n_siblings_with_one_token_under_overlap(tiny_engines):
    from kiln import LLM

    llm = LLM(tiny_engines["llama"], device="cpu", overlap_scheduling=True)
    (out,) = llm.generate([5, 6, 7], SamplingParams(n=2, max_tokens=1, temperature=1.0))
    assert [len(c.token_ids) for c in out.outputs] == [1, 1]


@pytest.mark.parametrize("overlap", [False, True])
def test_prompt_logprobs_survive_preemption_and_abort(tiny_engines, overlap):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu", num_kv_blocks=16,
                                                            overlap_scheduling=overlap))
    prompt = list(range(20, 60))
    engine.add_request(prompt, SamplingParams(max_tokens=60, prompt_logprobs=1, **GREEDY), "p")
    for i, other in enumerate(make_prompts(6, seed=9)):  # crowd the pool: preemptions
        engine.add_request(other, SamplingParams(max_tokens=60, **GREEDY), f"o{i}")
    engine.add_request(prompt, SamplingParams(max_tokens=5, prompt_logprobs=1), "aborted")
    engine.step()
    engine.abort("aborted")  # while its step may be in flight
    results = {}
    while engine.has_unfinished():
        results.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_preemptions > 0
    assert len(results["p"].prompt_logprobs) == len(prompt)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_empty_stop_string_is_ignored(tiny_engines):
    assert SamplingParams(stop=["", "x"]).stop == ["x"]
    assert SamplingParams(stop="").stop == []
