"""The engine's warm-up steps (kiln.runtime.warmup), run on the CPU: every step goes through
the model (prompts and decode rows in both orders, the wide prefill), K/V only into the
scratch block. On a GPU they compile the kernels (tests/test_gpu_engine.py checks that
steps after load compile nothing)."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime import warmup
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from tests.test_runtime import make_prompts, run_all


def test_steps_cover_every_launch(tiny_engines, monkeypatch):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    model = engine.runner.model
    attn = model.attention_layers()[0]
    group = attn.num_heads // attn.num_kv_heads
    steps = warmup.warmup_steps(model, 512, 256, torch.device("cpu"))
    prompts = [s for s in steps if len(s) == 2 and s[0][0] > 1 == s[1][0]]  # prompt, decode row
    assert [s[0][0] for s in prompts] == warmup.prefill_lengths(model, 255)
    assert [(1, 256), (255, 255)] in steps  # a decode row first
    wide = steps[len(prompts) + 1]  # one 128-row tile a prompt, two programs an SM (8 here)
    (length, ctx), = set(wide)
    assert length == ctx and 64 < length * group <= 128
    assert len(wide) * attn.num_kv_heads >= 16
    decode = steps[len(prompts) + 2:]
    assert all(new == 1 for s in decode for new, _ in s)
    assert [s[0][1] for s in decode[:-2]] == [256] and [len(s) for s in decode[-2:]] == [2, 16]
    monkeypatch.setattr(warmup, "num_sms", lambda device: 10_000)  # capped by the budget
    assert len(warmup.wide_prefill_step(model, 100, torch.device("cpu"))) == 100 // length
    for budget in (8, 20):  # no step holds more tokens than a step may
        small = warmup.warmup_steps(model, budget, 256, torch.device("cpu"))
        assert small and all(sum(new for new, _ in s) <= budget for s in small)


class _Attn:
    def __init__(self, heads: int, kv_heads: int) -> None:
        self.num_heads, self.num_kv_heads = heads, kv_heads


class _Model:
    def __init__(self, *shapes: tuple[int, int]) -> None:
        self.layers = [_Attn(*s) for s in shapes]

    def attention_layers(self) -> list[_Attn]:
        return self.layers


@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8), (40, 8), (28, 4), (64, 8),
                                            (48, 4), (32, 2)])
def test_prefill_lengths_take_every_tile_size(heads, kv_heads):
    """The prefill kernel's query tile is min(128, max(16, next_pow2(prompt length x
    group))) rows: the warm-up's prompt lengths reach each size a prompt of 2 or more
    tokens can take, for GQA groups 1, 4, 5, 7, 8, 12, 16; two attention shapes in one
    model get both sets."""
    group = heads // kv_heads

    def tile(n: int) -> int:
        return min(128, max(16, 1 << (n * group - 1).bit_length()))

    got = {tile(n) for n in warmup.prefill_lengths(_Model((heads, kv_heads)), 4095)}
    assert got == {tile(n) for n in range(2, 4096)}
    both = warmup.prefill_lengths(_Model((heads, kv_heads), (32, 32)), 4095)
    assert set(warmup.prefill_lengths(_Model((32, 32)), 4095)) <= set(both)
    assert max(warmup.prefill_lengths(_Model((heads, kv_heads)), 20)) == 20  # capped at top


def test_decode_steps_take_every_split_count():
    """One decode row at contexts whose block-table widths give the decode kernel's split
    counts 1, 2, 4, ... 32 (256 tokens a split at least), capped at the longest context."""
    from kiln.kernels.attention_decode import MAX_SPLITS, MIN_TOKENS_PER_SPLIT

    ones = [s[0][1] for s in warmup.decode_steps(100_000) if len(s) == 1]
    assert {-(-ctx // MIN_TOKENS_PER_SPLIT) for ctx in ones} == \
        {1 << i for i in range(MAX_SPLITS.bit_length())}
    assert [s[0][1] for s in warmup.decode_steps(1000) if len(s) == 1] == [256, 512, 1001]


def test_warm_up_runs_and_leaves_the_cache_to_requests(tiny_engines):
    """The steps run through the model on the CPU, writing only the scratch block: the
    engine then gives the tokens of one that never warmed up."""
    prompts = make_prompts(6, seed=4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = run_all(LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu")), prompts,
                   params)
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    free = engine.kv.num_free_blocks
    assert warmup.warm_up(engine.runner, 512, engine.max_seq_len) > 0
    assert engine.kv.num_free_blocks == free
    assert run_all(engine, prompts, params) == want
    # and the graph-shaped steps of KILN_COMPILE_THREADS' skipped pass (kiln.runtime.
    # precompile): decode rows at each batch bucket, lone prompts at each token bucket
    from kiln.runtime.cuda_graphs import batch_buckets, prefill_buckets, prefill_graph_tokens
    from kiln.runtime.precompile import graph_steps

    tokens = min(200, engine.max_seq_len)  # as the engine passes them
    shaped = graph_steps(32, tokens, engine.max_seq_len)
    assert [len(s) for s in shaped if s[0][0] == 1] == batch_buckets(32)
    assert [s[0][0] for s in shaped if len(s) == 1 and s[0][0] > 1] == \
        prefill_buckets(prefill_graph_tokens(tokens))
    assert graph_steps(0, 8, 512) == []
    runner = engine.runner
    seen = []
    forward = runner._forward
    runner._forward = lambda ids, pos, meta: seen.append(len(ids)) or forward(ids, pos, meta)
    warmup.warm_up(runner, 512, engine.max_seq_len, shaped)
    assert all(sum(n for n, _ in s) in seen for s in shaped)  # each ran through the model
    del runner._forward
    assert engine.kv.num_free_blocks == free
    assert run_all(engine, prompts, params) == want


def test_full_width_decode_steps_take_every_split_count(monkeypatch):
    """Decode rows at the full block-table width, one step for each split count the decode
    kernel takes there, with the fewest rows that give it: on an H200 (132 SMs), 8 KV
    heads and a 32k limit, 32 / 16 / 8 / 4 / 2 splits at 1 / 4 / 8 / 16 / 32 rows (their
    128-key tiles compile at load, not inside the graph capture); capped by max_rows."""
    from kiln.kernels import attention_decode

    cpu = torch.device("cpu")
    monkeypatch.setattr(attention_decode, "num_sms", lambda device: 132)
    steps = warmup.full_width_decode_steps(_Model((32, 8)), 32768, cpu, 512)
    assert [len(s) for s in steps] == [1, 4, 8, 16, 32]
    assert all(s == [(1, 32768)] * len(s) for s in steps)
    splits = [attention_decode.choose_num_splits(len(s), 8, 32768, cpu) for s in steps]
    assert splits == [32, 16, 8, 4, 2]
    assert [len(s) for s in warmup.full_width_decode_steps(_Model((32, 8)), 32768, cpu, 8)] \
        == [1, 4, 8]
    assert warmup.full_width_decode_steps(_Model((32, 8)), 256, cpu, 512) == []  # one split
    # two attention shapes (e.g. 8 and 2 KV heads): the split counts of both
    both = warmup.full_width_decode_steps(_Model((32, 8), (32, 2)), 32768, cpu, 512)
    assert [len(s) for s in both] == [1, 4, 8, 16, 32, 64, 128]
    # and the warm-up takes them at the engine's limit (eager decode rows of any batch)
    got = warmup.warmup_steps(_Model((32, 8)), 512, 32768, cpu)
    assert all(s in got for s in steps if len(s) <= 512)
    # and at the decode graphs' width (the built limit) where the runtime limit is lower
    from types import SimpleNamespace

    runner = SimpleNamespace(engine=SimpleNamespace(build=SimpleNamespace(max_seq_len=32768)),
                             model=_Model((32, 8)), device=cpu)
    assert warmup.graph_width_steps(runner, 512, 2048) == steps
    assert warmup.graph_width_steps(runner, 512, 32768) == []  # warmup_steps' own width
    assert warmup.graph_width_steps(runner, 0, 2048) == []  # no graphs


def test_route_buckets_take_a_larger_bucket_only_when_faster():
    """A batch replays a larger bucket's decode graph only where that graph is faster than
    its own by more than the margin, and then the fastest of the larger ones."""
    from kiln.runtime.cuda_graphs import DecodeGraphs, describe_routes, route_buckets

    times = {16: 1.0, 32: 2.0, 48: 1.5, 64: 1.96, 80: 1.97}
    assert route_buckets(times, margin=0.03) == {16: 16, 32: 48, 48: 48, 64: 64, 80: 80}
    assert route_buckets({16: 3.0, 32: 2.5, 48: 1.0}) == {16: 48, 32: 48, 48: 48}
    # the smallest larger bucket as fast as the fastest (within the margin)
    assert route_buckets({16: 3.0, 32: 1.01, 48: 1.0, 64: 0.99}) == \
        {16: 32, 32: 32, 48: 48, 64: 64}
    assert route_buckets({16: 1.0, 32: 0.98}) == {16: 16, 32: 32}  # within the margin
    assert route_buckets({16: 2.0, 32: 1.8}) == {16: 32, 32: 32}
    # a tiny model's buckets: 10% apart is 0.03 ms, under the least worth a route
    assert route_buckets({16: 0.30, 32: 0.27}) == {16: 16, 32: 32}
    assert route_buckets({16: 0.30, 32: 0.27}, min_ms=0.0) == {16: 32, 32: 32}
    assert route_buckets({}) == {}
    graphs = object.__new__(DecodeGraphs)  # what the bench reports of them
    graphs.buckets, graphs.route = [1, 2, 4, 8, 16, 32, 48], {4: 16, 32: 48, 48: 48}
    assert graphs.moved_batches() == [(3, 4, 16), (17, 32, 48)]
    from kiln.bench.offline import _graph_routes

    graphs.replay_ms = {b: 1.0 + b / 100 for b in graphs.buckets}
    reported = _graph_routes(graphs)
    assert reported["graph_routes"][1] == {"batches": [17, 32], "replays": 48, "ms": 1.32,
                                           "replay_ms": 1.48}
    assert list(reported["graph_replay_ms"]) == ["1", "2", "4", "8", "16", "32", "48"]
    assert _graph_routes(None) == {}  # the CPU: no graphs
    assert describe_routes(reported["graph_routes"]) == \
        "batches 3-4 -> 16 (1.04 -> 1.16 ms), batches 17-32 -> 48 (1.32 -> 1.48 ms)"
