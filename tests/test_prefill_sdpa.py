"""Fresh prompts through SDPA (kiln.kernels.attention_sdpa, the default on GPUs) on the CPU:
the gather of the step's own keys and values by its slot mapping, 1-byte caches, runs of
equal-length prompts batched, decode rows of a mixed step apart, against the reference
paged attention; and which steps may take it. SDPA's cuDNN backend itself is checked on a
GPU (tests/test_kernels_gpu.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kiln.kernels import attention_sdpa as sdpa
from kiln.kernels import reference as ref
from kiln.layers.attention import AttentionMetadata
from tests.test_kernels import _paged_batch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 16, 8


def reference_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, **extra):
    assert block_tables.shape[0] == q.shape[0] == seq_lens.shape[0]
    out.copy_(ref.paged_attention(q, k_cache, v_cache, block_tables,
                                  list(range(q.shape[0] + 1)), seq_lens.tolist(), scale,
                                  **extra))


def _meta(tables, starts, seq_lens) -> AttentionMetadata:
    """The step's metadata with its real slot mapping: query row r of sequence i (its
    last q_len tokens) is written at its position's slot."""
    slots = []
    for i, n in enumerate(seq_lens):
        q_len = starts[i + 1] - starts[i]
        for pos in range(n - q_len, n):
            slots.append(int(tables[i, pos // BLOCK]) * BLOCK + pos % BLOCK)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=tables,
        seq_lens=torch.tensor(seq_lens).int(), query_start_loc=torch.tensor(starts).int(),
        query_starts_host=list(starts), seq_lens_host=list(seq_lens),
        max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
        max_seq_len=max(seq_lens))


@pytest.mark.parametrize("cache", [None, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("decode_rows", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [False, True])
def test_sdpa_path_matches_reference(monkeypatch, cache, decode_rows, dtype, chunks) -> None:
    """Decode rows first (as the scheduler orders a mixed step), then whole prompts: two
    of one length (one batched call), one of another, a one-token prompt, two more of
    one length; with chunks, a chunk of 12 tokens over 28 cached splits the last two (one
    call each), and a one-token chunk over 29 ends the step (the chunks: two calls each,
    merged by their log-sum-exps). Slots no prompt owns hold NaN: never read."""
    monkeypatch.setattr(sdpa, "_decode", reference_decode)
    seq_lens = [40, 17][:decode_rows] + ([33, 33, 20, 1, 16, 40, 16, 30] if chunks
                                         else [33, 33, 20, 1, 16, 16])
    q_lens = [1, 1][:decode_rows] + ([33, 33, 20, 1, 16, 12, 16, 1] if chunks
                                     else [33, 33, 20, 1, 16, 16])
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, HEADS, KV_HEADS,
                                                       HEAD_DIM, dtype, block_size=BLOCK)
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for i, n in enumerate(seq_lens):
        for t in range(n):
            used[tables[i, t // BLOCK], t % BLOCK] = True
    scales = {}
    if cache is not None:
        scales = dict(k_scale=torch.tensor([0.03, 0.05]), v_scale=torch.tensor([0.02, 0.04]))
        k_cache = (k_cache.float() / scales["k_scale"].view(-1, 1)).clamp(-100, 100).round()
        v_cache = (v_cache.float() / scales["v_scale"].view(-1, 1)).clamp(-100, 100).round()
        k_cache, v_cache = k_cache.to(cache), v_cache.to(cache)
    else:
        k_cache[~used], v_cache[~used] = float("nan"), float("nan")
    scale = HEAD_DIM ** -0.5
    meta = _meta(tables, starts, seq_lens)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(sdpa, "F", SimpleNamespace(  # this module's calls only
        scaled_dot_product_attention=lambda *a, **k: calls.append(a[0].shape[0]) or
        real(*a, **k)))
    out = torch.full_like(q, float("nan"))
    got = sdpa.paged_attention_sdpa(q, k_cache, v_cache, meta, scale, decode_rows, out=out,
                                    **scales)
    assert got is out and not got.isnan().any()
    # runs of equal lengths: 33 x 2, 20, 1, 16 x 2 (16, 16 with a chunk between them)
    assert calls == ([2, 1, 1, 1, 1] if chunks else [2, 1, 1, 2])
    want = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale, **scales)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("cache", [torch.float8_e4m3fn, torch.int8])
def test_v_transposed_gathers_the_same(monkeypatch, cache) -> None:
    """KILN_PREFILL_SDPA_VT=1: a 1-byte cache whose V blocks hold V transposed ([kv heads,
    d, block], the engine's default for them) gives the usual layout's output bit for bit,
    whole prompts and chunks over a cached prefix; usable() takes it only when on."""
    seq_lens, q_lens = [33, 20, 40], [33, 20, 12]
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, HEADS, KV_HEADS,
                                                       HEAD_DIM, torch.bfloat16,
                                                       block_size=BLOCK)
    scales = dict(k_scale=torch.tensor([0.03, 0.05]), v_scale=torch.tensor([0.02, 0.04]))
    k_cache = (k_cache.float() / scales["k_scale"].view(-1, 1)).clamp(-100, 100).round()
    v_cache = (v_cache.float() / scales["v_scale"].view(-1, 1)).clamp(-100, 100).round()
    k_cache, v_cache = k_cache.to(cache), v_cache.to(cache)
    v_t = v_cache.permute(0, 2, 3, 1).contiguous()  # [blocks, kv heads, d, block]
    meta = _meta(tables, starts, seq_lens)
    want = sdpa.paged_attention_sdpa(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5, **scales)
    got = sdpa.paged_attention_sdpa(q, k_cache, v_t, _meta(tables, starts, seq_lens),
                                    HEAD_DIM ** -0.5, **scales)
    assert torch.equal(got, want)
    monkeypatch.setattr(sdpa, "MIN_TOKENS_1BYTE", 16)
    monkeypatch.setattr(sdpa, "MIN_CHUNK_TOKENS", 1)
    for on in (False, True):
        monkeypatch.setattr(sdpa, "V_TRANSPOSED", on)
        assert sdpa.usable(q, k_cache, v_t, meta, k_scale=scales["k_scale"]) == on
        assert sdpa.usable(q, k_cache, v_cache, meta, k_scale=scales["k_scale"])


def test_which_steps_take_it(monkeypatch) -> None:
    monkeypatch.setattr(sdpa, "MIN_TOKENS", 16)
    monkeypatch.setattr(sdpa, "MIN_TOKENS_1BYTE", 25)
    monkeypatch.setattr(sdpa, "MIN_CHUNK_TOKENS", 1)
    seq_lens, q_lens = [30, 20], [30, 20]
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, HEADS, KV_HEADS,
                                                       HEAD_DIM, torch.bfloat16,
                                                       block_size=BLOCK)
    meta = _meta(tables, starts, seq_lens)
    monkeypatch.setattr(sdpa, "ENABLED", True)
    assert sdpa.usable(q, k_cache, v_cache, meta)
    assert sdpa.usable(q, k_cache, v_cache, meta, sliding_window=30)  # no prompt past it
    assert not sdpa.usable(q, k_cache, v_cache, meta, sliding_window=29)
    for one_byte in (torch.float8_e4m3fn, torch.int8):  # with their scales
        c = k_cache.to(one_byte)
        assert sdpa.usable(q, c, c, meta, k_scale=torch.ones(KV_HEADS))
        assert not sdpa.usable(q, c, c, meta)
    assert not sdpa.usable(q, k_cache.half(), v_cache.half(), meta)  # another 16-bit dtype
    assert not sdpa.usable(q.float(), k_cache.float(), v_cache.float(), meta)  # float32
    assert not sdpa.usable(q, k_cache, v_cache, meta, softcap=30.0)
    assert not sdpa.usable(q, k_cache, v_cache, meta, alibi_slopes=ref.alibi_slopes(HEADS))
    assert not sdpa.usable(q, k_cache, v_cache, meta, key_rotary=torch.zeros(64, HEAD_DIM))
    assert not sdpa.usable(q, k_cache, v_cache.permute(0, 2, 3, 1), meta)  # V transposed
    chunk = _meta(tables, [0, 30, 34], [30, 20])  # the second: 4 tokens over 16 cached
    assert sdpa.usable(q[:34], k_cache, v_cache, chunk)
    monkeypatch.setattr(sdpa, "MAX_CHUNKS", 0)
    assert not sdpa.usable(q[:34], k_cache, v_cache, chunk)
    monkeypatch.setattr(sdpa, "MAX_CHUNKS", 8)
    monkeypatch.setattr(sdpa, "MIN_CHUNK_TOKENS", 5)
    assert not sdpa.usable(q[:34], k_cache, v_cache, chunk)  # a chunk of 4 new tokens
    monkeypatch.setattr(sdpa, "MIN_CHUNK_TOKENS", 1)
    small = _meta(tables, [0, 1, 3], [14, 20])  # 1 x (1 + 26) + 2 x (2 + 36) < 16²
    assert not sdpa.usable(q[:3], k_cache, v_cache, small)
    big = _meta(tables, [0, 3, 6], [20, 30])  # 3 x (3 + 34) + 3 x (3 + 54) >= 16²
    assert sdpa.usable(q[:6], k_cache, v_cache, big)
    assert not sdpa.usable(q[:6], k_cache, v_cache, big, sliding_window=29)  # a context > it
    short = _meta(tables, [0, 10, 20], [10, 10])
    assert not sdpa.usable(q[:20], k_cache, v_cache, short)  # sqrt(10² + 10²) < MIN_TOKENS
    pair = _meta(tables, [0, 12, 24], [12, 12])  # each < MIN_TOKENS, sqrt(12² + 12²) >= it
    assert sdpa.usable(q[:24], k_cache, v_cache, pair)
    c = k_cache.to(torch.float8_e4m3fn)
    assert not sdpa.usable(q[:24], c, c, pair, k_scale=torch.ones(KV_HEADS))  # < the 1-byte one
    mixed = _meta(tables, [0, 1, 21], [17, 20])  # a decode row, then a fresh prompt
    assert sdpa.usable(q[:21], k_cache, v_cache, mixed, decode_rows=1)
    assert sdpa.usable(q[:21], k_cache, v_cache, mixed)  # the decode row: a one-token chunk
    captured = _meta(tables, starts, seq_lens)
    captured.query_starts_host, captured.seq_lens_host = [], []  # a graph-captured step
    assert not sdpa.usable(q, k_cache, v_cache, captured)
    monkeypatch.setattr(sdpa, "ENABLED", False)
    assert not sdpa.usable(q, k_cache, v_cache, meta)


def test_short_chunks_over_long_caches_take_sdpa(monkeypatch) -> None:
    """A chunk over a cached prefix takes the two SDPA calls from MIN_CHUNK_TOKENS new
    tokens, or from SHORT_CHUNK_TOKENS where the cache behind it is long (the H200 points of
    the 44th session: 1024 over 1000 / 3000 cached stay on Triton, 1024 over 8000 and 1536
    over 3000 move), and a step takes the path only when every chunk of it pays."""
    for knob, value in (("MIN_CHUNK_TOKENS", 2048), ("SHORT_CHUNK_TOKENS", 1024),
                        ("SHORT_CHUNK_WORK", 3200)):
        monkeypatch.setattr(sdpa, knob, value)
    assert not sdpa.chunk_pays(1024, 1000) and not sdpa.chunk_pays(1024, 3000)
    assert sdpa.chunk_pays(1024, 8000) and sdpa.chunk_pays(1536, 3000)
    assert sdpa.chunk_pays(2048, 0) and not sdpa.chunk_pays(1023, 100_000)
    monkeypatch.setattr(sdpa, "MIN_TOKENS", 16)
    monkeypatch.setattr(sdpa, "MIN_CHUNK_TOKENS", 8)
    monkeypatch.setattr(sdpa, "SHORT_CHUNK_TOKENS", 4)
    monkeypatch.setattr(sdpa, "SHORT_CHUNK_WORK", 11)  # 4 x (4 + 2 x 12) = 112 < 121
    monkeypatch.setattr(sdpa, "ENABLED", True)
    k_cache = torch.randn(6, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    q = torch.randn(24, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    tables = torch.arange(6).view(2, 3)
    near = _meta(tables, [0, 12, 16], [12, 16])  # 4 new over 12 cached: short of the work
    far = _meta(tables, [0, 12, 16], [12, 20])  # 4 over 16: 4 x 36 = 144 >= 121
    assert not sdpa.usable(q[:16], k_cache, k_cache.clone(), near)
    assert sdpa.usable(q[:16], k_cache, k_cache.clone(), far)
    monkeypatch.setattr(sdpa, "SHORT_CHUNK_TOKENS", 5)  # 4 new tokens: too few either way
    assert not sdpa.usable(q[:16], k_cache, k_cache.clone(), far)
