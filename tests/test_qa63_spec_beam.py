"""QA 63: speculative decoding, beam search and prefix caching as a vLLM user meets them."""

from __future__ import annotations

import random

import pytest

from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.speculative import SpeculativeConfig

GREEDY = dict(temperature=0, ignore_eos=True)


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
         ) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=str(i))
    results: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in results
                results[out.request_id] = out.outputs[0].token_ids
    return results


def _self_draft(engine_dir, k: int = 4) -> dict:
    """The target as its own draft: every draft is the target's pick (all accepted)."""
    return {"method": "draft_model", "model": str(engine_dir), "num_speculative_tokens": k,
            "adaptive": False}


# ---- LongRoPE: drafts never cross the original context ---------------------------------
@pytest.fixture(scope="module")
def longrope_engine(tmp_path_factory):
    """Phi-3 LongRoPE (original context 256) built for 384 tokens: sequences cross it."""
    from kiln.build import build
    from kiln.config import BuildConfig
    from tests.conftest import make_hf_model

    root = tmp_path_factory.mktemp("longrope")
    make_hf_model("phi3-longrope", root / "hf")
    return build(root / "hf", root / "engine", BuildConfig(
        dtype="float32", max_batch_size=8, max_seq_len=384, max_num_tokens=512),
        progress=False)


def test_speculative_greedy_equals_plain_across_the_longrope_boundary(longrope_engine):
    """A verify step at a sequence just short of LongRoPE's original context computed its
    drafts' positions past it with the short factors (plain decoding recomputes the
    sequence with the long ones first): greedy tokens differed from plain decoding."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (248, 252)]
    params = SamplingParams(max_tokens=14, **GREEDY)
    plain = LLMEngine(longrope_engine, RuntimeConfig(device="cpu"))
    assert plain.scheduler.long_rope_after == 256
    spec = LLMEngine(longrope_engine, RuntimeConfig(
        device="cpu", speculative_config=_self_draft(longrope_engine)))
    assert _run(spec, prompts, params) == _run(plain, prompts, params)
    assert spec.stats()["spec_num_accepted_tokens"] > 0
    assert spec.kv.num_free_blocks == spec.kv.num_blocks


def test_scheduler_caps_drafts_at_the_longrope_boundary():
    kv = KVCacheManager(32, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    sched.long_rope_after = 10
    r = Request("a", list(range(3, 11)), SamplingParams(max_tokens=8), 8)  # 8 tokens
    sched.add(r)
    sched.update(sched.schedule())  # its prompt
    r.token_ids.append(50)  # 9 tokens, the last one to compute
    r.spec_token_ids = [51, 52, 53, 54]
    out = sched.schedule()
    # positions 8 and 9 (< 10) only: the last token and one draft
    assert [e.spec_token_ids for e in out.scheduled] == [[51]]
    assert r.spec_token_ids == [51]


# ---- stats count the drafts that were verified -------------------------------------------
def test_stats_count_only_the_drafts_a_small_token_budget_verified(tiny_engines):
    """With a token budget below 1 + k, the scheduler verifies fewer drafts than were
    proposed, but the speculator counted all k (37 drafts for 19 verified here): a draft
    model that agrees with the target reported an acceptance rate near 0.5, not 1."""
    engine_dir = tiny_engines["llama"]
    spec = LLMEngine(engine_dir, RuntimeConfig(device="cpu", max_num_tokens=3,
                                               speculative_config=_self_draft(engine_dir)))
    verified = []
    launch = spec.runner.launch

    def counting_launch(out, previous=None):
        verified.append(sum(len(e.spec_token_ids) for e in out.scheduled))
        return launch(out, previous)

    spec.runner.launch = counting_launch
    spec.add_request([5, 6, 7, 8] * 6, SamplingParams(max_tokens=30, **GREEDY), "0")
    final = None
    while spec.has_unfinished():
        for out in spec.step():
            final = out
    stats = spec.stats()
    assert sum(verified) > 0
    assert stats["spec_num_draft_tokens"] == sum(verified)
    assert 0 < stats["spec_num_accepted_tokens"] <= sum(verified)
    assert final.metrics.num_draft_tokens == sum(verified)


def test_drafts_not_verified_when_their_blocks_do_not_fit_are_dropped():
    """A request whose drafts' blocks do not fit decodes plainly: its drafts must go, or
    the speculator counts them as verified (and rejected: a miss that pauses it)."""
    kv = KVCacheManager(2, 4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    r = Request("a", [3, 4, 5], SamplingParams(max_tokens=8), 8)
    other = Request("b", [9, 9, 9], SamplingParams(max_tokens=1), 1)
    sched.add(r)
    sched.add(other)
    sched.update(sched.schedule())  # both prompts: one block each, none left
    other.token_ids.append(9)  # its one token: done, not scheduled again
    r.token_ids.append(6)  # 4 tokens: still inside its block
    r.spec_token_ids = [7, 8]  # would need a second block
    out = sched.schedule()
    entry = next(e for e in out.scheduled if e.request is r)
    assert entry.num_new_tokens == 1 and entry.spec_token_ids == []
    assert r.spec_token_ids == [] and r.spec_draft_probs is None


# ---- speculative_config values of the wrong kind --------------------------------------------
@pytest.mark.parametrize("config, match", [
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": 5}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": ["a"]}, "model"),
    ({"num_speculative_tokens": 2, "model": {"path": "x"}}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": True},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, 3: 1, "k": 2}, "unknown"),
])
def test_bad_speculative_config_values_are_one_line_errors(config, match):
    """A non-path draft model reached the engine's loader as a TypeError traceback; mixed
    key types broke the unknown-keys message; True passed as a lookup length."""
    with pytest.raises(KilnError, match=match):
        SpeculativeConfig.parse(config)


def test_a_path_object_is_a_draft_model(tiny_engines):
    config = SpeculativeConfig.parse({"method": "draft_model", "num_speculative_tokens": 2,
                                      "model": tiny_engines["llama"]})
    assert config.model == tiny_engines["llama"]


def test_a_request_waiting_for_blocks_counts_once_in_the_prefix_hit_rate():
    """match_prefix counted a lookup every step a request waited for room (its tokens
    added to the queries again and again): the hit rate sank under load."""
    from kiln.runtime.kv_cache import KVCacheManager
    from kiln.runtime.request import Request, RequestStatus
    from kiln.runtime.scheduler import Scheduler

    block = 4
    kv = KVCacheManager(5, block, enable_prefix_caching=True)
    sched = Scheduler(kv, 4, 64, "max_utilization", True)
    first = Request("a", list(range(10, 22)), SamplingParams(max_tokens=4), 4)  # 3 blocks
    second = Request("b", list(range(30, 42)), SamplingParams(max_tokens=4), 4)
    sched.add(first)
    sched.add(second)
    for _ in range(3):  # the second waits: 2 blocks left (1 once the first decodes), 3 needed
        out = sched.schedule()
        sched.update(out)
        for entry in out.scheduled:
            if entry.sample:
                entry.request.token_ids.append(7)
    assert second.status is RequestStatus.WAITING and first.status is RequestStatus.RUNNING
    assert kv.num_cache_queries == 12
    sched.finish(first, RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert second.status is RequestStatus.RUNNING
    assert (kv.num_cache_queries, kv.num_cache_hits) == (24, 0)
    sched.update(out)
    sched.finish(second, RequestStatus.FINISHED_ABORTED)
    third = Request("c", list(range(30, 42)), SamplingParams(max_tokens=4), 4)
    sched.add(third)
    sched.schedule()
    assert (kv.num_cache_queries, kv.num_cache_hits) == (36, 8)  # 2 full blocks, 1 left
