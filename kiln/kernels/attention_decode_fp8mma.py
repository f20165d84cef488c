"""Decode attention over an e4m3 KV cache with e4m3 products: no K / V byte converted.

kiln's decode kernel (attention_decode._decode_kernel) converts each e4m3 K and V value to
float16 for its products (the query heads of a KV head padded to 16 MMA rows); on the
transposed V layout its main loop issues ~20 warp instructions a key (sm_90; 272 of its
1,255 a 128-key tile are conversions). Here the tiles reach the tensor cores as they
arrive, keys as the MMA's M ("swap AB"; on Hopper an e4m3 wgmma, M = 64 a warpgroup):

    Q^T [D, G] in e4m3, one scale a program (max |q| / 448), G = the KV head's query
    heads padded to 16 columns
    S^T [BLOCK_N, G] = K_tile [BLOCK_N, D] @ Q8^T
    online softmax along the keys (axis 0), one running (m, l) a query column
    O^T [D, G] = O^T * alpha + V^T_tile [D, BLOCK_N] (the transposed V layout) @ P8^T
    out = (O^T / (l * 2^8))^T * v_scale           (P8 = e4m3(p * 2^8): p in [0, 1])

SPLIT (default): q and p each go in as two e4m3 terms, the value and its rounding error
(`hi + lo`, a second product each), which brings the error to that of the converting
kernel (q in one e4m3 term alone: ~1.4-6% rms of the output on random data, against
~0.35%; benchmarks/attn_decode_fp8mma.py check). The extra products are cheap: 16 columns.

Opt-in and untimed (62nd session, no device lent): KILN_DECODE_FP8_MMA=1 routes decode
attention over an e4m3 cache on the transposed V layout here (no window, softcap, ALiBi or
sinks; splits through the reduce launch), `nosplit` the same without the hi + lo terms.
KILN_DECODE_FP8_MMA_LAUNCH=BLOCK_N,WARPS,STAGES (default 128,4,2).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.attention_splits import _reduce_kernel, _split_len
from kiln.kernels.fp8_quant import _e4m3_soft
from kiln.kernels.paged import LOG2E, load_v_transposed
from kiln.kernels.pdl import pdl_enter

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
P_SCALE = 256.0  # p in [0, 1] times 2^8: its small values stay normal in e4m3 (>= 2^-6)
LO_SCALE = 16.0  # a rounding error is <= 2^-4 of its value: times 16 back in range


def _mode(text: str) -> str:
    if text not in ("0", "1", "nosplit"):
        raise ValueError(f"KILN_DECODE_FP8_MMA={text!r}: expected 0, 1 or nosplit")
    return text


def _launch(text: str) -> tuple[int, int, int]:
    try:
        block_n, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"KILN_DECODE_FP8_MMA_LAUNCH={text!r}: expected BLOCK_N,WARPS,"
                         "STAGES, e.g. 128,4,2") from None
    if block_n not in (64, 128, 256) or warps not in (4, 8) or not 1 <= stages <= 6:
        raise ValueError(f"KILN_DECODE_FP8_MMA_LAUNCH={text!r}: BLOCK_N 64, 128 or 256, "
                         "4 or 8 warps, 1-6 stages")
    return block_n, warps, stages


MODE = _mode(os.environ.get("KILN_DECODE_FP8_MMA", "0"))
LAUNCH = _launch(os.environ.get("KILN_DECODE_FP8_MMA_LAUNCH", "128,4,2"))


@triton.jit
def _e4m3(x, INTERPRET: tl.constexpr):
    """float32 within +-448 -> e4m3, round to nearest even (the interpreter's own cast
    does not carry a round-up into the exponent: 31.9 -> 16)."""
    if INTERPRET:
        return _e4m3_soft(x)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _hi_lo(x, scale, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """x / scale in e4m3 and (SPLIT) its rounding error times LO_SCALE in e4m3 too."""
    hi = _e4m3(x / scale, INTERPRET)
    lo = hi
    if SPLIT:
        lo = _e4m3((x / scale - hi.to(tl.float32)) * 16.0, INTERPRET)
    return hi, lo


@triton.jit
def _fp8mma_tile(q8, q8_lo, acc, acc_lo, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row_ptr,
                 n0, n_end, kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASK: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N folded into acc / acc_lo = O^T [D, G] (times P_SCALE, and
    P_SCALE * LO_SCALE) and m_i / l_i [G] (base 2). MASK: keys >= n_end dropped.
    Q = (q8 + q8_lo / LO_SCALE) * qk_scale (SPLIT; else q8 * qk_scale), the softmax scale
    and log2(e) included."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASK:
        n_ok = offs_n < n_end
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE)
    k_off = (block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
             + kv_head * stride_kh)
    if MASK:
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=n_ok[:, None],
                    other=0.0)
    else:
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :])
    st = tl.dot(k, q8)  # S^T [N, G], float32
    if SPLIT:
        st += tl.dot(k, q8_lo) * (1.0 / 16.0)
    st = st * qk_scale
    if MASK:
        st = tl.where(n_ok[:, None], st, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(st, axis=0))
    p = tl.exp2(st - m_new[None, :])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    # V^T [D, N], whole blocks unmasked: keys past the context get p = 0 (a zeroed pool)
    vt = load_v_transposed(v_cache_ptr, table_row_ptr, n0, n_end, kv_head, stride_kb,
                           BLOCK_N, HEAD_DIM, HEAD_DIM, BLOCK_SIZE)
    p8, p8_lo = _hi_lo(p, 1.0 / 256.0, SPLIT, INTERPRET)
    acc = tl.dot(vt, p8, acc * alpha[None, :])
    if SPLIT:
        acc_lo = tl.dot(vt, p8_lo, acc_lo * alpha[None, :])
    return acc, acc_lo, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width varies by step
def _fp8mma_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr,
    seq_lens_ptr, qk_scale, k_scale_ptr, v_scale_ptr, stride_qt, stride_qh, stride_ot,
    stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT: tl.constexpr, INTERPRET: tl.constexpr = False, DEPENDENTS: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """One (sequence, KV head, split) over its share of the context, as
    attention_decode._decode_kernel splits it: NUM_SPLITS == 1 writes out, else the
    split's normalised partial and base-2 lse for _reduce_kernel. K = k_cache *
    k_scale[kv_head], V = v_cache * v_scale[kv_head]; qk_scale = softmax scale * log2(e).
    PDL / DEPENDENTS as _decode_kernel's."""
    pdl_enter(PDL, DEPENDENTS)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_g
    g_ok = offs_g[None, :] < GROUP
    out_off = seq.to(tl.int64) * stride_ot + head[None, :] * stride_oh + offs_d[:, None]
    if start >= end:
        if NUM_SPLITS == 1:  # an empty (padding) row: zeros, not NaN
            tl.store(out_ptr + out_off, tl.zeros([HEAD_DIM, BLOCK_G], tl.float32).to(
                out_ptr.dtype.element_ty), mask=g_ok)
        return
    qt = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[None, :] * stride_qh
                 + offs_d[:, None], mask=g_ok, other=0.0).to(tl.float32)  # Q^T [D, G]
    q_s = tl.maximum(tl.max(tl.max(tl.abs(qt), axis=1), axis=0) / 448.0, 1e-30)
    q8, q8_lo = _hi_lo(qt, q_s, SPLIT, INTERPRET)
    qk_scale = qk_scale * q_s * tl.load(k_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
    acc_lo = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, acc_lo, m_i, l_i = _fp8mma_tile(
            q8, q8_lo, acc, acc_lo, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, n0, end,
            kv_head, qk_scale, stride_kb, stride_ks, stride_kh, HEAD_DIM, BLOCK_SIZE,
            BLOCK_N, False, SPLIT, INTERPRET)
    if full_end < end:
        acc, acc_lo, m_i, l_i = _fp8mma_tile(
            q8, q8_lo, acc, acc_lo, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, full_end,
            end, kv_head, qk_scale, stride_kb, stride_ks, stride_kh, HEAD_DIM, BLOCK_SIZE,
            BLOCK_N, True, SPLIT, INTERPRET)
    if SPLIT:
        acc += acc_lo * (1.0 / 16.0)
    out = acc * (tl.load(v_scale_ptr + kv_head) / 256.0) / l_i[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=g_ok)
    else:  # partials [seq, head, split, d] and [seq, head, split], as _decode_kernel's
        mine = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + mine[None, :] * HEAD_DIM + offs_d[:, None], out, mask=g_ok)
        tl.store(part_lse_ptr + mine, m_i + tl.log2(l_i), mask=offs_g < GROUP)


def fp8mma_applies(q: torch.Tensor, k_cache: torch.Tensor, v_t: bool, group: int,
                   sliding_window, softcap, alibi_slopes, key_rotary) -> bool:
    """Whether decode attention over this cache can take the e4m3-product kernel: sm_89+
    (or the CPU's interpreter), an e4m3 cache with V transposed, a power-of-two head_dim
    of 32-256, <= 16 query heads a KV head, tiles of whole blocks, none of window /
    softcap / ALiBi / sinks."""
    head_dim, block_size = q.shape[-1], k_cache.shape[1]
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        return False  # no e4m3 products
    return k_cache.dtype == torch.float8_e4m3fn and v_t and group <= 16 and \
        head_dim in (32, 64, 128, 256) and LAUNCH[0] % block_size == 0 and \
        sliding_window is None and softcap is None and alibi_slopes is None and \
        key_rotary is None


def fp8mma_decode(q: torch.Tensor, k_cache: torch.Tensor, v_t_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor,
                  num_splits: int = 1, split: bool | None = None,
                  launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Writes attention of q [seqs, heads, d] over k_cache [blocks, bs, kv_heads, d] and
    v_t_cache [blocks, kv_heads, d, bs] (float8_e4m3fn; k_scale / v_scale float32
    [kv_heads]) into out [seqs, heads, d]. split (default: MODE != nosplit): q and p as
    hi + lo e4m3 terms; launch (BLOCK_N, warps, stages; default LAUNCH)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    block_n, num_warps, num_stages = launch or LAUNCH
    assert v_t_cache.shape == (k_cache.shape[0], num_kv_heads, head_dim, block_size)
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and block_n % block_size == 0
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused
    use_pdl = pdl.ATTENTION and pdl.enabled(q)
    _fp8mma_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_t_cache, out, part_out, part_lse, block_tables, seq_lens,
        scale * LOG2E, k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        NUM_SPLITS=num_splits, SPLIT=MODE != "nosplit" if split is None else split,
        INTERPRET=_INTERPRET, DEPENDENTS=pdl.dependents(q), PDL=use_pdl,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_args(use_pdl))
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, seq_lens, out.stride(0), out.stride(1), 0,
            HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=head_dim, NUM_SPLITS=num_splits,
            WINDOW=False, num_warps=1 if head_dim <= 64 else 2)
    return out
