"""The decode GEMVs of the integer-weight linear layers (kiln.kernels.int_gemm picks them):
up to GEMV_ROWS rows (_gemv_kernel: broadcast products), the pieces of the one-row GEMV
(kiln.kernels.int_gemv1._gemv1_kernel: 32-bit words, integer-only unpacking) that the
other word GEMVs share, and the weight tile the GEMVs and the tl.dot kernels dequantize
(_dequant_tile). Storage and numerics: see kiln.kernels.int_gemm."""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.int_unpack import _unpack_nibbles
from kiln.kernels.split_k import split_k_fixup


@triton.jit
def _int_tile(w_ptr, offs_n, k, K, stride_wn, mask_n, BLOCK_K: tl.constexpr,
              BITS: tl.constexpr, EVEN: tl.constexpr = False):
    """The integers q of w[offs_n, k:k + BLOCK_K] as float32 [BLOCK_N, BLOCK_K], exact
    (zeros past N and K; EVEN: the tile lies inside, no masks). Integers to float32
    without the quarter-rate conversion instructions: a value u < 2^23 in the mantissa of
    2^23 reads 2^23 + u exactly."""
    rows = offs_n.to(tl.int64)[:, None]
    if BITS == 4:
        offs_p = k // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN:
            packed = tl.load(w_ptr + rows * stride_wn + offs_p[None, :])
        else:
            packed = tl.load(w_ptr + rows * stride_wn + offs_p[None, :],
                             mask=mask_n[:, None] & (offs_p < K // 2)[None, :], other=0)
        low, high = _unpack_nibbles(packed.to(tl.int32))
        return tl.reshape(tl.join(low, high), (low.shape[0], BLOCK_K))  # even k low
    # int8 q: u = q + 128 (its bits xor 0x80) in 0..255
    offs_k = k + tl.arange(0, BLOCK_K)
    if EVEN:
        q = tl.load(w_ptr + rows * stride_wn + offs_k[None, :])
    else:
        q = tl.load(w_ptr + rows * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
    u = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int32)
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128


@triton.jit
def _dequant_tile(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn, mask_n,
                  BLOCK_K: tl.constexpr, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  GROUP_TILE: tl.constexpr, GROUPS: tl.constexpr = 1,
                  EVEN: tl.constexpr = False):
    """w[offs_n, k:k + BLOCK_K] as float32 [BLOCK_N, BLOCK_K] (zeros past N and K).

    GROUP_TILE: the tile lies in one group (BLOCK_K divides G and k is a multiple of
    BLOCK_K), so one scale per row. GROUPS > 1: the tile is GROUPS whole groups (G =
    BLOCK_K / GROUPS, k a multiple of BLOCK_K), a [BLOCK_N, GROUPS] scale tile broadcast
    over each group's values. Otherwise the scale of every element is gathered. EVEN (with
    GROUP_TILE or GROUPS): the tile lies inside N and K, loads without masks."""
    q = _int_tile(w_ptr, offs_n, k, K, stride_wn, mask_n, BLOCK_K, BITS, EVEN)
    if GROUP_TILE:
        s_offs = offs_n.to(tl.int64) * stride_sn + k // G
        scale = tl.load(s_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
        if HAS_OFFSET:
            offset = tl.load(o_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
    elif GROUPS > 1:
        SIZE: tl.constexpr = BLOCK_K // GROUPS
        offs_g = k // SIZE + tl.arange(0, GROUPS)
        s_offs = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
        if EVEN:
            scale = tl.load(s_ptr + s_offs)[:, :, None]
            if HAS_OFFSET:
                offset = tl.load(o_ptr + s_offs)[:, :, None]
        else:
            mask = mask_n[:, None] & (offs_g < K // SIZE)[None, :]
            scale = tl.load(s_ptr + s_offs, mask=mask, other=0.0)[:, :, None]
            if HAS_OFFSET:
                offset = tl.load(o_ptr + s_offs, mask=mask, other=0.0)[:, :, None]
        q = tl.reshape(q, (q.shape[0], GROUPS, SIZE))
    else:
        offs_k = k + tl.arange(0, BLOCK_K)
        s_offs = offs_n.to(tl.int64)[:, None] * stride_sn + (offs_k // G)[None, :]
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        scale = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
        if HAS_OFFSET:
            offset = tl.load(o_ptr + s_offs, mask=mask, other=0.0)
    w = q * scale
    if HAS_OFFSET:
        w = w + offset
    if GROUPS > 1 and not GROUP_TILE:
        w = tl.reshape(w, (w.shape[0], BLOCK_K))
    return w


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, G, K_PER_SPLIT,
                 stride_xm, stride_wn, stride_sn, stride_om,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_TILE: tl.constexpr, ATOMIC: tl.constexpr):
    """out[:M, n block] (+)= x[:M, k split] @ w[n block, k split]^T, M <= ROWS.

    ATOMIC: out is a float32 buffer the splits add into (the first split adds the
    bias); otherwise one split, out in x's dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, ROWS)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k in range(k_start, k_end, BLOCK_K):
        w = _dequant_tile(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn, mask_n,
                          BLOCK_K, BITS, HAS_OFFSET, GROUP_TILE)
        offs_k = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # the weight in x's dtype
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _exponent_base(n):
    """150 << 23 for any n >= 0, as a value the compiler cannot fold (see _value_at)."""
    return (n >> 31) + (150 << 23)


@triton.jit
def _value_at(src, pos: tl.constexpr, BITS: tl.constexpr, E0):
    """The BITS-bit value at bit pos of the int32 words src as float32 (int8: the signed
    byte) in one logic op and one add: or'd into a float whose mantissa bit pos weighs 1
    (exponent 150 - pos), the masked field reads 2^(23 - pos) + u exactly. E0: 150 << 23
    as a value the compiler cannot fold, from _exponent_base (a logic op takes one
    immediate: with the mask and the exponent both immediates, Triton 3.6 emits two a
    value)."""
    E = E0 - (pos << 23)
    if BITS == 4:
        f = ((src & (0xF << pos)) | E).to(tl.float32, bitcast=True)
        return f - (1 << (23 - pos))
    # int8: q = u - 128 with u = byte ^ 0x80; mask, xor and exponent in one op
    f = ((src & (0xFF << pos)) ^ (E | (0x80 << pos))).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - pos)) + 128)


@triton.jit
def _dequant_words(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn, mask_n, E0,
                   BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr, EVEN: tl.constexpr):
    """int4 w[offs_n, k:k + BLOCK_K] as float32 [BLOCK_N, BLOCK_K] from 32-bit words (w_ptr
    the storage viewed as int32, stride_wn in words; value i of word j is k = 8 j + i),
    each value read in place (_value_at: one logic op and one add), the tile in one group
    (one scale a row). EVEN: N and K whole tiles, so no masks."""
    offs_w = k // 8 + tl.arange(0, BLOCK_K // 8)
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :]
    s_offs = offs_n.to(tl.int64) * stride_sn + k // G
    if EVEN:
        words = tl.load(ptrs)
        scale = tl.load(s_ptr + s_offs)[:, None]
    else:
        words = tl.load(ptrs, mask=mask_n[:, None] & (offs_w < K // 8)[None, :], other=0)
        scale = tl.load(s_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
    hi = words >> 12
    v0, v1 = _value_at(words, 0, 4, E0), _value_at(words, 4, 4, E0)
    v2, v3 = _value_at(words, 8, 4, E0), _value_at(words, 12, 4, E0)
    v4, v5 = _value_at(words, 16, 4, E0), _value_at(hi, 8, 4, E0)
    v6, v7 = _value_at(hi, 12, 4, E0), _value_at(hi, 16, 4, E0)
    # A join's new axis is the last (fastest): join over bit 2 of the value index first,
    # then bit 1, then bit 0, so [BLOCK_N, BLOCK_K / 8, r, s, t] holds value 4r + 2s + t
    # of each word, k = 8 j + 4 r + 2 s + t
    even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    q = tl.reshape(tl.join(even, odd), (words.shape[0], BLOCK_K))
    w = q * scale
    if HAS_OFFSET:
        if EVEN:
            w = w + tl.load(o_ptr + s_offs)[:, None]
        else:
            w = w + tl.load(o_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
    return w


@triton.jit
def _x_at(x_ptr, kw, i: tl.constexpr, k_end, EVEN_K: tl.constexpr):
    """x[kw + i] as float32 (0 from k_end on, unless every step is whole: EVEN_K). The
    address as (x_ptr + kw) + i: summing kw + i first compiled to 9.4 instead of 7.8
    instructions a weight (int4, 256 x 32 tiles)."""
    if EVEN_K:
        return tl.load(x_ptr + kw + i).to(tl.float32)
    return tl.load(x_ptr + kw + i, mask=kw < k_end, other=0.0).to(tl.float32)


@triton.jit
def _x_columns(x_ptr, kw, k_end, PER: tl.constexpr, EVEN_K: tl.constexpr):
    """x[kw + i] for i < PER, a tuple of float32 tensors shaped like kw, from one vector
    load a word (its PER inputs are adjacent) split in registers."""
    offs = kw[:, :, :, None] + tl.arange(0, PER)[None, None, None, :]
    if EVEN_K:
        xv = tl.load(x_ptr + offs).to(tl.float32)
    else:
        xv = tl.load(x_ptr + offs, mask=offs < k_end, other=0.0).to(tl.float32)
    if PER == 8:  # as (i >> 2, i >> 1 & 1, i & 1): each split takes the lowest bit
        e, o = tl.split(tl.reshape(xv, (xv.shape[0], xv.shape[1], xv.shape[2], 2, 2, 2)))
        e0, e1 = tl.split(e)
        o0, o1 = tl.split(o)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        cols = (x0, x1, x2, x3, x4, x5, x6, x7)
    else:
        e, o = tl.split(tl.reshape(xv, (xv.shape[0], xv.shape[1], xv.shape[2], 2, 2)))
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        cols = (x0, x1, x2, x3)
    return cols


@triton.jit
def _factored_step(acc, words, scale, offset, x_ptr, kw, k_end, BITS: tl.constexpr,
                   PER: tl.constexpr, HAS_OFFSET: tl.constexpr, EVEN_K: tl.constexpr,
                   XVEC: tl.constexpr):
    """acc + one K step's products with the scale (and offset) applied once a word:
    sum_i (s q_i + o) x_i = s sum_i q_i x_i + o sum_i x_i. Values are read in place
    (_value_at); the high ones of a word from one shifted copy of it."""
    SPLIT: tl.constexpr = 5 if BITS == 4 else 2  # in place: bits 0..19 / 0..15
    SHIFT: tl.constexpr = 12 if BITS == 4 else 16
    hi = words >> SHIFT
    E0 = _exponent_base(k_end)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    x_sum = tl.zeros(kw.shape, dtype=tl.float32)
    if XVEC:
        cols = _x_columns(x_ptr, kw, k_end, PER, EVEN_K)
    for i in tl.static_range(PER):
        if i < SPLIT:
            q = _value_at(words, BITS * i, BITS, E0)
        else:
            q = _value_at(hi, BITS * i - SHIFT, BITS, E0)
        if XVEC:
            xi = cols[i]
        else:
            xi = _x_at(x_ptr, kw, i, k_end, EVEN_K)
        part += q * xi
        if HAS_OFFSET:
            x_sum += xi
    acc += part * scale
    if HAS_OFFSET:
        acc += offset * x_sum
    return acc


@triton.jit
def _word_tile(pid_n, N, stride_sn, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
               WPG: tl.constexpr):
    """A program's block of weight rows as [BLOCK_N, 1, 1] (its mask, int64 row indices
    and their scales' row offsets) and a K step's words as [1, GROUPS, WPG] (the group g
    of each, and its index in the step)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)[:, None, None]
    g = tl.arange(0, GROUPS)[None, :, None]
    word = g * WPG + tl.arange(0, WPG)[None, None, :]
    return (offs_n < N)[:, None, None], rows, rows * stride_sn, g, word


@triton.jit
def _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w0, k_end, G,
                stride_wn, PER: tl.constexpr, WPG: tl.constexpr, GROUPS: tl.constexpr,
                HAS_OFFSET: tl.constexpr, EVEN_K: tl.constexpr):
    """The words of the K step starting at word w0, and their groups' scales (offsets)."""
    k = w0 * PER
    if EVEN_K:  # every step whole: masks only on rows, so loads can be vectors
        words = tl.load(w_ptr + rows * stride_wn + w0 + word, mask=mask_n, other=0)
        mask_g = mask_n & (g < GROUPS)
    else:
        mask_w = k + PER * word < k_end
        mask_g = mask_n & (k + g * (WPG * PER) < k_end)
        words = tl.load(w_ptr + rows * stride_wn + w0 + word, mask=mask_n & mask_w, other=0)
    group = k // G + g  # [1, GROUPS, 1]
    scale = tl.load(s_ptr + s_rows + group, mask=mask_g, other=0.0)
    offset = scale
    if HAS_OFFSET:
        offset = tl.load(o_ptr + s_rows + group, mask=mask_g, other=0.0)
    return words, scale, offset


@triton.jit
def _gemv1_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, N,
                 BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    """A one-row GEMV's block of sums y (float32 [BLOCK_N]) out: added into out's float32
    buffer (ATOMIC, the first split adding the bias), or summed over the SPLIT_K splits by
    the last one (split_k_fixup), or stored (one split); the bias added, x's dtype."""
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ATOMIC:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
            y += tl.where(pid_k == 0, 1.0, 0.0) * bias
        tl.atomic_add(out_ptr + offs, y, mask=offs < N, sem="relaxed")
    else:
        last = True
        if SPLIT_K > 1:
            y, last = split_k_fixup(y, part_ptr, count_ptr, pid_n, offs, offs < N, N, offs,
                                    SPLIT_K, INTERPRET)
        if last:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < N)
