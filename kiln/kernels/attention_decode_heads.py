"""Decode attention with several KV heads a program: one loop over (head, tile).

At short contexts (128 / 128 throughput: 128-256 tokens, 2-4 tiles of 64 keys) kiln's
decode kernel (attention_decode._decode_kernel, one KV head a program) has too few tiles
to overlap its loads with: an H200 read an e4m3 cache at ~1.8 TB/s there and a bf16 one at
~3.1 (BENCHMARKS.md, twenty-first session). Here a program takes HEADS KV heads of one
sequence and walks their tiles in one flattened loop, so the next head's first tiles are
loaded (software pipelining, and the block-table entries one tile ahead: the same blocks
for every head of a sequence) while the last of the one before are computed. The online
softmax restarts at each head's first tile (m = -inf makes the rescale factor 0, which
clears acc and l); each head's output is stored after its last tile. One split (the
whole context); no ALiBi or in-kernel key rotary (the launcher keeps those on the
one-head kernel). Opt-in (paged_attention_decode's heads_per_program), untimed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.kv_operands import kv_query
from kiln.kernels.paged import (
    NATIVE_E4M3,
    NATIVE_E4M3_V,
    attend_tile,
    context_start,
    kv_block_ids,
    kv_scale,
)


@triton.jit(do_not_specialize=["stride_bt"])  # block-table width varies by step
def _decode_heads_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qk_scale,
    k_scale_ptr, v_scale_ptr, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb,
    stride_ks, stride_kh, stride_bt, window, softcap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEADS: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, PREFETCH: tl.constexpr, V_T: tl.constexpr = False,
):
    """One (sequence, HEADS KV heads): out[seq, h*GROUP:(h+1)*GROUP] for each of them, as
    _decode_kernel computes it with one split (1-byte caches: k_scale into the scores,
    v_scale into the output)."""
    seq = tl.program_id(0)
    first = tl.program_id(1) * HEADS
    seq_len = tl.load(seq_lens_ptr + seq)
    start = context_start(seq_len, window, WINDOW)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_g[:, None] * stride_oh + offs_d[None, :]
    out_row = out_ptr + seq.to(tl.int64) * stride_ot + first * GROUP * stride_oh
    if start >= seq_len:  # empty (padding) row: defined output, no NaN
        for h in tl.static_range(HEADS):
            tl.store(out_row + h * GROUP * stride_oh + rows, tl.zeros(
                [BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=io_mask)
        return
    KV_QUANT: tl.constexpr = k_cache_ptr.dtype.element_ty.primitive_bitwidth == 8
    AHEAD: tl.constexpr = PREFETCH != 0
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    tiles = tl.cdiv(seq_len - start, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_N)
    blocks = 0
    if AHEAD:
        blocks = kv_block_ids(table_row, start + offs_t, seq_len, BLOCK_SIZE, True)
    q_row = q_ptr + seq.to(tl.int64) * stride_qt + offs_g[:, None] * stride_qh + offs_d[None, :]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for it in range(0, HEADS * tiles):
        h = it // tiles
        t = it - h * tiles
        kv_head = first + h
        n0 = start + t * BLOCK_N
        if AHEAD:  # the next iteration's tile: the next one of this head, or the first
            n_next = tl.where(t + 1 == tiles, start, n0 + BLOCK_N)
            after = kv_block_ids(table_row, n_next + offs_t, seq_len, BLOCK_SIZE, True)
        q = tl.load(q_row + kv_head * GROUP * stride_qh, mask=io_mask, other=0.0)
        scale = qk_scale
        if KV_QUANT:
            q = kv_query(q, k_cache_ptr)
            scale = qk_scale * kv_scale(k_cache_ptr, k_scale_ptr, kv_head, NATIVE_E4M3)
        m_i = tl.where(t == 0, float("-inf"), m_i)  # a new head: alpha = 0 clears acc, l
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                    n0, seq_len, offs_g, kv_head, scale,
                                    stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, BLOCK_SIZE, True, False, DOT_PREC,
                                    window, softcap, False, SOFTCAP, 0.0, False,
                                    None, 0, False, blocks, AHEAD, V_T)
        if AHEAD:
            blocks = after
        if t + 1 == tiles:
            out = acc / l_i[:, None]
            if KV_QUANT:
                out = out * kv_scale(k_cache_ptr, v_scale_ptr, kv_head, NATIVE_E4M3_V)
            tl.store(out_row + h * GROUP * stride_oh + rows, out.to(out_ptr.dtype.element_ty),
                     mask=io_mask)


def launch_decode_heads(q, k_cache, v_cache, out, block_tables, seq_lens, qk_scale, k_scale,
                        v_scale, heads: int, sliding_window: int | None,
                        softcap_log2: float | None, block_n: int, block_d: int, block_g: int,
                        dot_prec: str, num_stages: int, num_warps: int, prefetch: int,
                        cap: dict, v_t: bool = False) -> None:
    """The launch paged_attention_decode makes with heads_per_program = heads (checked
    there): grid (sequences, KV heads / heads). v_t: V blocks stored transposed."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    _decode_heads_kernel[(num_seqs, num_kv_heads // heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, qk_scale, k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), sliding_window or 0,
        softcap_log2 or 0.0, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        HEADS=heads, DOT_PREC=dot_prec, WINDOW=sliding_window is not None,
        SOFTCAP=softcap_log2 is not None, PREFETCH=prefetch, V_T=v_t, num_warps=num_warps,
        num_stages=num_stages, **cap)

