"""Decode attention over an e4m3 KV cache with q . k on e4m3 tensor cores (sm_90 wgmma).

Hopper has e4m3 tensor-core products only as wgmma (mma.sync with e4m3 operands is
emulated by ptxas with float16 HMMA, and Triton upcasts such dots to float16 itself), and
wgmma needs 64 rows per warpgroup. A decode program has 4-16 query heads, so the scores
are computed transposed: s^T [keys, heads] = K [keys, d] @ q^T [d, heads], keys as the 64-row
side. K's tile goes from the cache into shared memory (cp.async) and from there into the
wgmma as stored: no conversion, no register traffic. Both operands are K-major (d
contiguous), which e4m3 wgmma requires.

p @ v stays in float16 (V would have to be transposed for an e4m3 product: its tokens,
the reduced dimension, are not contiguous): V is read as int32 words and converted by the
hardware (paged.load_kv_words with CVT), exactly, two values per instruction.

q is quantized per query head: q_hi = e4m3(q * 448 / amax). With Q_PARTS = 2 the
remainder is quantized too, q_lo = e4m3(r * 448 / amax_r), r = q * 448 / amax - q_hi, and
the scores are k . q_hi * c_hi + k . q_lo * c_lo: about 8 significant bits of q (bf16 has
8), for a second wgmma on the same K tile (tensor-core time is not what bounds decode).
Q_PARTS = 1: one part, 4 bits, the FlashAttention-3 / TensorRT-LLM style FP8 product.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.paged import kv_tile_offsets, load_kv_words


@triton.jit
def _e4m3_rows(x):
    """Rows of float32 x as e4m3 x * 448 / amax (per row), and amax / 448 (>= 1e-30 / 448)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)
    return (x * (448.0 / amax)[:, None]).to(tl.float8e4nv), amax * (1.0 / 448.0)


@triton.jit
def fp8_query(q, qk_scale, Q_PARTS: tl.constexpr):
    """q [G, D] (any float dtype) -> (q_hi^T, q_lo^T [D, G] e4m3, c_hi, c_lo [G] float32)
    with q * qk_scale ~= q_hi * c_hi + q_lo * c_lo per row. Q_PARTS = 1: q_lo = q_hi, c_lo
    = 0 (never used)."""
    x = q.to(tl.float32)
    hi, c_hi = _e4m3_rows(x)
    if Q_PARTS == 2:
        lo, c_lo = _e4m3_rows(x / c_hi[:, None] - hi.to(tl.float32))
        return tl.trans(hi), tl.trans(lo), c_hi * qk_scale, c_lo * c_hi * qk_scale
    return tl.trans(hi), tl.trans(hi), c_hi * qk_scale, c_hi * 0.0


@triton.jit
def attend_tile_fp8(q_hi_t, q_lo_t, c_hi, c_lo, acc, m_i, l_i, k_cache_ptr, v_cache_ptr,
                    table_row_ptr, n0, n_end, kv_head, stride_kb, stride_ks, stride_kh,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, Q_PARTS: tl.constexpr):
    """paged.attend_tile for decode over an e4m3 cache (no causal mask, window, softcap,
    ALiBi or in-kernel rotary), scores transposed: s^T [BLOCK_N, G] in base 2, already
    scaled (c_hi, c_lo carry qk_scale and k_scale). acc [G, BLOCK_D] float32 as usual;
    l_i [BLOCK_N, G]: the running sums per key slot (one reduction over the keys per
    program instead of one per tile). HEAD_DIM % 4 == 0 (V is read as words)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = kv_tile_offsets(table_row_ptr, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                             BLOCK_SIZE, MASK, n_end)
    n_ok = offs_n < n_end
    k_mask = offs_d[None, :] < HEAD_DIM
    if MASK:
        k_mask = n_ok[:, None] & k_mask
    k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=k_mask, other=0.0)
    st = tl.dot(k, q_hi_t) * c_hi[None, :]
    if Q_PARTS == 2:
        st += tl.dot(k, q_lo_t) * c_lo[None, :]
    if MASK:
        st = tl.where(n_ok[:, None], st, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(st, axis=0))
    pt = tl.exp2(st - m_new[None, :])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha[None, :] + pt  # summed over keys once, after the last tile
    v = load_kv_words(v_cache_ptr, kv_off, n_ok, tl.float16, BLOCK_N, BLOCK_D, HEAD_DIM,
                      MASK, True)
    acc = acc * alpha[:, None] + tl.dot(tl.trans(pt).to(tl.float16), v)
    return acc, m_new, l_i
