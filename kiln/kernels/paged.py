"""Pieces shared by the paged attention kernels: KV tile gather and one online-softmax step."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


def dot_precision(dtype: object) -> str:
    """float32 inputs get exact products (the reference's numerics); 16-bit ones use MMA."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(head_dim: int) -> int:
    """Head dims that are not a power of two are padded (and masked) up to one."""
    return max(16, triton.next_power_of_2(head_dim))
