"""Triton kernels vs the torch reference on a CUDA GPU at Llama-3.1-8B shapes (bf16).

    pytest -m gpu tests/test_kernels_gpu.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kiln.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 would run the kernels on the host"),
]

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
BLOCK_SIZE = 16
BF16 = dict(atol=2e-2, rtol=1.6e-2)


def _close(name: str, out: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
           max_rel_norm: float = 1e-2) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype, name
    diff = (out.float() - expected.float())
    rel = (diff.norm() / expected.float().norm().clamp_min(1e-30)).item()
    assert not out.isnan().any(), f"{name}: NaN"
    assert rel < max_rel_norm, f"{name}: relative error {rel:.2e}"
    assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol), \
        f"{name}: max abs error {diff.abs().max().item():.3e}"


@pytest.mark.parametrize("tokens", [1, 77, 4096])
def test_rms_norm(tokens: int) -> None:
    from kiln.kernels.rms_norm import add_rms_norm, rms_norm

    x, residual = torch.randn(2, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    _close("rms_norm", rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5), **BF16)
    out, summed = add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_summed = ref.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_summed)
    _close("add_rms_norm", out, ref_out, **BF16)
    # per-head q/k norm on a strided view (Qwen3)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda",
                      dtype=torch.bfloat16)
    q = qkv[:, :HEADS * HEAD_DIM].reshape(tokens, HEADS, HEAD_DIM)
    w = torch.randn(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    _close("q_norm", rms_norm(q, w, 1e-6), ref.rms_norm(q, w, 1e-6), **BF16)


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_silu_and_mul(tokens: int) -> None:
    from kiln.kernels.silu_mul import silu_and_mul

    x = torch.randn(tokens, 2 * INTER, device="cuda", dtype=torch.bfloat16) * 3
    _close("silu_mul", silu_and_mul(x), ref.silu_and_mul(x), **BF16)


def test_rotary_and_write_kv() -> None:
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    tokens, max_pos, num_blocks = 4096, 8192, 600
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda",
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    positions = torch.randint(0, max_pos, (tokens,), device="cuda")
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    slots[::97] = -1  # padding tokens are not written
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    caches = [torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q_rot = rotary_and_write_kv(q, k, v, positions, cos_sin, *caches, slots, HEAD_DIM)
    ref_q = ref.rotary_and_write_kv(q, k, v, positions, cos_sin, *ref_caches, slots, HEAD_DIM)
    _close("q", q_rot, ref_q, **BF16)
    _close("k_cache", caches[0], ref_caches[0], **BF16)
    assert torch.equal(caches[1], ref_caches[1])


def _paged(seq_lens: list[int], q_lens: list[int], table_width: int | None = None):
    """Caches with shuffled blocks, block tables, packed bf16 queries on the GPU."""
    blocks = [-(-max(s, 1) // BLOCK_SIZE) for s in seq_lens]
    width = table_width or max(blocks)
    num_blocks = sum(blocks) + 8
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda",
                          dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device="cuda").int()
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cuda")
    for i, used in enumerate(blocks):
        tables[i, :used], order = order[:used], order[used:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, k_cache, v_cache, tables, starts


ATTN = dict(atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("seq_lens,q_lens", [
    ([512, 1000, 77, 2048], [512, 1000, 77, 2048]),  # plain prefill
    ([3000, 8192, 130, 700], [200, 1, 130, 1]),  # chunked prefill + decode rows (mixed)
])
def test_prefill_attention(seq_lens: list[int], q_lens: list[int]) -> None:
    from kiln.kernels.attention_prefill import paged_attention_prefill

    q, k_cache, v_cache, tables, starts = _paged(seq_lens, q_lens)
    scale = HEAD_DIM ** -0.5
    out = paged_attention_prefill(
        q, k_cache, v_cache, tables, torch.tensor(starts, device="cuda").int(),
        torch.tensor(seq_lens, device="cuda").int(), max(q_lens), scale)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale)
    _close("prefill", out, expected, **ATTN)


@pytest.mark.parametrize("kv,window,gqa", [(None, None, True), (None, None, False),
                                           ("e4m3", None, True), ("e4m3-vt", None, True),
                                           (None, 8192, True)])
def test_prefill_attention_sdpa(kv: str | None, window: int | None, gqa: bool,
                                monkeypatch) -> None:
    """kiln.kernels.attention_sdpa: two decode rows, then whole prompts (two of 1000 tokens in
    one batched call, an 8k one, a 300-token one) and chunks over cached prefixes (2,048
    tokens over 3,952, 100 over 900) through kiln.functional.paged_attention, which sends the
    prompts to SDPA (cuDNN on Hopper; the chunks as two cuDNN calls merged by their
    log-sum-exps, K / V heads as they are or repeated; e4m3-vt: V transposed in its blocks,
    KILN_PREFILL_SDPA_VT=1): the reference's output, and the Triton kernel's
    (paged_attention_mixed) within bf16 rounding."""
    from kiln import functional as KF
    from kiln.kernels import attention_sdpa
    from kiln.kernels.attention_prefill import paged_attention_mixed
    from kiln.layers.attention import AttentionMetadata

    monkeypatch.setattr(attention_sdpa, "ENABLED", True)
    monkeypatch.setattr(attention_sdpa, "CUDNN_GQA", gqa)
    monkeypatch.setattr(attention_sdpa, "MIN_CHUNK_TOKENS", 100)
    monkeypatch.setattr(KF, "MIXED_DECODE_ROWS", True)
    calls, real = [], attention_sdpa.paged_attention_sdpa
    monkeypatch.setattr(attention_sdpa, "paged_attention_sdpa",
                        lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    seq_lens = [700, 130, 1000, 1000, 6000, 8192, 300, 1000]
    q_lens = [1, 1, 1000, 1000, 2048, 8192, 300, 100]
    q, k_cache, v_cache, tables, starts = _paged(seq_lens, q_lens)
    slots = torch.cat([(tables[i, :(n + BLOCK_SIZE - 1) // BLOCK_SIZE].long()[:, None]
                        * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device="cuda")).flatten()
                       [n - m:n] for i, (n, m) in enumerate(zip(seq_lens, q_lens))])
    scale = HEAD_DIM ** -0.5
    scales = {}
    if kv is not None:
        scales = dict(k_scale=torch.full((KV_HEADS,), 0.02, device="cuda"),
                      v_scale=torch.full((KV_HEADS,), 0.03, device="cuda"))
        k_cache = (k_cache / 0.02).to(torch.float8_e4m3fn)
        v_cache = (v_cache / 0.03).to(torch.float8_e4m3fn)
    v_run = v_cache  # what the kernels read
    if kv == "e4m3-vt":
        monkeypatch.setattr(attention_sdpa, "V_TRANSPOSED", True)
        v_run = v_cache.permute(0, 2, 3, 1).contiguous()  # [blocks, kv heads, d, block]
    meta = AttentionMetadata(
        slot_mapping=slots, block_tables=tables,
        seq_lens=torch.tensor(seq_lens, device="cuda").int(),
        query_start_loc=torch.tensor(starts, device="cuda").int(), query_starts_host=starts,
        seq_lens_host=seq_lens, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    out = KF.paged_attention(q, k_cache, v_run, meta, scale, sliding_window=window, **scales)
    assert calls == [2]
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale,
                                   sliding_window=window, **scales)
    _close("sdpa", out, expected, **ATTN)
    triton_out = paged_attention_mixed(q, k_cache, v_run, tables, meta.query_start_loc,
                                       meta.seq_lens, max(q_lens), scale, 2,
                                       sliding_window=window, **scales)
    _close("sdpa vs triton", out, triton_out, **ATTN)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention(batch: int, num_splits: int | None) -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 8193, (batch,), generator=gen).tolist()
    seq_lens[0] = 8192
    q, k_cache, v_cache, tables, _ = _paged(seq_lens, [1] * batch, 8192 // BLOCK_SIZE)
    scale = HEAD_DIM ** -0.5
    out = paged_attention_decode(q, k_cache, v_cache, tables,
                                 torch.tensor(seq_lens, device="cuda").int(), scale,
                                 num_splits=num_splits)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, list(range(batch + 1)),
                                   seq_lens, scale)
    _close("decode", out, expected, **ATTN)


@pytest.mark.parametrize("batch,max_ctx", [(1, 384), (7, 2048), (32, 8192)])
def test_decode_attention_fused_reduce(batch: int, max_ctx: int) -> None:
    """The last split combining the splits in the decode kernel (KILN_DECODE_FUSED_REDUCE),
    8 and 32 splits, contexts covering all and few of them, against the reference and
    the reduce launch; twice in a CUDA graph (the arrival counters left zeroed)."""
    from kiln.kernels.attention_decode import paged_attention_decode

    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    seq_lens[0] = max_ctx
    q, k_cache, v_cache, tables, _ = _paged(seq_lens, [1] * batch, max_ctx // BLOCK_SIZE)
    lens = torch.tensor(seq_lens, device="cuda").int()
    scale = HEAD_DIM ** -0.5
    expected = ref.paged_attention(q, k_cache, v_cache, tables, list(range(batch + 1)),
                                   seq_lens, scale)
    for splits in (8, 32):
        def run(fused: bool, splits: int = splits) -> torch.Tensor:
            return paged_attention_decode(q, k_cache, v_cache, tables, lens, scale,
                                          num_splits=splits, fused_reduce=fused)

        fused, plain = run(True), run(False)
        _close(f"decode fused {splits}", fused, expected, **ATTN)
        torch.testing.assert_close(fused, plain, atol=2e-3, rtol=2e-3)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(True)
        for _ in range(2):
            captured.zero_()
            graph.replay()
            assert torch.equal(captured, fused)


@pytest.mark.parametrize("splits", [None, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_attention_long_tiles(monkeypatch, batch: int, splits: int | None) -> None:
    """Long tiles at a 32k context (32 splits of 1,024 keys, the engine's at batch 1 with
    --max-seq-len 32768, or 64 of 512: not taken): 128-key tiles against the reference and
    the 64-key launch (KILN_DECODE_LONG_TILES=0)."""
    from kiln.kernels import attention_decode

    seq_lens = [32000, 17, 20001][:batch]
    q, k_cache, v_cache, tables, _ = _paged(seq_lens, [1] * batch, 32768 // BLOCK_SIZE)
    lens = torch.tensor(seq_lens, device="cuda").int()
    scale = HEAD_DIM ** -0.5
    expected = ref.paged_attention(q, k_cache, v_cache, tables, list(range(batch + 1)),
                                   seq_lens, scale)
    monkeypatch.setattr(attention_decode, "LONG_TILES", False)
    plain = attention_decode.paged_attention_decode(q, k_cache, v_cache, tables, lens, scale,
                                                    num_splits=splits)
    monkeypatch.setattr(attention_decode, "LONG_TILES", True)
    out = attention_decode.paged_attention_decode(q, k_cache, v_cache, tables, lens, scale,
                                                  num_splits=splits)
    _close("decode, long tiles", out, expected, **ATTN)
    torch.testing.assert_close(out, plain, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("heads_per_program", [2, 8])
def test_decode_attention_heads_per_program(heads_per_program: int) -> None:
    """Several KV heads a program (short contexts, as in 128 / 128 throughput): 300
    sequences of 1-300 tokens and a padding row against the reference."""
    from kiln.kernels.attention_decode import paged_attention_decode

    seq_lens = torch.randint(1, 301, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    q, k_cache, v_cache, tables, _ = _paged(seq_lens + [1], [1] * 301, 320 // BLOCK_SIZE)
    lens = torch.tensor(seq_lens + [0], device="cuda").int()
    scale = HEAD_DIM ** -0.5
    out = paged_attention_decode(q, k_cache, v_cache, tables, lens, scale,
                                 heads_per_program=heads_per_program)
    expected = ref.paged_attention(q[:300], k_cache, v_cache, tables, list(range(301)),
                                   seq_lens, scale)
    _close("decode", out[:300], expected, **ATTN)
    assert torch.equal(out[300], torch.zeros_like(out[300]))


def test_attention_with_key_rotary() -> None:
    """Attention sinks: keys cached before rotary, rotated at their index by the prefill
    and decode kernels as read (bf16, real shapes) vs the reference rotating them."""
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_prefill import paged_attention_prefill
    from kiln.layers.rotary import RotaryEmbedding

    table = RotaryEmbedding(HEAD_DIM, 4096, 500000.0, None).cos_sin.cuda()
    scale = HEAD_DIM ** -0.5
    seq_lens, q_lens = [4096, 300, 2000], [256, 300, 1]
    q, k_cache, v_cache, tables, starts = _paged(seq_lens, q_lens)
    out = paged_attention_prefill(
        q, k_cache, v_cache, tables, torch.tensor(starts, device="cuda").int(),
        torch.tensor(seq_lens, device="cuda").int(), max(q_lens), scale, key_rotary=table)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale,
                                   key_rotary=table)
    _close("prefill", out, expected, **ATTN)
    q, k_cache, v_cache, tables, _ = _paged(seq_lens, [1] * 3, 4096 // BLOCK_SIZE)
    out = paged_attention_decode(q, k_cache, v_cache, tables,
                                 torch.tensor(seq_lens, device="cuda").int(), scale,
                                 key_rotary=table)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, [0, 1, 2, 3], seq_lens, scale,
                                   key_rotary=table)
    _close("decode", out, expected, **ATTN)


def test_decode_attention_cuda_graph() -> None:
    """Captured once, replayed with other seq_lens (incl. 0 = padding) and queries."""
    from kiln.kernels.attention_decode import paged_attention_decode

    batch, max_len = 16, 8192
    q, k_cache, v_cache, tables, _ = _paged([max_len] * batch, [1] * batch)
    seq_lens = torch.full((batch,), max_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5

    def step() -> torch.Tensor:
        return paged_attention_decode(q, k_cache, v_cache, tables, seq_lens, scale,
                                      max_seq_len=max_len)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(4):
        lens = torch.randint(1, max_len + 1, (batch,), generator=torch.Generator().manual_seed(
            trial)).tolist()
        lens[-1] = 0 if trial % 2 else lens[-1]
        seq_lens.copy_(torch.tensor(lens))
        q.copy_(torch.randn_like(q))
        graph.replay()
        live = [i for i, n in enumerate(lens) if n > 0]
        expected = ref.paged_attention(q[live], k_cache, v_cache, tables[live],
                                       list(range(len(live) + 1)), [lens[i] for i in live],
                                       scale)
        _close(f"replay {trial}", out[live], expected, **ATTN)
        if len(live) < batch:
            assert not out[-1].any(), "padding row is not zero"


def _sampling_batch(rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    configs = torch.tensor([[0.0, 0, 1.0, 0.0], [1.0, 0, 1.0, 0.0], [0.7, 50, 1.0, 0.0],
                            [1.0, 0, 0.9, 0.0], [0.8, 50, 0.95, 0.0], [1.0, 0, 1.0, 0.05],
                            [1.5, 1000, 0.99, 0.0], [1.0, 0, 0.999, 0.0]])
    picked = configs[(torch.arange(rows) + 4) % len(configs)]  # row 0: top-k + top-p
    scale = torch.tensor([1.0, 3.0, 8.0])[torch.arange(rows) % 3][:, None]
    logits = torch.randn(rows, VOCAB, generator=gen) * scale
    temperature, top_k, top_p, min_p = picked.unbind(1)
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=gen)
    steps = torch.randint(0, 4096, (rows,), generator=gen)
    return tuple(t.contiguous().cuda() for t in (logits, temperature, top_k.long(), top_p,
                                                 min_p, seeds, steps))


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("candidates", [4096, 16], ids=["candidate-list", "whole-row"])
def test_sample_tokens(rows: int, candidates: int) -> None:
    from kiln.kernels.sampling import sample_tokens

    args = _sampling_batch(rows, rows + candidates)
    out = sample_tokens(*args, candidates=candidates)
    expected = ref.sample_tokens(*args)
    assert torch.equal(out, expected), (out.tolist(), expected.tolist())


@pytest.mark.parametrize("rows", [1, 496])
def test_greedy_tokens(rows: int) -> None:
    """The chunked argmax at a real vocabulary (128,256) = torch.argmax, ties and NaN too."""
    from kiln.kernels.sampling import greedy_tokens

    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, 128256, device="cuda") * 4).to(dtype)
        logits[0, 5000] = logits[0, 100000] = 99.0
        if rows > 1:
            logits[1, 77777] = float("nan")
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


def test_sample_tokens_cuda_graph() -> None:
    from kiln.kernels.sampling import sample_tokens

    args = _sampling_batch(64, 0)
    steps = args[-1]
    sample_tokens(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_tokens(*args)
    for _ in range(3):
        steps += 1
        graph.replay()
        assert torch.equal(out, ref.sample_tokens(*args))


def test_functional_dispatch() -> None:
    """kiln.functional picks the kernels on CUDA and agrees with its CPU reference path."""
    from kiln import functional as KF
    from kiln.layers.attention import AttentionMetadata

    for q_lens, seq_lens in (([300, 1, 64], [300, 5000, 64]), ([1, 1, 1], [17, 5000, 64])):
        q, k_cache, v_cache, tables, starts = _paged(seq_lens, q_lens)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device="cuda"),
            block_tables=tables, seq_lens=torch.tensor(seq_lens, device="cuda").int(),
            query_start_loc=torch.tensor(starts, device="cuda").int(),
            query_starts_host=starts, seq_lens_host=seq_lens, max_query_len=max(q_lens),
            max_seq_len=max(seq_lens))
        out = KF.paged_attention(q, k_cache, v_cache, meta, 0.088)
        expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, 0.088)
        _close(f"functional q_lens={q_lens}", out, expected, **ATTN)



def _mixed_step(decode_rows: int, prompts: int, width_extra: int) -> None:
    """paged_attention_mixed on decode_rows decode rows then `prompts` 128-token prompts,
    the tables `width_extra` blocks wider than needed, against the reference."""
    from kiln.kernels.attention_prefill import paged_attention_mixed

    seq_lens = [300 + 17 * i for i in range(decode_rows)] + [128] * prompts
    q_lens = [1] * decode_rows + [128] * prompts
    q, k_cache, v_cache, tables, starts = _paged(
        seq_lens, q_lens, -(-max(seq_lens) // BLOCK_SIZE) + width_extra)
    scale = HEAD_DIM ** -0.5
    out = paged_attention_mixed(
        q, k_cache, v_cache, tables, torch.tensor(starts, device="cuda").int(),
        torch.tensor(seq_lens, device="cuda").int(), 128, scale, decode_rows)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale)
    _close(f"mixed {decode_rows} + {prompts}", out, expected, **ATTN)


@pytest.mark.parametrize("prompts", [2, 64])  # the small-grid launch; the usual one
def test_mixed_steps_compile_no_new_prefill_variant(prompts: int) -> None:
    """A mixed step's prompts start at row decode_rows of the step's tables and lengths, so
    the prefill kernel gets pointers of any alignment (also as its unused ALiBi / rotary
    arguments): compiled once, the same launch at any decode_rows compiles nothing new."""
    from kiln.runtime.profiling import CompileWatch

    _mixed_step(4, prompts, 0)  # compiles this grid's launch (and the decode kernel's)
    with CompileWatch() as watch:
        for decode_rows, width_extra in ((1, 1), (2, 0), (3, 5), (5, 2)):
            _mixed_step(decode_rows, prompts, width_extra)
    assert watch.events == [], [e["kernel"] for e in watch.events]


@pytest.mark.parametrize("block_size,block_n,warps", [(64, 64, 4), (64, 64, 8), (128, 128, 8)])
@pytest.mark.parametrize("kv", ["bf16", "e4m3"])
def test_prefill_tma_tiles(block_size: int, block_n: int, warps: int, kv: str,
                           monkeypatch) -> None:
    """KILN_PREFILL_TMA (kiln.kernels.paged_tma): with 64- / 128-token KV blocks the prefill
    kernel reads its K / V tiles by TMA and computes what the gathered tiles give (8B
    heads; plain and chunked prompts, never-written slots past each context)."""
    from kiln.kernels import paged_tma
    from kiln.kernels.attention_prefill import paged_attention_prefill

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    seq_lens, q_lens = [3000, 700, 1000], [3000, 200, 1000]
    blocks = [-(-n // block_size) for n in seq_lens]
    pool = sum(blocks) + 2
    cache = [torch.full((pool, block_size, KV_HEADS, HEAD_DIM), float("nan"), device="cuda",
                        dtype=torch.bfloat16) for _ in range(2)]
    order = torch.randperm(pool, device="cuda").int()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    for i, (n, used) in enumerate(zip(seq_lens, blocks)):
        tables[i, :used], order = order[:used], order[used:]
        slots = tables[i, torch.arange(n, device="cuda") // block_size].long() * block_size + \
            torch.arange(n, device="cuda") % block_size
        for c in cache:
            c.view(-1, KV_HEADS, HEAD_DIM)[slots] = torch.randn(
                n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    extra = {}
    if kv == "e4m3":
        cache = [c.to(torch.float8_e4m3fn) for c in cache]
        ones = torch.ones(KV_HEADS, device="cuda")
        extra = dict(k_scale=ones, v_scale=ones)
    starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, device="cuda").int()
    scale = HEAD_DIM ** -0.5
    taken = []
    descriptors = paged_tma.descriptors
    monkeypatch.setattr(paged_tma, "descriptors", lambda *a: taken.append(1) or descriptors(*a))

    def run(tma: bool) -> torch.Tensor:
        monkeypatch.setattr(paged_tma, "ENABLED", tma)
        return paged_attention_prefill(q, *cache, tables, starts, lens, max(q_lens), scale,
                                       block_n=block_n, num_warps=warps, **extra)

    want, got = run(False), run(True)
    assert taken and not got.isnan().any()
    _close("prefill by TMA", got, want, atol=1e-2, rtol=1e-2)
