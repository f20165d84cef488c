"""Speculative decoding: greedy identity with plain decoding, exact sampling, KV rollback."""

from __future__ import annotations

import random

import pytest
import torch

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from kiln.runtime.speculative import SpeculativeConfig, ngram_propose
from tests.test_runtime import make_prompts, run_all

GREEDY = dict(temperature=0, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 4}


def repeating_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase: the n-gram proposer finds matches in them."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 12))]
        prompts.append((phrase * 8)[:rng.randrange(10, 80)])
    return prompts


@pytest.fixture(scope="module")
def plain_llama(tiny_engines):
    return LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))


@pytest.fixture(scope="module")
def ngram_llama(tiny_engines):
    return LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                          speculative_config=NGRAM))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return repeating_prompts(6) + make_prompts(4, seed=3)


@pytest.fixture(scope="module")
def plain_outputs(plain_llama, prompts) -> dict[str, list[int]]:
    return run_all(plain_llama, prompts, SamplingParams(max_tokens=40, **GREEDY))


def test_ngram_proposer_finds_latest_longest_match():
    tokens = [5, 6, 7, 1, 5, 6, 8, 9, 5, 6]
    # "5 6" occurred at 0 and 4; the latest earlier one is followed by 8 9.
    assert ngram_propose(tokens, 3, 1, 4) == [8, 9, 5]
    assert ngram_propose([1, 2, 3], 2, 1, 4) == []  # nothing repeats
    assert ngram_propose([4, 4], 5, 1, 4) == [4]  # what follows, however short


def _brute_force_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposer_matches_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(400):
        tokens = [rng.randrange(rng.choice([2, 4, 50])) for _ in range(rng.randrange(1, 60))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(1, 6)
        assert ngram_propose(tokens, k, min_n, max_n) == \
            _brute_force_lookup(tokens, k, min_n, max_n), (tokens, k, min_n, max_n)


def test_config_errors_are_one_line():
    with pytest.raises(KilnError, match="method"):
        SpeculativeConfig.parse({"method": "medusa", "num_speculative_tokens": 2})
    with pytest.raises(KilnError, match="num_speculative_tokens"):
        SpeculativeConfig.parse({"method": "ngram"})
    with pytest.raises(KilnError, match="unknown"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "k": 1})
    with pytest.raises(KilnError, match="JSON"):
        SpeculativeConfig.parse("{method: ngram")
    with pytest.raises(KilnError, match="needs \"model\""):
        SpeculativeConfig.parse({"method": "draft_model", "num_speculative_tokens": 2})
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}') == \
        SpeculativeConfig("ngram", 3)



def test_keys_of_the_other_method_are_refused():
    """A key that does not apply to the method was accepted and ignored."""
    with pytest.raises(KilnError, match="model does not apply to method 'ngram'"):
        SpeculativeConfig.parse({"method": "ngram", "model": "/tmp",
                                 "num_speculative_tokens": 2})
    with pytest.raises(KilnError, match="prompt_lookup_max, prompt_lookup_min do not apply "
                       "to method 'draft_model'"):
        SpeculativeConfig.parse({"method": "draft_model", "model": "/tmp", "prompt_lookup_min":
                                 1, "prompt_lookup_max": 2, "num_speculative_tokens": 2})
    with pytest.raises(KilnError, match="prompt_lookup_min does not apply"):
        SpeculativeConfig.parse({"model": "/tmp", "prompt_lookup_min": 2,
                                 "num_speculative_tokens": 2})  # draft_model by its model
    # null is no value: what vLLM's full configs send for the other method's keys
    assert SpeculativeConfig.parse({"method": "ngram", "model": None,
                                    "num_speculative_tokens": 2}) == SpeculativeConfig("ngram", 2)


def test_ngram_greedy_identity_in_a_batch(ngram_llama, prompts, plain_outputs):
    """Every request speculates, in one continuous batch, with small token budgets."""
    got = run_all(ngram_llama, prompts, SamplingParams(max_tokens=40, **GREEDY),
                  arrivals=[i // 2 for i in range(len(prompts))])
    assert got == plain_outputs
    stats = ngram_llama.stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] > 0  # the repeating prompts pay off
    assert stats["kv_blocks_used"] == 0


def test_mixed_batch_chunked_prefill_and_rollback(tiny_engines, prompts, plain_outputs):
    """Plain and speculating requests share steps, prompts are chunked (small budget),
    and the pool is small enough to preempt; outputs still equal plain decoding."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", max_num_tokens=24, num_kv_blocks=24, speculative_config=NGRAM))
    original = engine.speculator.eligible
    # Odd requests never speculate: a batch mixes both kinds.
    engine.speculator.eligible = lambda r: int(r.request_id) % 2 == 0 and original(r)
    got = run_all(engine, prompts, SamplingParams(max_tokens=40, **GREEDY))
    assert got == plain_outputs
    assert engine.kv.num_used_blocks == 0
    assert engine.stats()["spec_num_accepted_tokens"] > 0


def test_stop_strings_max_tokens_and_eos_inside_an_accepted_run(tiny_engines, prompts):
    """Early stops land where plain decoding puts them, even mid-way through a draft."""
    plain = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    spec = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                          speculative_config=NGRAM))
    for i, prompt in enumerate(prompts[:3] + prompts[-1:]):
        reference = run_all(plain, [prompt], SamplingParams(max_tokens=30, **GREEDY))["0"]
        stop_token = reference[5 + i]
        for params in (SamplingParams(max_tokens=3 + i, **GREEDY),
                       SamplingParams(max_tokens=30, temperature=0,
                                      stop_token_ids=[stop_token]),
                       SamplingParams(max_tokens=30, temperature=0, ignore_eos=False)):
            a = run_all(plain, [prompt], params)
            b = run_all(spec, [prompt], params)
            assert a == b
    assert spec.kv.num_used_blocks == 0


def test_kv_rollback_invariants_under_random_traffic(tiny_engines):
    """Random arrivals, aborts and lengths with a proposer that is mostly wrong: blocks
    held always match the tokens kept, and all come back."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", num_kv_blocks=40, max_num_tokens=48,
        speculative_config={"method": "ngram", "num_speculative_tokens": 6}))
    rng = random.Random(7)
    prompts = repeating_prompts(12, seed=5) + make_prompts(12, seed=6)
    live: list[str] = []
    for step in range(120):
        if prompts and rng.random() < 0.4:
            rid = f"r{step}"
            engine.add_request(prompts.pop(), SamplingParams(
                max_tokens=rng.randrange(1, 30), **GREEDY), request_id=rid)
            live.append(rid)
        if live and rng.random() < 0.05:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
        for r in engine.scheduler.running:
            # Rolled back: the computed tokens are the kept ones but the last, and no
            # block past the kept tokens is held.
            assert r.num_computed_tokens <= r.num_tokens - 1
            assert engine.kv.blocks_needed(r.num_computed_tokens) <= len(r.block_ids) <= \
                engine.kv.blocks_needed(r.num_tokens)
        assert not any(r.block_ids for r in engine.scheduler.waiting)
        held = sum(len(r.block_ids) for r in engine.scheduler.running)
        assert sum(engine.kv.ref_counts) == held
        assert engine.kv.num_used_blocks == sum(1 for c in engine.kv.ref_counts if c)
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.num_used_blocks == 0
    assert all(c == 0 for c in engine.kv.ref_counts)
    assert engine.stats()["spec_num_draft_tokens"] > engine.stats()["spec_num_accepted_tokens"]


def test_verify_rows_of_a_wrong_draft(tiny_engines):
    """A proposer that is always wrong costs nothing in correctness."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                            speculative_config=NGRAM))
    plain = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    speculator = engine.speculator

    def wrong(requests):
        for r in requests:
            r.spec_token_ids = [(r.token_ids[-1] + 1 + j) % 256 for j in range(3)]
    speculator._propose = wrong
    prompt = make_prompts(1, seed=9)[0]
    params = SamplingParams(max_tokens=20, **GREEDY)
    assert run_all(engine, [prompt], params) == run_all(plain, [prompt], params)
    assert engine.kv.num_used_blocks == 0


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test p-value; cells expected under 5 times are pooled."""
    keep = expected > 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp * obs.sum() / exp.sum()
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(len(obs) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # P(chi2_dof > statistic)


def _filtered(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """softmax with all but the top_k tokens zeroed, written out here as the reference."""
    probs = torch.softmax(logits.double(), dim=-1)
    kth = probs.topk(top_k, dim=-1).values[..., -1:]
    probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("draft", ["one-hot", "distribution"])
def test_rejection_sampling_follows_the_target(tiny_engines, tiny_checkpoints, draft):
    """The first verified token, drawn with a deliberately bad proposer, has the joint
    distribution p(t1) p(t2 | t1) of the target (transformers), by a chi-square test."""
    hf = tiny_checkpoints["llama"][1]
    prompt, top_k, num_samples = [1, 17, 33, 80, 5, 200, 41, 9], 5, 600
    with torch.no_grad():
        p1 = _filtered(hf(torch.tensor([prompt])).logits[0, -1], top_k)
        contexts = torch.tensor([prompt + [t] for t in range(256)])
        p2 = _filtered(hf(contexts).logits[:, -1], top_k)  # [t1, t2]
    expected = (p1[:, None] * p2).flatten() * num_samples
    # The bad proposal: every token the target could pick for t2 and a few it cannot,
    # with weights that have nothing to do with the target's.
    plausible = {t for t1 in p1.topk(top_k).indices.tolist()
                 for t in p2[t1].topk(top_k).indices.tolist()}
    support = sorted(plausible) + [3, 4, 250]
    weights = [random.Random(t).uniform(0.1, 5) for t in support]
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", max_batch_size=256, max_num_tokens=4096,
        speculative_config={"method": "ngram", "num_speculative_tokens": 1}))

    def bad_proposer(requests):
        for r in requests:
            if r.num_output_tokens != 1:
                continue  # one draft, for the second token
            rng = random.Random(r.sampling_seed)
            if draft == "one-hot":  # deterministic: q is one-hot on the target's 2nd pick
                r.spec_token_ids = [p2[r.token_ids[-1]].topk(2).indices[1].item()]
                continue
            token = rng.choices(support, weights)[0]
            q = torch.zeros(1, 256)
            q[0, support] = torch.tensor(weights) / sum(weights)
            r.spec_token_ids, r.spec_draft_probs = [token], q
    engine.speculator._propose = bad_proposer
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, seed=seed,
                             ignore_eos=True) for seed in range(num_samples)]
    out = run_all(engine, [prompt] * num_samples, params)
    observed = torch.zeros(256 * 256, dtype=torch.float64)
    for tokens in out.values():
        observed[tokens[0] * 256 + tokens[1]] += 1
    stats = engine.stats()
    assert 0.1 < stats["spec_acceptance_rate"] < 0.9  # the test exercises both branches
    assert _chi_square_p(observed, expected) > 1e-3
    # A target that ignores what was rejected would fail the same test.
    assert observed[expected == 0].sum() == 0


def test_seeded_sampling_is_reproducible_across_batches(ngram_llama, prompts):
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    together = run_all(ngram_llama, prompts, params)
    staggered = run_all(ngram_llama, prompts, params, arrivals=list(range(len(prompts))))
    alone = {str(i): run_all(ngram_llama, [p], [params[i]])["0"]
             for i, p in enumerate(prompts[:3])}
    assert together == staggered
    assert all(together[i] == alone[i] for i in alone)


@pytest.mark.parametrize("draft_arch", ["llama", "llama3-rope-tied"])
def test_draft_model_greedy_identity(tiny_engines, prompts, plain_outputs, draft_arch):
    """The target drafting for itself (every draft accepted) and another random model
    (most rejected) both give plain decoding's tokens, and free both KV pools."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", max_num_tokens=64, speculative_config={
            "method": "draft_model", "model": str(tiny_engines[draft_arch]),
            "num_speculative_tokens": 3}))
    got = run_all(engine, prompts, SamplingParams(max_tokens=40, **GREEDY),
                  arrivals=[i // 3 for i in range(len(prompts))])
    assert got == plain_outputs
    rate = engine.stats()["spec_acceptance_rate"]
    assert rate > 0.95 if draft_arch == "llama" else rate < 0.5
    assert engine.kv.num_used_blocks == 0
    assert engine.speculator.draft.kv.num_used_blocks == 0


def test_cli_run_with_speculation_prints_the_same_text(capsys):
    from kiln.cli import main
    from tests.test_serve_support import tiny_chat_engine

    engine = str(tiny_chat_engine())
    args = ["run", engine, "--prompt", "one two three one two three one two", "--device",
            "cpu", "--max-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative-config",
                        '{"method": "ngram", "num_speculative_tokens": 3}']) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "speculative: acceptance" in captured.err
    assert main(args + ["--speculative-config", '{"method": "ngram"}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error:") and "num_speculative_tokens" in err
    assert "\n" not in err


def test_draft_with_another_vocabulary_is_refused(tiny_engines):
    from tests.test_serve_support import tiny_chat_engine

    with pytest.raises(KilnError, match="vocabulary"):
        LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu", speculative_config={
            "method": "draft_model", "model": str(tiny_chat_engine()),
            "num_speculative_tokens": 2}))


# ---- SmolLM2 (the real tokenizer and weights) ---------------------------------------------
SMOL_PROMPTS = [
    "Repeat this list exactly: apples, pears, plums, cherries, apples, pears, plums, "
    "cherries, apples, pears,",
    "The history of the printing press begins",
]


@pytest.fixture(scope="module")
def smol_plain(smollm2_engine) -> dict[str, list[int]]:
    engine = LLMEngine(smollm2_engine, RuntimeConfig(device="cpu", max_seq_len=256))
    return run_all(engine, SMOL_PROMPTS, SamplingParams(max_tokens=20, temperature=0))


@pytest.mark.parametrize("config", [
    NGRAM,
    {"method": "draft_model", "model": "SELF", "num_speculative_tokens": 3},
    {"method": "draft_model", "model": "TINY", "num_speculative_tokens": 2},
], ids=["ngram", "self-draft", "tiny-random-draft"])
def test_smollm2_greedy_identity(smollm2_engine, smol_plain, config):
    from tests.test_serve_support import tiny_chat_engine

    model = {"SELF": str(smollm2_engine), "TINY": str(tiny_chat_engine())}.get(
        config.get("model"))
    config = {**config, "model": model} if model else config
    engine = LLMEngine(smollm2_engine, RuntimeConfig(device="cpu", max_seq_len=256,
                                                     speculative_config=config))
    got = run_all(engine, SMOL_PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert got == smol_plain
    rate = engine.stats()["spec_acceptance_rate"]
    if config.get("model") == str(smollm2_engine):
        assert rate > 0.9
    elif config["method"] == "ngram":
        assert rate > 0.3  # the list repeats
    assert engine.kv.num_used_blocks == 0


def test_padded_verify_layout_of_the_graphs(tiny_engines, prompts, plain_outputs):
    """The CUDA-graph verify step's layout (every sequence padded to k + 1 queries, a
    padded batch, filler K/V in the scratch block), run eagerly on the CPU: same tokens
    as plain decoding, with plain and speculating requests in its batches."""
    from kiln.runtime.speculative import VerifyGraphs

    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(
        device="cpu", speculative_config=NGRAM))
    graphs = VerifyGraphs(engine.runner, 8, NGRAM["num_speculative_tokens"], capture=False)
    engine.runner.verify_graphs = graphs
    used = []
    run_graph = graphs.run
    graphs.run = lambda entries: used.append(len(entries)) or run_graph(entries)
    original = engine.speculator.eligible
    engine.speculator.eligible = lambda r: int(r.request_id) % 3 != 1 and original(r)
    got = run_all(engine, prompts, SamplingParams(max_tokens=40, **GREEDY))
    assert got == plain_outputs
    assert used and max(used) > 1  # batches went through the padded layout
    assert engine.kv.num_used_blocks == 0


# ---- rollback invariants, model-free (hypothesis) -------------------------------------------
def test_rollback_invariants_hypothesis():
    """Random traffic through the real scheduler, KV manager and Speculator.after_step,
    with the model replaced by a stub that accepts a random number of each request's
    drafts: block references, the free queue and the prefix cache stay consistent, the
    prefix cache never holds a rejected draft, and every block comes back."""
    from types import SimpleNamespace

    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from kiln.runtime.kv_cache import KVCacheManager
    from kiln.runtime.request import PLACEHOLDER, Request, RequestStatus
    from kiln.runtime.scheduler import Scheduler
    from kiln.runtime.speculative import Speculator
    from tests.test_scheduler_properties import BLOCK, check_invariants

    @settings(max_examples=150, deadline=None)
    @example(ops=[("add", 6, 16), ("add", 4, 10), ("add", 16, 11)], num_blocks=16,
             budget=10, k=1, prefix=False)  # found by CI's hypothesis run
    @given(ops=st.lists(st.one_of(
        st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 16)),
        st.tuples(st.just("step"), st.lists(st.integers(0, 8), min_size=6, max_size=6)),
        st.tuples(st.just("abort"), st.integers(0, 30))), min_size=1, max_size=50),
        num_blocks=st.integers(16, 40), budget=st.integers(2, 64), k=st.integers(1, 6),
        prefix=st.booleans())
    def run(ops, num_blocks, budget, k, prefix):
        kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=prefix)
        sched = Scheduler(kv, 4, budget)
        engine = SimpleNamespace(kv=kv, scheduler=sched, runner=None,
                                 runtime=SimpleNamespace(cuda_graphs=False))
        spec = Speculator(engine, SpeculativeConfig("ngram", k))
        live: dict[str, Request] = {}
        max_len = (num_blocks // 2) * BLOCK

        def step(accept: list[int]) -> None:
            out = sched.schedule()
            assert out.num_tokens <= budget
            for entry in out.scheduled:  # drafts fit in the blocks handed out
                r = entry.request
                assert r.num_computed_tokens + entry.num_new_tokens <= len(r.block_ids) * BLOCK
            sched.update(out)
            rows, tokens = [], []
            for i, entry in enumerate(out.scheduled):
                r, drafts = entry.request, entry.spec_token_ids
                if not entry.sample:
                    continue
                kept = min(accept[i % len(accept)], len(drafts))
                emitted = drafts[:kept] + [7]
                start = r.num_tokens
                r.token_ids += [PLACEHOLDER] * (len(drafts) + 1)
                rows += [r] * (len(drafts) + 1)
                tokens += emitted + [PLACEHOLDER] * (len(drafts) - kept)
                for j, token in enumerate(emitted):  # as apply_token
                    r.token_ids[start + j] = token
                    if r.num_output_tokens - (len(r.token_ids) - start - j - 1) >= \
                            r.max_tokens:
                        del r.token_ids[start + j + 1:]
                        sched.finish(r, RequestStatus.FINISHED_LENGTH)
                        del live[r.request_id]
                        break
            spec.after_step(rows, tokens)
            for r in sched.running:
                assert not r.spec_token_ids or r.num_tokens - r.num_computed_tokens == 1
                assert len(r.block_ids) <= kv.blocks_needed(r.num_tokens)
                # What the prefix cache holds of it are hashes of its real tokens.
                fresh = Request("check", r.token_ids, r.params, r.max_tokens)
                assert r.block_hashes[:r.num_committed_blocks] == \
                    kv._hashes(fresh, r.num_committed_blocks)
            check_invariants(sched, live)

        next_id = 0
        for op in ops:
            if op[0] == "add":
                _, prompt_len, max_tokens = op
                prompt = ([5, 6, 7, 8] * 10)[:min(prompt_len, max_len - max_tokens)]
                r = Request(str(next_id), prompt, SamplingParams(max_tokens=max_tokens),
                            max_tokens)
                next_id += 1
                live[r.request_id] = r
                sched.add(r)
            elif op[0] == "step":
                step(op[1])
            elif (target := live.get(str(op[1]))) is not None:
                sched.finish(target, RequestStatus.FINISHED_ABORTED)
                del live[target.request_id]
        for _ in range(3000):
            if not sched.has_unfinished():
                break
            step([3, 0, 8, 1])
        assert not sched.has_unfinished() and not live
        assert kv.num_free_blocks == kv.num_blocks

    run()


def test_per_request_draft_counts(ngram_llama, prompts, plain_outputs):
    """SamplingParams.num_speculative_tokens: one batch of requests asking for the engine's
    k (None), fewer (1, 2) and none (0) decodes exactly as without speculation; each stays
    within its own k, the one with 0 proposes nothing; more than the engine's k, or any on
    an engine without speculation, is refused when added."""
    asked = [None, 0, 1, 2]
    engine_k = ngram_llama.speculator.config.num_speculative_tokens
    for i, prompt in enumerate(prompts):
        ngram_llama.add_request(prompt, SamplingParams(
            max_tokens=40, num_speculative_tokens=asked[i % 4], **GREEDY), f"k{i}")
    got: dict[str, list[int]] = {}
    metrics = {}
    while ngram_llama.has_unfinished():
        for out in ngram_llama.step():
            if out.finished:
                got[out.request_id[1:]] = out.token_ids
                metrics[int(out.request_id[1:])] = out.metrics
    assert got == plain_outputs
    for i, m in metrics.items():
        k = engine_k if asked[i % 4] is None else asked[i % 4]
        assert m.num_draft_tokens <= k * m.num_spec_steps, (i, k, m)
        if k == 0:
            assert m.num_draft_tokens == m.num_spec_steps == 0
    assert sum(m.num_draft_tokens for i, m in metrics.items() if asked[i % 4] == 1) > 0
    assert ngram_llama.kv.num_used_blocks == 0
    with pytest.raises(RequestError, match="at most"):
        ngram_llama.add_request([5, 6, 7], SamplingParams(num_speculative_tokens=engine_k + 1))
    for bad, words in ((-1, "integer >= 0"), (1.5, "whole number"), (True, "whole number")):
        with pytest.raises(RequestError, match=f"^num_speculative_tokens must be an? {words}"):
            SamplingParams(num_speculative_tokens=bad)


def test_per_request_drafts_need_a_speculative_engine(plain_llama):
    with pytest.raises(RequestError, match="without speculative decoding"):
        plain_llama.add_request([5, 6, 7], SamplingParams(num_speculative_tokens=2))
    plain_llama.add_request([5, 6, 7], SamplingParams(max_tokens=2, num_speculative_tokens=0),
                            "zero-drafts")  # 0 is plain decoding anywhere
    while plain_llama.has_unfinished():
        plain_llama.step()


def test_request_and_engine_stats_agree_with_metrics(ngram_llama):
    from kiln.serve.metrics import _EngineCollector

    ngram_llama.speculator.reset_stats()
    metrics = []
    for i, prompt in enumerate(repeating_prompts(3, seed=11)):
        ngram_llama.add_request(prompt, SamplingParams(max_tokens=16, **GREEDY), f"m{i}")
    while ngram_llama.has_unfinished():
        metrics += [out.metrics for out in ngram_llama.step() if out.finished]
    stats = ngram_llama.stats()
    assert sum(m.num_draft_tokens for m in metrics) == stats["spec_num_draft_tokens"]
    assert sum(m.num_accepted_tokens for m in metrics) == stats["spec_num_accepted_tokens"]
    # Each verify step emits its accepted drafts plus one token; the first token comes
    # from the prompt's step: the 16 tokens are at least all of those.
    for m in metrics:
        assert 1 + m.num_spec_steps + m.num_accepted_tokens <= 16
        assert 0 <= m.num_accepted_tokens <= m.num_draft_tokens
    families = {f.name: f.samples[0].value for f in _EngineCollector(ngram_llama.stats).collect()}
    assert families["kiln_spec_acceptance_rate"] == pytest.approx(
        stats["spec_num_accepted_tokens"] / stats["spec_num_draft_tokens"])
    assert families["kiln_spec_draft_tokens"] == stats["spec_num_draft_tokens"] > 0
    assert families["kiln_spec_mean_accepted_length"] > 1


def test_logprobs_of_accepted_tokens_match_plain_decoding(plain_llama, ngram_llama):
    prompt = repeating_prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=12, logprobs=2, **GREEDY)
    outs = []
    accepted = ngram_llama.speculator.num_accepted_tokens
    for engine in (plain_llama, ngram_llama):
        engine.add_request(prompt, params, "lp")
        while engine.has_unfinished():
            outs += [o.outputs[0] for o in engine.step() if o.finished]
    plain, spec = outs
    assert ngram_llama.speculator.num_accepted_tokens > accepted  # drafts were taken
    assert spec.token_ids == plain.token_ids
    for a, b in zip(plain.logprobs, spec.logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert spec.cumulative_logprob == pytest.approx(plain.cumulative_logprob, abs=1e-3)


def test_launch_shapes_count_drafts_with_their_decode_rows(tiny_engines, prompts):
    """What `kiln bench` splits its step times by (engine.last_launch): prompt tokens are
    the prompts' own (no preemption here), whatever the drafts verified beside them."""
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu",
                                                            speculative_config=NGRAM))
    engine.record_launches = True
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=20, **GREEDY), f"r{i}")
    prompt_tokens = rows = 0
    while engine.has_unfinished():
        engine.last_launch = None
        engine.step()
        if engine.last_launch is not None:
            rows += engine.last_launch[0]
            prompt_tokens += engine.last_launch[1]
    assert engine.stats()["spec_num_draft_tokens"] > 0
    assert prompt_tokens == sum(len(p) for p in prompts)
    assert 0 < rows < len(prompts) * 19  # accepted drafts save decode rows
