"""int8 x int8 -> int32 products for a few rows (W8A8 decode): what torch._int_mm computes
for the SmoothQuant linears (kiln.functional.int8_linear), without padding the rows to
17 and on the CUDA cores: the weight and the quantized x are read as 32-bit words of four
int8 values, and one `dp4a` instruction multiplies and sums a word pair into an int32
accumulator. The sums are exact integers, so the result is _int_mm's to the bit and the
same epilogue (kiln.kernels.int8_act.scale_int8_product) follows. kiln's default for one
row since the fifteenth session (67.7 vs 88.0 us a layer on an H200; KILN_INT8_GEMV=0/1
forces _int_mm / this up to 16 rows), its K loop software-pipelined since the seventeenth
(63.6 us). Under TRITON_INTERPRET the word products are computed with shifts and
multiplies (the same integers)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ROWS = 16  # the rows torch._int_mm would pad to 17


@triton.jit
def _dot4(a, b, acc, INTERPRET: tl.constexpr):
    """acc + the sum of the four products of the signed bytes of int32 words a and b."""
    if INTERPRET:
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc
    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                                     [a, b, acc], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, W, W_PER_SPLIT, stride_xm, stride_wn,
                      stride_om, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_W: tl.constexpr, ATOMIC: tl.constexpr, INTERPRET: tl.constexpr,
                      LOOP_STAGES: tl.constexpr = 1):
    """out[:M, n block] (+)= sum over this split's words j of dot4(x[:M, j], w[n, j]); x_ptr
    and w_ptr the int8 data viewed as int32 words (W words a row, strides in words).
    ATOMIC: out is zeroed and the splits add into it (int32 atomics: exact). LOOP_STAGES >
    1: the loop's loads copied asynchronously that many steps ahead, less one."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn  # [1, BLOCK_N, 1]
    x_rows = x_ptr + offs_r.to(tl.int64)[:, None, None] * stride_xm  # [ROWS, 1, 1]
    mask_n = (offs_n < N)[None, :, None]
    mask_r = (offs_r < M)[:, None, None]
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_W], dtype=tl.int32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, W)
    for w0 in tl.range(w_start, w_end, BLOCK_W, num_stages=LOOP_STAGES):
        offs_w = (w0 + tl.arange(0, BLOCK_W))[None, None, :]
        in_k = offs_w < w_end
        words = tl.load(w_rows + offs_w, mask=mask_n & in_k, other=0)
        xw = tl.load(x_rows + offs_w, mask=mask_r & in_k, other=0)
        acc = _dot4(xw, words, acc, INTERPRET)
    y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    offs_m = offs_r[:, None]
    mask = (offs_m < M) & (offs_n[None, :] < N)
    out = out_ptr + offs_m.to(tl.int64) * stride_om + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, y, mask=mask, sem="relaxed")
    else:
        tl.store(out, y, mask=mask)


def int8_gemv(x_q: torch.Tensor, weight: torch.Tensor, block_n: int = 64, block_w: int = 32,
              split_k: int = 0, num_warps: int = 4, loop_stages: int = 0) -> torch.Tensor:
    """x_q int8 [M, K] (M <= MAX_ROWS) @ weight int8 [N, K]^T -> int32 [M, N], exactly
    torch._int_mm's sums. K a multiple of 4 (whole words), rows 4-byte aligned. split_k 0:
    16 K splits of at least 2 steps each (H200, 8B shapes, one row, 64 x 32 words: 67.7 us
    a layer against 74-84 for fewer, deeper splits and 88.0 for _int_mm). loop_stages > 1:
    the K loop software-pipelined (0: 3, or 1 with KILN_INT_PIPELINE=0; H200, 8B shapes,
    one row: 63.6 vs 66.6 us a layer, seventeenth session)."""
    if loop_stages <= 0:
        loop_stages = 1 if os.environ.get("KILN_INT_PIPELINE") == "0" else 3
    M, K = x_q.shape
    N = weight.shape[0]
    assert M <= MAX_ROWS and K % 4 == 0 and x_q.stride(1) == 1 and weight.stride(1) == 1
    W = K // 4
    if split_k <= 0:
        split_k = max(1, min(16, W // (2 * block_w)))
    per_split = triton.cdiv(triton.cdiv(W, split_k), block_w) * block_w
    splits = triton.cdiv(W, per_split)
    atomic = splits > 1
    out = (torch.zeros if atomic else torch.empty)(M, N, dtype=torch.int32, device=x_q.device)
    _int8_gemv_kernel[(triton.cdiv(N, block_n), splits)](
        x_q.view(torch.int32), weight.view(torch.int32), out, M, N, W, per_split,
        x_q.stride(0) // 4, weight.stride(0) // 4, out.stride(0),
        ROWS=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_W=block_w,
        ATOMIC=atomic, INTERPRET=_INTERPRET, LOOP_STAGES=loop_stages, num_warps=num_warps)
    return out
