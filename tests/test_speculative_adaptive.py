"""Adaptive speculation: requests whose drafts keep failing pause (their steps overlap as
without speculation) and resume later; outputs stay those of plain decoding."""

from __future__ import annotations

import random

import pytest

from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from kiln.runtime.speculative import SpeculativeConfig
from kiln.runtime.speculative.speculator import (
    MISSES_BEFORE_PAUSE,
    PAUSE_GROWTH,
    PAUSE_MAX,
    PAUSE_MIN,
)
from tests.test_runtime import make_prompts, run_all
from tests.test_speculative import NGRAM, repeating_prompts

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return repeating_prompts(5, seed=7) + make_prompts(3, seed=11)


@pytest.fixture(scope="module")
def plain(tiny_engines, prompts) -> dict[str, list[int]]:
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    return run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY))


def _wrong_drafts(engine: LLMEngine) -> None:
    """Drafts that are never the model's greedy choice: every verify step misses."""
    vocab = engine.config.model.vocab_size

    def propose(requests):
        for r in requests:
            room = min(4, r.max_tokens - r.num_output_tokens - 1)
            last = r.token_ids[-1]
            r.spec_token_ids = [(last + 1 + i) % vocab for i in range(max(room, 0))]
    engine.speculator._propose = propose


def _pause_schedule(tokens: int) -> int:
    """Verify steps an always-missing request runs in `tokens` output tokens: it pauses
    after MISSES_BEFORE_PAUSE misses in a row, then probes once per pause (4, 16, ... 256)."""
    produced, misses, steps = 0, 0, 0
    while produced < tokens:
        steps += 1
        produced += 1  # a missed verify step still emits the target's own token
        misses += 1
        if misses >= MISSES_BEFORE_PAUSE:
            produced += min(PAUSE_MIN * PAUSE_GROWTH ** (misses - MISSES_BEFORE_PAUSE),
                            PAUSE_MAX)
    return steps


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_failing_drafts_pause_and_outputs_stay_exact(tiny_engines, prompts, plain, overlap):
    """Drafts that always miss: each request runs only a few verify steps (the pause
    schedule), and with overlap scheduling the paused steps overlap; greedy tokens equal
    plain decoding and the KV pool drains."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", speculative_config=NGRAM, overlap_scheduling=overlap))
    _wrong_drafts(engine)
    got = run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY))
    assert got == plain
    stats = engine.stats()
    assert stats["spec_num_accepted_tokens"] == 0
    verify_steps = engine.speculator.num_verify_steps
    assert 0 < verify_steps <= len(prompts) * _pause_schedule(48)
    assert verify_steps < len(prompts) * 48 / 4  # far fewer than one per token
    assert stats["kv_blocks_used"] == 0


def test_without_adaptive_every_step_verifies(tiny_engines, prompts, plain):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", speculative_config={**NGRAM, "adaptive": False}))
    _wrong_drafts(engine)
    got = run_all(engine, prompts[:2], SamplingParams(max_tokens=48, **GREEDY))
    assert got == {k: plain[k] for k in ("0", "1")}
    # Every decode step with room for a draft verifies one (46 of a request's 48 tokens
    # come from decode steps with room; a step's token budget may cut one).
    assert 2 * 44 <= engine.speculator.num_verify_steps <= 2 * 46


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_good_drafts_keep_speculating_in_a_mixed_batch(tiny_engines, prompts, plain, overlap):
    """Repeating prompts (the n-gram proposer pays) next to random ones (it seldom does),
    arriving over time, with overlap scheduling on or off: outputs equal plain decoding,
    and the repeating requests keep most of their drafts."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", speculative_config=NGRAM, overlap_scheduling=overlap))
    got = run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY),
                  arrivals=[random.Random(i).randrange(6) for i in range(len(prompts))])
    assert got == plain
    stats = engine.stats()
    assert stats["spec_acceptance_rate"] > 0.4  # 0.48 measured (random prompts miss more)
    assert stats["kv_blocks_used"] == 0


def test_draft_model_resumes_after_a_pause(tiny_engines, prompts, plain):
    """A draft model whose shadow falls behind while paused catches up when its request
    resumes (one longer catch-up forward): same tokens as plain decoding."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", overlap_scheduling=True, speculative_config={
            "method": "draft_model", "model": str(tiny_engines["llama"]),
            "num_speculative_tokens": 3}))
    draft = engine.speculator.draft
    calls = []
    original = draft.propose

    def propose(requests, ks):  # every other proposal is spoiled: misses, pauses
        original(requests, ks)
        calls.append(len(requests))
        if len(calls) % 2:
            for r in requests:
                r.spec_token_ids = [(t + 1) % engine.config.model.vocab_size
                                    for t in r.spec_token_ids]
    draft.propose = propose
    got = run_all(engine, prompts[:3], SamplingParams(max_tokens=48, **GREEDY))
    assert got == {k: plain[k] for k in ("0", "1", "2")}
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert not draft.shadows and engine.kv.num_used_blocks == 0


def test_adaptive_must_be_a_boolean():
    assert SpeculativeConfig.parse({**NGRAM}).adaptive is True
    with pytest.raises(KilnError, match="adaptive must be true or false"):
        SpeculativeConfig.parse({**NGRAM, "adaptive": "yes"})
