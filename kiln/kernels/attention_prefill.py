"""Causal paged attention for packed variable-length queries over a cached prefix (prefill,
chunked prefill and mixed prefill+decode batches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels import num_sms, paged_tma
from kiln.kernels.kv_operands import kv_query
from kiln.kernels.paged import (
    LOG2E,
    LOG2E_C,
    NATIVE_E4M3,
    NATIVE_E4M3_V,
    attend_tile,
    check_v_tiles,
    dot_precision,
    head_block,
    kv_scale,
    kv_scale_args,
    v_transposed,
)


# The block-table width varies by step; a mixed step's prompts start at a row of the step's
# tables and lengths (paged_attention_mixed), so those pointers are not 16-byte aligned
# every time, nor the lengths passed again as the unused ALiBi / rotary pointers: none
# specialised on, so no step compiles a new variant (one did, 1.5-2.1 s inside the 8B
# 128 / 128 run: a few prompts after an odd number of decode rows; H200, 24th session).
@triton.jit(do_not_specialize=["stride_bt"],
            do_not_specialize_on_alignment=["block_tables_ptr", "query_start_ptr",
                                            "seq_lens_ptr", "alibi_ptr", "cos_sin_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    qk_scale, k_scale_ptr, v_scale_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_bt, window, softcap, alibi_ptr,
    cos_sin_ptr, stride_cs, k_desc, v_desc,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, ROPE_K: tl.constexpr = False, HEAVY_FIRST: tl.constexpr = False,
    V_T: tl.constexpr = False, TMA: tl.constexpr = False,
):
    """O = softmax(Q K^T * scale + causal) V for one (query tile, sequence, KV head).

    The tile's rows are (token, head) pairs, token-major, of the GROUP query heads that
    share this KV head, so each K/V tile is loaded once for the whole group. Query j of a
    sequence with q_len new tokens and seq_len context tokens sits at position
    seq_len - q_len + j and sees keys 0 .. that position (flash-attention online softmax,
    float32 statistics and accumulator). A 1-byte cache (compile-time branch on its
    element type) holds K / k_scale[kv_head] and V / v_scale[kv_head]: k_scale goes into
    the score scale, v_scale into O.
    WINDOW: query p sees keys p - window + 1 .. p only; tiles wholly before the window of
    every row are skipped, tiles some rows see only in part are masked. SOFTCAP: scores
    -> c * tanh(score / c) (softcap is c * log2(e)). ALIBI: scores + alibi[head] *
    (key pos - query pos) (float32 slopes). ROPE_K (attention sinks): the cache holds keys
    before rotary; key n is rotated at position n with cos_sin as it is read. All
    constexpr: off, the plain code. HEAVY_FIRST: the grid is (KV head, sequence, query
    tile) and the last query tiles (the longest causal rows) start first, so the short
    ones fill the tail of the launch instead of the long ones. V_T: V blocks stored
    transposed (paged.load_v_transposed; no window, so every tile starts on a block).
    """
    if HEAVY_FIRST:
        pid_m = tl.num_programs(2) - 1 - tl.program_id(2)
        kv_head = tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
        kv_head = tl.program_id(2)
    seq = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    row0 = pid_m * BLOCK_M
    if row0 >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len

    rows = row0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = tok < q_len
    q_pos = ctx_start + tok
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)
    KV_QUANT: tl.constexpr = k_cache_ptr.dtype.element_ty.primitive_bitwidth == 8
    if KV_QUANT:
        q = kv_query(q, k_cache_ptr)
        qk_scale = qk_scale * kv_scale(k_cache_ptr, k_scale_ptr, kv_head, NATIVE_E4M3)

    slopes = 0.0
    if ALIBI:
        slopes = tl.load(alibi_ptr + head) * LOG2E_C
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_tok = row0 // GROUP
    last_tok = tl.minimum((row0 + BLOCK_M - 1) // GROUP, q_len - 1)
    # Keys every row of the tile sees need no mask; only the diagonal band does.
    full_end = ((ctx_start + first_tok + 1) // BLOCK_N) * BLOCK_N
    kv_end = ctx_start + last_tok + 1
    kv_start = 0
    if WINDOW:
        # Keys before the first row's window are seen by no row; keys from the last
        # row's window start on are seen (window-wise) by every row.
        kv_start = (tl.maximum(ctx_start + first_tok - window + 1, 0) // BLOCK_N) * BLOCK_N
        all_see = ctx_start + last_tok - window + 1
        unmasked_start = tl.minimum(tl.maximum((all_see + BLOCK_N - 1) // BLOCK_N * BLOCK_N,
                                               kv_start), full_end)
        for n0 in range(kv_start, unmasked_start, BLOCK_N):
            acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                        n0, kv_end, q_pos, kv_head, qk_scale,
                                        stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                        HEAD_DIM, BLOCK_SIZE, True, True, DOT_PREC,
                                        window, softcap, WINDOW, SOFTCAP, slopes, ALIBI,
                                    cos_sin_ptr, stride_cs, ROPE_K, V_T=V_T, k_desc=k_desc,
                                    v_desc=v_desc, TMA=TMA)
        kv_start = unmasked_start
    for n0 in range(kv_start, full_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                    n0, kv_end, q_pos, kv_head, qk_scale,
                                    stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, BLOCK_SIZE, False, True, DOT_PREC,
                                    window, softcap, WINDOW, SOFTCAP, slopes, ALIBI,
                                    cos_sin_ptr, stride_cs, ROPE_K, V_T=V_T, k_desc=k_desc,
                                    v_desc=v_desc, TMA=TMA)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                    n0, kv_end, q_pos, kv_head, qk_scale,
                                    stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, BLOCK_SIZE, True, True, DOT_PREC,
                                    window, softcap, WINDOW, SOFTCAP, slopes, ALIBI,
                                    cos_sin_ptr, stride_cs, ROPE_K, V_T=V_T, k_desc=k_desc,
                                    v_desc=v_desc, TMA=TMA)
    out = acc / l_i[:, None]
    if KV_QUANT:
        out = out * kv_scale(k_cache_ptr, v_scale_ptr, kv_head, NATIVE_E4M3_V)
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def query_tile_rows(max_query_len: int, group: int) -> int:
    """Rows of (token, query head) pairs a program takes: 16 to 128 (kiln.runtime.warmup
    compiles each size a model's prompts can reach)."""
    return min(128, max(16, triton.next_power_of_2(max_query_len * group)))


@dataclass(frozen=True)
class PrefillLaunch:
    block_n: int
    num_stages: int
    num_warps: int
    heavy_first: bool = False


def prefill_config(cache_dtype: torch.dtype, block_m: int, block_d: int,
                   small_grid: bool = False) -> PrefillLaunch:
    """The launch per KV cache dtype and query tile.

    small_grid (fewer programs than two per SM, e.g. one 1k-token prompt alone: 256 on an
    H200 with 8 KV heads): 8 warps a 128-row tile, bf16 with 64 keys and 3 stages, e4m3
    128 keys and 2 stages (one 1024-token prompt: 55.6 -> 45.7 us bf16, 58.8 -> 47.3 us
    e4m3; from two such prompts on the 4-warp launch below is faster: 73.0 vs 82.0 us;
    benchmarks/attn_prefill_batch.py, BENCHMARKS.md twenty-second session).

    Full 128-row tiles, d <= 128, every cache but int8: 64 keys a step, 3 stages, 4
    warps, heaviest tiles first, the best of 40 launches on an H200 at 4k and 8k tokens
    (32 q / 8 KV heads, d 128; benchmarks/attn_prefill_sweep.py, BENCHMARKS.md twelfth
    session): bf16 0.402 / 1.479 ms against the earlier 64 keys, 2 stages, 8 warps in
    launch order (0.477 / 1.658); e4m3 0.444 / 1.662 against 128 keys, 2 stages, 8 warps
    (0.522 / 1.790). int8 caches keep 128 keys, 2 stages, 8 warps (measured before only:
    0.612 ms at 4k against 0.645 for 64 keys); smaller tiles 64 keys, 2 stages."""
    if block_m >= 128 and block_d <= 128:
        if cache_dtype == torch.int8:
            return PrefillLaunch(128, 2, 8)
        if small_grid and cache_dtype == torch.float8_e4m3fn:
            return PrefillLaunch(128, 2, 8, heavy_first=True)
        if small_grid:
            return PrefillLaunch(64, 3, 8, heavy_first=True)
        return PrefillLaunch(64, 3, 4, heavy_first=True)
    return PrefillLaunch(64 if block_d <= 128 else 32, 2,
                         8 if block_m * block_d >= 128 * 128 else 4)


def paged_attention_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
    block_m: int | None = None, block_n: int | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    num_stages: int | None = None, sliding_window: int | None = None,
    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    key_rotary: torch.Tensor | None = None, out: torch.Tensor | None = None,
    num_warps: int | None = None, heavy_first: bool | None = None,
) -> torch.Tensor:
    """q [T, heads, d] packed by query_start_loc -> out [T, heads, d] (written into `out`
    when given: any strides with a unit last one); see reference. The launch (block_n,
    num_stages, num_warps, heavy_first: the tile order, see the kernel) defaults to
    prefill_config's; the arguments are for launch sweeps (benchmarks/attn_prefill_sweep.py)
    (sliding_window, softcap, alibi_slopes, float32 [heads], and key_rotary as there).

    A 1-byte cache (float8_e4m3fn, int8) needs k_scale and v_scale (float32 [kv_heads]).
    With an e4m3 cache and a 16-bit q the products run in float16: |q| must stay below
    65504 (see paged.kv_query).
    """
    tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    if tokens == 0 or num_seqs == 0:
        return out
    v_t = v_transposed(k_cache, v_cache)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    block_d = head_block(head_dim)
    if block_m is None:
        block_m = query_tile_rows(max_query_len, group)
    tiles = triton.cdiv(max_query_len * group, block_m)
    launch = prefill_config(k_cache.dtype, block_m, block_d,
                            tiles * num_seqs * num_kv_heads < 2 * num_sms(q.device))
    block_n, num_stages = block_n or launch.block_n, num_stages or launch.num_stages
    num_warps = num_warps or launch.num_warps
    heavy_first = launch.heavy_first if heavy_first is None else heavy_first
    check_v_tiles(v_t, block_n, k_cache.shape[1], sliding_window, key_rotary)
    tma = paged_tma.usable(k_cache, block_n, head_dim, block_d, key_rotary is not None, v_t)
    k_desc, v_desc = paged_tma.descriptors(k_cache, v_cache, block_n) if tma else (None, None)
    grid = (num_kv_heads, num_seqs, tiles) if heavy_first else (tiles, num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        sliding_window or 0, (softcap or 0.0) * LOG2E,
        alibi_slopes if alibi_slopes is not None else seq_lens,
        key_rotary if key_rotary is not None else seq_lens,
        key_rotary.stride(0) if key_rotary is not None else 0, k_desc, v_desc,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=dot_precision(q.dtype), WINDOW=sliding_window is not None,
        SOFTCAP=softcap is not None, ALIBI=alibi_slopes is not None,
        ROPE_K=key_rotary is not None, HEAVY_FIRST=heavy_first, V_T=v_t, TMA=tma,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_attention_mixed(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
    decode_rows: int, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None, sliding_window: int | None = None,
    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    key_rotary: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention_prefill's result for a step whose first `decode_rows` sequences have
    one query token each (decode rows beside prompts, as the scheduler orders a mixed
    step): those rows go through the decode kernel, one split (a 16-row tile a KV head
    instead of a 128-row prefill tile of which they would fill 4 rows: the same cache bytes
    for a 32nd of the products), the prompts through the prefill kernel."""
    from kiln.kernels.attention_decode import paged_attention_decode

    if out is None:
        out = torch.empty_like(q)
    common = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
                  softcap=softcap, alibi_slopes=alibi_slopes, key_rotary=key_rotary)
    paged_attention_decode(q[:decode_rows], k_cache, v_cache, block_tables[:decode_rows],
                           seq_lens[:decode_rows], scale, num_splits=1,
                           out=out[:decode_rows], **common)
    return paged_attention_prefill(q, k_cache, v_cache, block_tables[decode_rows:],
                                   query_start_loc[decode_rows:], seq_lens[decode_rows:],
                                   max_query_len, scale, out=out, **common)
