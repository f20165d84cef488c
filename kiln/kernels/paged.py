"""Pieces shared by the paged attention kernels: KV tile gather, one online-softmax step,
and the per-head scales of 1-byte (e4m3fn, int8) KV caches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
KV_QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


@triton.jit
def kv_tile_offsets(table_row_ptr, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                    BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, n_end):
    """Element offsets of context tokens offs_n (one KV head) in a paged cache.

    Token n lives in slot n % BLOCK_SIZE of physical block table_row[n // BLOCK_SIZE].
    """
    if MASK:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=offs_n < n_end, other=0)
    else:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE)
    return (block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
            + kv_head * stride_kh)


@triton.jit
def attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row_ptr, n0, n_end,
                q_pos, kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Folds keys n0 .. n0+BLOCK_N into the running (acc, m, l) of queries q [M, D].

    s = (q . k) * scale * log2(e);  m' = max(m, max_n s);  p = 2^(s - m')
    l' = l * 2^(m - m') + sum_n p;  acc' = acc * 2^(m - m') + p @ v
    MASK drops keys >= n_end; CAUSAL also drops keys after each query's position q_pos.
    1-byte caches are converted to q's dtype as stored (exact for e4m3 and |int8| <= 127 in
    16/32-bit floats): the kernels fold k_scale into qk_scale and v_scale into the output.
    A 1-byte V tile is read as 32-bit words (load_v_words) when head_dim % 4 == 0.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = kv_tile_offsets(table_row_ptr, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                             BLOCK_SIZE, MASK, n_end)
    d_ok = offs_d < HEAD_DIM
    if MASK:
        n_ok = offs_n < n_end
        kt_mask = n_ok[None, :] & d_ok[:, None]
        v_mask = n_ok[:, None] & d_ok[None, :]
    else:
        kt_mask = d_ok[:, None]
        v_mask = d_ok[None, :]
    kt = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=kt_mask, other=0.0)
    s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PREC) * qk_scale
    if MASK:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    V_WORDS: tl.constexpr = (v_cache_ptr.dtype.element_ty.primitive_bitwidth == 8
                             and HEAD_DIM % 4 == 0)
    if V_WORDS:
        v = load_v_words(v_cache_ptr, kv_off, offs_n < n_end, q.dtype, BLOCK_N, BLOCK_D,
                         HEAD_DIM, MASK)
    else:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _word_byte(w, J: tl.constexpr, dtype: tl.constexpr, FP8: tl.constexpr):
    """Byte J (little-endian: the value at d = 4i + J) of int32 words w, as `dtype`."""
    if FP8:
        b = ((w >> (8 * J)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        b = ((w << (24 - 8 * J)) >> 24).to(tl.int8)  # arithmetic shift: sign extended
    return b.to(dtype)


@triton.jit
def load_v_words(v_cache_ptr, kv_off, n_ok, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_D] of a 1-byte cache as `dtype`, read as int32 words.

    The V operand of p @ v is reduced over tokens, which are not contiguous in the cache;
    left as bytes, the compiler feeds it to the MMA one shared-memory byte load per value.
    Here each word (4 consecutive d) is split into its bytes in registers and the four
    planes interleaved back, so the tile reaches the MMA as 16-bit values.
    """
    offs_w = tl.arange(0, BLOCK_D // 4)
    words = v_cache_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    w_mask = offs_w[None, :] < HEAD_DIM // 4
    if MASK:
        w_mask = n_ok[:, None] & w_mask
    w = tl.load(words + (kv_off // 4)[:, None] + offs_w[None, :], mask=w_mask, other=0)
    FP8: tl.constexpr = v_cache_ptr.dtype.element_ty == tl.float8e4nv
    v = tl.join(tl.join(_word_byte(w, 0, dtype, FP8), _word_byte(w, 2, dtype, FP8)),
                tl.join(_word_byte(w, 1, dtype, FP8), _word_byte(w, 3, dtype, FP8)))
    return tl.reshape(v, [BLOCK_N, BLOCK_D])  # [n, i, k, s] holds d = 4i + 2k + s


def dot_precision(dtype: object) -> str:
    """float32 inputs get exact products (the reference's numerics); 16-bit ones use MMA."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(head_dim: int) -> int:
    """Head dims that are not a power of two are padded (and masked) up to one."""
    return max(16, triton.next_power_of_2(head_dim))


def kv_scale_args(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel takes: float32 [kv_heads] scales for a 1-byte cache, or a
    placeholder that is never read (the kernels branch on the cache's element type at
    compile time, so a 16/32-bit cache compiles to the same code as without scales).

    Checks shapes and dtypes only: nothing is read from the device (CUDA-graph safe).
    """
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    if k_cache.dtype not in KV_QUANT_DTYPES:
        assert k_cache.element_size() > 1, f"unsupported KV cache dtype {k_cache.dtype}"
        return k_cache, v_cache
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if head_dim % 4 == 0:  # attend_tile reads V as int32 words (load_v_words)
        assert all(x % 4 == 0 for x in v_cache.stride()[:-1]) and v_cache.data_ptr() % 4 == 0, \
            "a 1-byte KV cache with head_dim % 4 == 0 needs 4-byte aligned rows"
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        assert s is not None, f"a {k_cache.dtype} KV cache needs {name}"
        assert (s.dtype == torch.float32 and s.numel() == num_kv_heads and s.is_contiguous()
                and s.device == k_cache.device), \
            f"{name}: want float32 [{num_kv_heads}] contiguous on {k_cache.device}"
    return k_scale, v_scale
