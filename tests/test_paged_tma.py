"""The prefill kernel's K / V tiles read by TMA (KILN_PREFILL_TMA=1, kiln.kernels.paged_tma)
for KV blocks of 64 or 128 tokens, in the interpreter: the same attention as the gather
path, bit for bit, over a pool whose slots past each context hold NaN (never written),
for float16 and e4m3 caches, plain and chunked prompts, a sliding window, a mixed step; and
which launches take it."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401
from tests.test_v_transposed import shuffled_tables

KV_HEADS, HEADS, HEAD_DIM = 2, 8, 32


def check_tma(cache_dtype: torch.dtype, block: int, block_n: int | None) -> None:
    from kiln.kernels import paged_tma
    from kiln.kernels import reference as ref
    from kiln.kernels.attention_prefill import paged_attention_mixed, paged_attention_prefill

    torch.manual_seed(0)
    lens, q_lens = [150, 70, 64], [150, 30, 64]  # the second a later chunk of its prompt
    tables, num_blocks = shuffled_tables(lens, block)
    pool = [torch.full((num_blocks, block, KV_HEADS, HEAD_DIM), float("nan")) for _ in "kv"]
    for i, n in enumerate(lens):
        for t in range(n):
            for c in pool:
                c[tables[i, t // block], t % block] = torch.randn(KV_HEADS, HEAD_DIM) * 2
    caches = [c.to(cache_dtype) for c in pool]
    scales = {}
    if cache_dtype.itemsize == 1:
        scales = dict(k_scale=torch.full((KV_HEADS,), 0.03), v_scale=torch.full((KV_HEADS,), 0.02))
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM).half()  # (bf16: not in the interpreter)
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    taken = []
    descriptors, enabled = paged_tma.descriptors, paged_tma.ENABLED
    paged_tma.descriptors = lambda *a: taken.append(a[2]) or descriptors(*a)

    def run(window: int | None = None) -> torch.Tensor:
        return paged_attention_prefill(q, *caches, tables, starts, seq_lens, max(q_lens), scale,
                                       block_n=block_n, sliding_window=window, **scales)

    # a mixed step: sequence 0 decodes its last token beside sequence 2's prompt
    mixed_q = torch.cat([q[starts[1] - 1:starts[1]], q[starts[2]:]])
    mixed_starts = torch.tensor([0, 1, 1 + q_lens[2]], dtype=torch.int32)

    def mixed() -> torch.Tensor | None:
        if block_n is not None:  # (the mixed launcher takes the default tiles)
            return None
        return paged_attention_mixed(mixed_q, *caches, tables[[0, 2]], mixed_starts,
                                     seq_lens[[0, 2]], q_lens[2], scale, 1, **scales)

    for name, fn in (("prefill", run), ("window 40", lambda: run(40)), ("mixed", mixed)):
        paged_tma.ENABLED = False
        want = fn()
        if want is None:
            continue
        paged_tma.ENABLED = True
        before = len(taken)
        got = fn()
        # the TMA path ran, except where the launch's tile is longer than a block (a lone
        # short prompt over an e4m3 cache takes 128-key tiles: attention_prefill's small grid)
        small_e4m3 = name == "mixed" and cache_dtype == torch.float8_e4m3fn and block == 64
        assert len(taken) == before + (not small_e4m3), name
        assert not got.isnan().any() and torch.equal(got, want), \
            (name, (got.float() - want.float()).abs().max().item())
    paged_tma.ENABLED, paged_tma.descriptors = enabled, descriptors
    # and the gather path agrees with the reference (stale NaN slots masked there too)
    finite = [torch.nan_to_num(c.float()).to(cache_dtype) for c in caches]
    want = ref.paged_attention(q, *finite, tables, starts.tolist(), lens, scale,
                               **scales).float()
    got = run().float()
    assert torch.allclose(got, want, atol=3e-2, rtol=3e-2), (got - want).abs().max().item()


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("block,block_n", [(64, None), (128, None), (64, 32)])
def test_tma_tiles_read_what_the_gather_reads(interp, cache_dtype, block, block_n) -> None:  # noqa: F811
    interp(check_tma, cache_dtype, block, block_n)


def test_which_caches_take_tma(monkeypatch) -> None:
    """Not when turned off, nor by default off a Hopper GPU (the interpreter, a CPU
    tensor); else with tiles inside one block, a power-of-two head dim, a 16-bit or e4m3
    cache in the usual layout and keys rotated before caching."""
    from kiln.kernels import paged_tma

    cache = torch.zeros(4, 64, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    monkeypatch.setattr(paged_tma, "ENABLED", None)  # the default
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, False, False)  # not on a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, False, False)
    monkeypatch.setattr(paged_tma, "ENABLED", False)
    assert not paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, False, False)
    monkeypatch.setattr(paged_tma, "ENABLED", True)
    assert paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, False, False)
    assert paged_tma.usable(cache.to(torch.float8_e4m3fn), 64, HEAD_DIM, HEAD_DIM, False, False)
    assert not paged_tma.usable(cache, 128, HEAD_DIM, HEAD_DIM, False, False)  # 2 blocks a tile
    assert not paged_tma.usable(torch.zeros(4, 16, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16),
                                64, HEAD_DIM, HEAD_DIM, False, False)
    assert not paged_tma.usable(cache, 64, 24, 32, False, False)  # head_dim padded
    assert not paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, True, False)  # sinks
    assert not paged_tma.usable(cache, 64, HEAD_DIM, HEAD_DIM, False, True)  # V transposed
    assert not paged_tma.usable(cache.to(torch.int8), 64, HEAD_DIM, HEAD_DIM, False, False)
    assert not paged_tma.usable(cache.float(), 64, HEAD_DIM, HEAD_DIM, False, False)


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_engine_with_other_block_sizes_gives_the_same_tokens(block_size, tiny_checkpoints,
                                                             tmp_path) -> None:
    """`--block-size`: an engine with 8-, 64- or 128-token KV blocks generates the 16-token
    engine's greedy tokens (CPU), prefix caching and chunked prompts included."""
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.runtime.request import SamplingParams
    from tests.test_runtime import make_prompts, run_all

    folder, _ = tiny_checkpoints["llama"]
    shared = list(range(5, 150))  # a common prefix: prefix-cache hits in whole blocks
    prompts = [shared + p for p in make_prompts(6, seed=2)] + make_prompts(4, seed=3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = {}
    for bs in (16, block_size):
        engine_dir = build(folder, tmp_path / f"bs{bs}", BuildConfig(
            dtype="float32", block_size=bs, max_seq_len=512, max_num_tokens=128),
            progress=False)
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu"))
        assert engine.kv.block_size == bs
        got[bs] = run_all(engine, prompts, params, arrivals=[i // 3 for i in range(10)])
    assert got[block_size] == got[16]


def test_block_size_checked_at_build(tiny_checkpoints, tmp_path) -> None:
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.errors import KilnError

    folder, _ = tiny_checkpoints["llama"]
    for bad in (48, 4, 512):
        with pytest.raises(KilnError, match="power of two from 8 to 256"):
            build(folder, tmp_path / str(bad), BuildConfig(block_size=bad), progress=False)
