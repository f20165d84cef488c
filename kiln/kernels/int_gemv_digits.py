"""One-row W4A16 / W8A16 products on dp4a: x written as three signed-byte digit planes.

The float GEMV (kiln.kernels.int_gemv1._gemv1_kernel) spends ~6 instructions a weight on
unpacking, converting and multiplying in float32, and on an H200 it is bound by that, not
by HBM: int4 and int8 take the same time at gate_up (36 us), int4 streaming half the
bytes. Here the arithmetic is integer and four values an instruction:

* x (one row, 16-bit) is written once a call as a fixed-point integer relative to its
  largest value, X = round(x / s * 2^16) with s = max|x| / 127, and X as three balanced
  base-256 digits d1 2^16 + d2 2^8 + d3, each in -128..127 (_digits_kernel). The error is
  at most s / 2^17 an element, 2^-24 of max|x|: below float32 summation error.
* The weight is read as 32-bit words. int8: a word is four signed values; int4: eight
  nibbles, the even-k ones are `word & 0x0F0F0F0F` as four bytes, the odd-k ones
  `(word >> 4) & 0x0F0F0F0F` (x's digit planes are stored with even and odd k apart to
  match). `dp4a` multiplies four byte pairs and adds them to an int32: per digit plane one
  dp4a a word (int8) or two (int4), exact integer sums (at most 32 products of 15 x 128 a
  chunk).
* A chunk of four words (32 int4 / 16 int8 values, in one quantization group) gives three
  int32 sums a1, a2, a3, combined in float32 as a1 2^16 + a2 2^8 + a3, times the group's
  scale; the offset term is the group's offset times the sum of x over the chunk (float32,
  from the digits kernel). The result is s / 2^16 times the scaled sums plus the offset
  terms: the dequantized weight times x in float32, as the float GEMV computes it, up to
  summation order and x's fixed-point rounding.

sm_90 SASS of the K loop (Triton 3.6, whole steps): 3.08 instructions a weight for int4
and 3.53 for int8, 0.75 of them dp4a (the float GEMV: 5.9 and 5.4), plus one small launch
a call for the digits. Timed on an H200 (sixteenth session) it is about 2x slower than
the float GEMV at every 8B shape (int4 gate_up 74 vs 36.6 us, qkv 19.8 vs 10.8; int8
62.6 vs 37.4): fewer instructions did not make it faster, so it stays opt-in
(IntGemmConfig.digits, KILN_INT_GEMV1's tenth field). Under TRITON_INTERPRET dp4a is
computed with shifts and multiplies (kiln.kernels.int8_gemv._dot4: the same integers)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.int8_gemv import _dot4
from kiln.kernels.split_k import split_k_buffers, split_k_fixup

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# X = x / s * 2^16; three balanced 8-bit digits hold |X| <= 127 (2^16 + 2^8 + 1)
X_MAX = 127 * 65536 + 127 * 256 + 127
WORDS, PAIRS = 1, 2  # digit layouts for int4: per 8-value word, per row (_digits_kernel)
_X_MAX = tl.constexpr(X_MAX)
_WORDS = tl.constexpr(WORDS)
_PAIRS = tl.constexpr(PAIRS)


@triton.jit
def _digits_kernel(x_ptr, d_ptr, sx_ptr, xs_ptr, K, stride_xm, PLANE,
                   BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, LAYOUT: tl.constexpr):
    """Row m of x -> its digit planes d[0..2, m, K] (int8; LAYOUT 0: in k order, WORDS:
    each 8 values even k first, then odd k; PAIRS: the row's even k, then its odd k),
    sx[m] = s / 2^16, and xs[m, c] = the sum of x over chunk c (CHUNK values), float32."""
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.where(amax > 0, amax / 127.0, 1.0)
    v = x / s * 65536.0
    X = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)
    X = tl.minimum(tl.maximum(X, -_X_MAX), _X_MAX)
    d3 = ((X + 128) & 255) - 128
    X = (X - d3) >> 8
    d2 = ((X + 128) & 255) - 128
    d1 = (X - d2) >> 8
    if LAYOUT == _WORDS:  # within each 8 values: k = 0, 2, 4, 6, then 1, 3, 5, 7
        r = offs % 8
        dest = offs - r + r // 2 + 4 * (r % 2)
    elif LAYOUT == _PAIRS:
        dest = offs // 2 + (K // 2) * (offs % 2)
    else:
        dest = offs
    row = d_ptr + m * K + dest
    tl.store(row, d1.to(tl.int8), mask=mask)
    tl.store(row + PLANE, d2.to(tl.int8), mask=mask)
    tl.store(row + 2 * PLANE, d3.to(tl.int8), mask=mask)
    tl.store(sx_ptr + m, s / 65536.0)
    sums = tl.sum(tl.reshape(x, (BLOCK_K // CHUNK, CHUNK)), axis=1)
    offs_c = tl.arange(0, BLOCK_K // CHUNK)
    tl.store(xs_ptr + m * (K // CHUNK) + offs_c, sums, mask=offs_c < K // CHUNK)


@triton.jit
def _combine(a1, a2, a3):
    """The three digit planes' int32 sums as one float32, a1 2^16 + a2 2^8 + a3, in two
    conversions: a2 2^8 + a3 fits in int32 (each |a| <= 2^31 / 257), a1 2^16 may not."""
    return a1.to(tl.float32) * 65536.0 + (a2 * 256 + a3).to(tl.float32)


@triton.jit
def _split4(t):
    """[..., 4] -> its four [...] slices (in registers where one thread holds the 4)."""
    e, o = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], 2, 2)))
    t0, t2 = tl.split(e)
    t1, t3 = tl.split(o)
    return t0, t1, t2, t3


@triton.jit
def _ld(ptrs, mask, EVEN: tl.constexpr):
    """EVEN: every row and chunk of the launch is whole, so no masks (vector loads)."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _plane_sum(d_ptr, offs_c, mask_c, w0, w1, w2, w3, h0, h1, h2, h3, BITS: tl.constexpr,
               EVEN: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 [BLOCK_N, C]: a digit plane (d_ptr: its words) times each chunk's 4 words."""
    if BITS == 4:  # 8 words a chunk: even-k and odd-k bytes of each weight word
        xv = _ld(d_ptr + offs_c[:, None] * 8 + tl.arange(0, 8)[None, :], mask_c[:, None],
                 EVEN)  # [C, 8]
        e, o = tl.split(tl.reshape(xv, (xv.shape[0], 4, 2)))
        e0, e1, e2, e3 = _split4(tl.reshape(e, (1, xv.shape[0], 4)))
        o0, o1, o2, o3 = _split4(tl.reshape(o, (1, xv.shape[0], 4)))
        a = _dot4(e0, w0, tl.zeros(w0.shape, dtype=tl.int32), INTERPRET)
        a = _dot4(o0, h0, a, INTERPRET)
        a = _dot4(e1, w1, a, INTERPRET)
        a = _dot4(o1, h1, a, INTERPRET)
        a = _dot4(e2, w2, a, INTERPRET)
        a = _dot4(o2, h2, a, INTERPRET)
        a = _dot4(e3, w3, a, INTERPRET)
        return _dot4(o3, h3, a, INTERPRET)
    xv = _ld(d_ptr + offs_c[:, None] * 4 + tl.arange(0, 4)[None, :], mask_c[:, None],
             EVEN)  # [C, 4]
    x0, x1, x2, x3 = _split4(tl.reshape(xv, (1, xv.shape[0], 4)))
    a = _dot4(x0, w0, tl.zeros(w0.shape, dtype=tl.int32), INTERPRET)
    a = _dot4(x1, w1, a, INTERPRET)
    a = _dot4(x2, w2, a, INTERPRET)
    return _dot4(x3, w3, a, INTERPRET)


@triton.jit
def _digits_gemv_kernel(d_ptr, sx_ptr, xs_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
                        part_ptr, count_ptr, N, K, G, C_PER_SPLIT, PLANE_W, stride_wn,
                        stride_sn, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                        INTERPRET: tl.constexpr, EVEN: tl.constexpr = False,
                        LOOP_STAGES: tl.constexpr = 1):
    """out[n block] = x . dequant(w[n block]) for one row from x's digit planes (d_ptr as
    int32 words, PLANE_W words a plane); program_id(1) takes C_PER_SPLIT chunks of K
    (whole steps of BLOCK_C chunks), the splits summed by split_k_fixup. LOOP_STAGES > 1:
    the loop's loads copied asynchronously that many steps ahead, less one (as
    kiln.kernels.int_gemv1._gemv1_kernel's)."""
    pid_n = tl.program_id(0)
    PER: tl.constexpr = 32 // BITS  # values a word
    CV: tl.constexpr = 4 * PER  # values a chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None, None]
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    c_start = tl.program_id(1) * C_PER_SPLIT
    c_end = tl.minimum(c_start + C_PER_SPLIT, K // CV)
    for c0 in tl.range(c_start, c_end, BLOCK_C, num_stages=LOOP_STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        words = _ld(w_ptr + rows * stride_wn + offs_c[None, :, None] * 4 +
                    tl.arange(0, 4)[None, None, :],
                    mask_n[:, None, None] & mask_c[None, :, None], EVEN)
        w0, w1, w2, w3 = _split4(words)
        h0, h1, h2, h3 = w0, w1, w2, w3
        if BITS == 4:
            h0, h1 = (w0 >> 4) & 0x0F0F0F0F, (w1 >> 4) & 0x0F0F0F0F
            h2, h3 = (w2 >> 4) & 0x0F0F0F0F, (w3 >> 4) & 0x0F0F0F0F
            w0, w1 = w0 & 0x0F0F0F0F, w1 & 0x0F0F0F0F
            w2, w3 = w2 & 0x0F0F0F0F, w3 & 0x0F0F0F0F
        a1 = _plane_sum(d_ptr, offs_c, mask_c, w0, w1, w2, w3, h0, h1, h2, h3, BITS, EVEN,
                        INTERPRET)
        a2 = _plane_sum(d_ptr + PLANE_W, offs_c, mask_c, w0, w1, w2, w3, h0, h1, h2, h3,
                        BITS, EVEN, INTERPRET)
        a3 = _plane_sum(d_ptr + 2 * PLANE_W, offs_c, mask_c, w0, w1, w2, w3, h0, h1, h2,
                        h3, BITS, EVEN, INTERPRET)
        f = _combine(a1, a2, a3)
        group = (offs_c * CV) // G
        s_offs = offs_n.to(tl.int64)[:, None] * stride_sn + group[None, :]
        mask = mask_n[:, None] & mask_c[None, :]
        acc += f * _ld(s_ptr + s_offs, mask, EVEN) * tl.load(sx_ptr)
        if HAS_OFFSET:
            acc += _ld(o_ptr + s_offs, mask, EVEN) * _ld(xs_ptr + offs_c, mask_c, EVEN)[None, :]
    y = tl.sum(acc, axis=1)
    last = True
    if SPLIT_K > 1:
        y, last = split_k_fixup(y, part_ptr, count_ptr, pid_n, offs_n, mask_n, N, offs_n,
                                SPLIT_K, INTERPRET)
    if last:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def x_digits(x: torch.Tensor, layout: int, chunk: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (digit planes int8 [3, M, K] in `layout`, s / 2^16 float32 [M], sums
    of x over chunks of `chunk` values float32 [M, K / chunk]); one launch."""
    M, K = x.shape
    digits = torch.empty(3, M, K, dtype=torch.int8, device=x.device)
    sx = torch.empty(M, dtype=torch.float32, device=x.device)
    xs = torch.empty(M, K // chunk, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _digits_kernel[(M,)](x, digits, sx, xs, K, x.stride(0), M * K, BLOCK_K=block,
                         CHUNK=chunk, LAYOUT=layout, num_warps=4 if block <= 2048 else 8)
    return digits, sx, xs


def digits_eligible(K: int, G: int, bits: int) -> bool:
    """Whole 4-word chunks (128 bits of weight) inside quantization groups (the caller
    checks one row, and rows of whole 32-bit words)."""
    chunk = 128 // bits
    return G % chunk == 0 and K % chunk == 0


def digits_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor | None, bias: torch.Tensor | None, block_n: int = 64,
                block_c: int = 4, split_k: int = 8, num_warps: int = 4,
                num_stages: int = 3, loop_stages: int = 1) -> torch.Tensor:
    """x [1, K] (16/32-bit) @ dequant(weight)^T -> [1, N] in x's dtype (see the module
    doc; digits_eligible must hold). block_c: 4-word chunks a K step; split_k: programs
    along K, each whole steps; loop_stages > 1: the K loop software-pipelined."""
    K = x.shape[1]
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    G = K // scale.shape[1]
    cv = 128 // bits  # values a chunk (4 words)
    chunks = K // cv
    digits, sx, xs = x_digits(x, WORDS if bits == 4 else 0, cv)
    per_split = triton.cdiv(triton.cdiv(chunks, split_k), block_c) * block_c
    splits = triton.cdiv(chunks, per_split)
    blocks = triton.cdiv(N, block_n)
    out, part, counters, _ = split_k_buffers(1, N, splits, blocks, True, x.dtype, x.device)
    _digits_gemv_kernel[(blocks, splits)](
        digits.view(torch.int32), sx, xs, weight.view(torch.int32), scale,
        offset if offset is not None else scale, bias if bias is not None else scale, out,
        part, counters, N, K, G, per_split, K // 4, weight.stride(0) // 4, scale.stride(0),
        BITS=bits, BLOCK_N=block_n, BLOCK_C=block_c, HAS_OFFSET=offset is not None,
        HAS_BIAS=bias is not None, SPLIT_K=splits, INTERPRET=_INTERPRET,
        EVEN=N % block_n == 0 and chunks == splits * per_split, LOOP_STAGES=loop_stages,
        num_warps=num_warps, num_stages=num_stages)
    return out
