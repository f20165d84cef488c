"""int8 x int8 -> int32 products for a few rows (W8A8 decode): what torch._int_mm computes
for the SmoothQuant linears (kiln.functional.int8_linear), without padding the rows to
17 and on the CUDA cores: the weight and the quantized x are read as 32-bit words of four
int8 values, and one `dp4a` instruction multiplies and sums a word pair into an int32
accumulator. The sums are exact integers, so the result is _int_mm's to the bit and the
same epilogue (kiln.kernels.int8_act.scale_int8_product) follows. kiln's default for one
row since the fifteenth session (67.7 vs 88.0 us a layer on an H200; KILN_INT8_GEMV=0/1
forces _int_mm / this up to 16 rows), its K loop software-pipelined since the seventeenth
(63.6 us). int8_gemv_scaled applies that epilogue in the kernel (the last K split of a
column block sums the int32 partials and scales them; opt-in, KILN_INT8_GEMV_EPILOGUE=1,
until timed on a GPU). Under TRITON_INTERPRET the word products are computed with shifts
and multiplies (the same integers)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.split_k import split_k_counters, split_k_fixup

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
                      stride_om, x_scale_ptr, w_scale_ptr, bias_ptr, part_ptr, count_ptr,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      ATOMIC: tl.constexpr, INTERPRET: tl.constexpr,
                      LOOP_STAGES: tl.constexpr = 1, EPILOGUE: tl.constexpr = False,
                      HAS_BIAS: tl.constexpr = False, SPLIT_K: tl.constexpr = 1):
    """out[:M, n block] (+)= sum over this split's words j of dot4(x[:M, j], w[n, j]); x_ptr
    and w_ptr the int8 data viewed as int32 words (W words a row, strides in words).
    ATOMIC: out is zeroed and the splits add into it (int32 atomics: exact). LOOP_STAGES >
    1: the loop's loads copied asynchronously that many steps ahead, less one. EPILOGUE:
    out is the scaled product instead (int8_act's epilogue: (float(sum) * x_scale[m]) *
    w_scale[n] (+ bias[n]) in out's dtype), the SPLIT_K splits' int32 partials summed by
    the last of each column block (split_k_fixup: exact, no zero-fill)."""
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
    if EPILOGUE:
        last = True
        if SPLIT_K > 1:
            y, last = split_k_fixup(y, part_ptr, count_ptr, pid_n,
                                    offs_m.to(tl.int64) * N + offs_n[None, :], mask, M * N,
                                    offs_n, SPLIT_K, INTERPRET)
        if last:
            x_scale = tl.load(x_scale_ptr + offs_r, mask=offs_r < M, other=0.0)
            w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
            z = (y.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
            if HAS_BIAS:
                z = z + tl.load(bias_ptr + offs_n, mask=offs_n < N,
                                other=0.0).to(tl.float32)[None, :]
            tl.store(out, z.to(out_ptr.dtype.element_ty), mask=mask)
    elif ATOMIC:
        tl.atomic_add(out, y, mask=mask, sem="relaxed")
    else:
        tl.store(out, y, mask=mask)


def _launch(x_q: torch.Tensor, weight: torch.Tensor, block_w: int, split_k: int
            ) -> tuple[int, int, int, int]:
    """(M, N, words a split, splits) of a launch: split_k 0 picks 16 K splits of at least
    2 steps each."""
    M, K = x_q.shape
    assert M <= MAX_ROWS and K % 4 == 0 and x_q.stride(1) == 1 and weight.stride(1) == 1
    W = K // 4
    if split_k <= 0:
        split_k = max(1, min(16, W // (2 * block_w)))
    per_split = triton.cdiv(triton.cdiv(W, split_k), block_w) * block_w
    return M, weight.shape[0], per_split, triton.cdiv(W, per_split)


def _stages(loop_stages: int) -> int:
    """The K loop's pipelining: loop_stages, or for 0: 3 (1 with KILN_INT_PIPELINE=0)."""
    if loop_stages <= 0:
        return 1 if os.environ.get("KILN_INT_PIPELINE") == "0" else 3
    return loop_stages


def int8_gemv(x_q: torch.Tensor, weight: torch.Tensor, block_n: int = 64, block_w: int = 32,
              split_k: int = 0, num_warps: int = 4, loop_stages: int = 0) -> torch.Tensor:
    """x_q int8 [M, K] (M <= MAX_ROWS) @ weight int8 [N, K]^T -> int32 [M, N], exactly
    torch._int_mm's sums. K a multiple of 4 (whole words), rows 4-byte aligned. split_k 0:
    16 K splits of at least 2 steps each (H200, 8B shapes, one row, 64 x 32 words: 67.7 us
    a layer against 74-84 for fewer, deeper splits and 88.0 for _int_mm). loop_stages > 1:
    the K loop software-pipelined (0: 3, or 1 with KILN_INT_PIPELINE=0; H200, 8B shapes,
    one row: 63.6 vs 66.6 us a layer, seventeenth session)."""
    M, N, per_split, splits = _launch(x_q, weight, block_w, split_k)
    atomic = splits > 1
    out = (torch.zeros if atomic else torch.empty)(M, N, dtype=torch.int32, device=x_q.device)
    _int8_gemv_kernel[(triton.cdiv(N, block_n), splits)](
        x_q.view(torch.int32), weight.view(torch.int32), out, M, N, x_q.shape[1] // 4,
        per_split, x_q.stride(0) // 4, weight.stride(0) // 4, out.stride(0), out, out, out,
        out, out, ROWS=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_W=block_w,
        ATOMIC=atomic, INTERPRET=_INTERPRET, LOOP_STAGES=_stages(loop_stages),
        num_warps=num_warps)
    return out


def int8_gemv_scaled(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                     weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                     block_n: int = 64, block_w: int = 32, split_k: int = 0,
                     num_warps: int = 4, loop_stages: int = 0) -> torch.Tensor:
    """int8_act.scale_int8_product(int8_gemv(x_q, weight), x_scale, weight_scale, bias,
    dtype) to the bit in one launch: no zero-filled int32 product, no epilogue launch
    (three launches a linear become one; KILN_INT8_GEMV_EPILOGUE=1 in int8_linear)."""
    M, N, per_split, splits = _launch(x_q, weight, block_w, split_k)
    out = torch.empty(M, N, dtype=dtype, device=x_q.device)
    part = count = out  # not read with one split
    if splits > 1:
        part = torch.empty(splits, M * N, dtype=torch.int32, device=x_q.device)
        count = split_k_counters(x_q.device, triton.cdiv(N, block_n))
    _int8_gemv_kernel[(triton.cdiv(N, block_n), splits)](
        x_q.view(torch.int32), weight.view(torch.int32), out, M, N, x_q.shape[1] // 4,
        per_split, x_q.stride(0) // 4, weight.stride(0) // 4, out.stride(0), x_scale,
        weight_scale, weight_scale if bias is None else bias, part, count,
        ROWS=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_W=block_w,
        ATOMIC=False, INTERPRET=_INTERPRET, LOOP_STAGES=_stages(loop_stages), EPILOGUE=True,
        HAS_BIAS=bias is not None, SPLIT_K=splits, num_warps=num_warps,
        enable_fp_fusion=False)
    return out
