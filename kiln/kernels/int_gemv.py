"""The integer GEMV of decode, 1-4 rows of x: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]).

Storage as kiln.kernels.reference documents it (4-bit: pack_int4's blocks of 32 inputs;
int8 [N, K]), read as 32-bit words, four words (16 bytes) of a row a block:
* 4-bit: nibble i of word j of a block holds k = 32 b + 4 i + j;
* 8-bit: byte i of word j holds k = 16 b + 4 j + i.
So for each position i in a word, a block's four words hold inputs whose activations a
program loads once and every row of its tile shares.

Per weight and row of x the K loop is one LOP3 and one FFMA (plus a shift per word, and
per word and step one FFMA for the scale): a value at bits s .. s + BITS - 1 is masked in
place when s <= 16 (int4 nibbles 0-4, int8 bytes 0-1; higher bits would reach the
exponent), the others after one shift of the word by 16, and the 32-bit pattern read as a
float is the denormal u * 2^(s - 149), exactly. Its product with x * 2^(85 - s) (the
activation scaled once per thread, shared by the weight rows it holds) is u * x * 2^-64,
a normal float rounded once, as u * x would be; the sums are scaled back at the end.
(FFMA takes denormal operands at full speed; Triton's PTX does not flush them to zero.
Activations must stay below 2^43 in magnitude.) Scale and offset are applied per group,
not per weight: w = s * u + o, so y = sum_g s_g sum_k u x + sum_g o_g sum_k x, the first
per block and step (one FFMA a word and row), the second once per program from the group
sums of x. int8 values q are read as u = q + 128 (the bits xor 0x80) with offset -128 s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 4  # 32-bit words of a row a block: one 16-byte load


@triton.jit
def _scaled_x(ptr, kx, mask, i: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr,
              MASKED: tl.constexpr):
    """x at kx in float32, times 2^(85 - s) for the value at bit s of its word."""
    if MASKED:
        x = tl.load(ptr + kx, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptr + kx).to(tl.float32)
    if i < HALF + (BITS == 4):
        return x * (2.0 ** (85 - BITS * i))
    return x * (2.0 ** (85 - BITS * (i - HALF)))


@triton.jit
def _finish_row(acc, x_row, out_row, r: tl.constexpr, M, s_ptr, o_ptr, bias_ptr, offs_n, N,
                b_start, b_end, stride_sn, pid_k, G: tl.constexpr, KB: tl.constexpr,
                BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr, OFFSET_BLOCKS: tl.constexpr):
    """Row r of out (nothing when r >= M): the products' sums scaled back, + sum_k
    o[n, k // G] x[k] over the split (from block sums of x), + the bias (first split)."""
    y = tl.sum(tl.sum(acc, axis=2), axis=1) * 18446744073709551616.0  # 2^64
    row_ok = offs_n * 0 + r < M
    if HAS_OFFSET or BITS == 8:
        ob = tl.arange(0, OFFSET_BLOCKS)
        kb = tl.arange(0, KB)
        mask_o = offs_n[:, None] < N
        for c0 in range(b_start, b_end, OFFSET_BLOCKS):
            cb = c0 + ob
            in_split = cb < b_end
            xs = tl.load(x_row + cb[:, None] * KB + kb[None, :],
                         mask=(in_split & (cb * 0 + r < M))[:, None], other=0.0).to(tl.float32)
            xsum = tl.sum(xs, axis=1)  # [OFFSET_BLOCKS]
            s_offs = offs_n.to(tl.int64)[:, None] * stride_sn + (cb * KB // G)[None, :]
            mask = mask_o & in_split[None, :]
            if HAS_OFFSET:
                o = tl.load(o_ptr + s_offs, mask=mask, other=0.0)
                if BITS == 8:
                    o -= 128.0 * tl.load(s_ptr + s_offs, mask=mask, other=0.0)
            else:
                o = -128.0 * tl.load(s_ptr + s_offs, mask=mask, other=0.0)
            y += tl.sum(o * xsum[None, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, 1.0, 0.0) * bias
    mask = (offs_n < N) & row_ok
    if ATOMIC:
        tl.atomic_add(out_row + offs_n, y, mask=mask, sem="relaxed")
    else:
        tl.store(out_row + offs_n, y.to(out_row.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _int_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, B_PER_SPLIT,
                     stride_xm, stride_wn, stride_sn, stride_om, G: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                     HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ATOMIC: tl.constexpr, ROWS: tl.constexpr = 1,
                     EVEN_K: tl.constexpr = False, EVEN_N: tl.constexpr = False,
                     OFFSET_BLOCKS: tl.constexpr = 32):
    """out[:M, n block] (+)= x[:M, k split] @ w[n block, k split]^T, M <= ROWS (1, 2, 4);
    see the module doc. Each weight is unpacked once for all rows of x.

    w_ptr: the storage as int32 (stride_wn words); a split is B_PER_SPLIT blocks of KB =
    4 * 32 / BITS inputs, a K step BLOCK_K // KB blocks. G: a multiple of KB. ATOMIC: out
    is a float32 buffer the splits add into (the first split adds the bias)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS  # values a word
    HALF: tl.constexpr = PER // 2  # values a half-word
    KB: tl.constexpr = 4 * PER  # inputs a block
    NB: tl.constexpr = BLOCK_K // KB  # blocks a step
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)[:, None, None]
    mask_n = (offs_n < N)[:, None, None]
    blk = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    x1 = x_ptr + stride_xm
    x2 = x_ptr + 2 * stride_xm
    x3 = x_ptr + 3 * stride_xm
    acc0 = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    if ROWS > 1:
        acc1 = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    if ROWS > 2:
        acc2 = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    b_start = pid_k * B_PER_SPLIT
    b_end = tl.minimum(b_start + B_PER_SPLIT, K // KB)
    for b0 in range(b_start, b_end, NB):
        b = b0 + blk  # [1, NB, 1]
        w_offs = rows * stride_wn + 4 * b + j
        s_offs = rows * stride_sn + (b * KB) // G
        if EVEN_K and EVEN_N:  # whole steps and row blocks: no masks, 16-byte vectors
            words = tl.load(w_ptr + w_offs)
            scale = tl.load(s_ptr + s_offs)
        else:
            mask_b = mask_n & (b < b_end)
            words = tl.load(w_ptr + w_offs, mask=mask_b, other=0)
            scale = tl.load(s_ptr + s_offs, mask=mask_b, other=0.0)
        if BITS == 8:
            words = words ^ -2139062144  # 0x80808080: u = q + 128 in every byte
        high = words >> 16  # the high half-word's values at bits 0, BITS, ...
        in_k = b < b_end
        for i in tl.static_range(PER):
            # int4: nibbles 0-4 in place (bits 0-19), 5-7 from `high`; int8: bytes 0-1
            # in place, 2-3 from `high` (bits 20 and up would reach the exponent)
            if i < HALF + (BITS == 4):
                f = words & (MASK << (BITS * i))
            else:
                f = high & (MASK << (BITS * (i - HALF)))
            f = f.to(tl.float32, bitcast=True)  # u * 2^(s - 149), s its lowest bit
            if BITS == 4:
                kx = b * KB + 4 * i + j
            else:
                kx = b * KB + 4 * j + i
            xi = _scaled_x(x_ptr, kx, in_k, i, BITS, HALF, not EVEN_K)
            if i == 0:
                t0 = f * xi
            else:
                t0 += f * xi
            if ROWS > 1:
                xi = _scaled_x(x1, kx, in_k & (j * 0 + 1 < M), i, BITS, HALF, True)
                if i == 0:
                    t1 = f * xi
                else:
                    t1 += f * xi
            if ROWS > 2:
                xi = _scaled_x(x2, kx, in_k & (j * 0 + 2 < M), i, BITS, HALF, True)
                if i == 0:
                    t2 = f * xi
                else:
                    t2 += f * xi
                xi = _scaled_x(x3, kx, in_k & (j * 0 + 3 < M), i, BITS, HALF, True)
                if i == 0:
                    t3 = f * xi
                else:
                    t3 += f * xi
        acc0 += scale * t0
        if ROWS > 1:
            acc1 += scale * t1
        if ROWS > 2:
            acc2 += scale * t2
            acc3 += scale * t3
    _finish_row(acc0, x_ptr, out_ptr, 0, M, s_ptr, o_ptr, bias_ptr, offs_n, N,
                b_start, b_end, stride_sn, pid_k, G, KB, BITS, HAS_OFFSET, HAS_BIAS,
                ATOMIC, OFFSET_BLOCKS)
    if ROWS > 1:
        _finish_row(acc1, x1, out_ptr + stride_om, 1, M, s_ptr, o_ptr, bias_ptr, offs_n, N,
                    b_start, b_end, stride_sn, pid_k, G, KB, BITS, HAS_OFFSET, HAS_BIAS,
                    ATOMIC, OFFSET_BLOCKS)
    if ROWS > 2:
        _finish_row(acc2, x2, out_ptr + 2 * stride_om, 2, M, s_ptr, o_ptr, bias_ptr, offs_n, N,
                    b_start, b_end, stride_sn, pid_k, G, KB, BITS, HAS_OFFSET, HAS_BIAS,
                    ATOMIC, OFFSET_BLOCKS)
        _finish_row(acc3, x3, out_ptr + 3 * stride_om, 3, M, s_ptr, o_ptr, bias_ptr, offs_n, N,
                    b_start, b_end, stride_sn, pid_k, G, KB, BITS, HAS_OFFSET, HAS_BIAS,
                    ATOMIC, OFFSET_BLOCKS)

def block_inputs(bits: int) -> int:
    """Inputs of a block (four 32-bit words of a row): 32 for 4-bit, 16 for 8-bit."""
    return BLOCK_WORDS * 32 // bits


def launch_gemv(x, weight, scale, offset, bias, out, N: int, K: int, G: int, bits: int,
                block_n: int, block_k: int, k_per_split: int, num_warps: int,
                num_stages: int) -> None:
    """One launch of _int_gemv_kernel for x's 1-4 rows over splits of k_per_split inputs
    (a multiple of block_k); out [M, N] is float32 (atomics) when there are several
    splits."""
    M = x.shape[0]
    splits = triton.cdiv(K, k_per_split)
    _int_gemv_kernel[(triton.cdiv(N, block_n), splits)](
        x, weight.view(torch.int32), scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, M, N, K, k_per_split // block_inputs(bits),
        x.stride(0), weight.stride(0) * weight.element_size() // 4, scale.stride(0),
        out.stride(0), G=G, BLOCK_N=block_n, BLOCK_K=block_k, BITS=bits,
        HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, ATOMIC=splits > 1,
        ROWS=triton.next_power_of_2(M), EVEN_K=K % k_per_split == 0, EVEN_N=N % block_n == 0,
        num_warps=num_warps, num_stages=num_stages)
