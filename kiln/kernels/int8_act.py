"""INT8 W8A8 (SmoothQuant engines) around torch._int_mm: the per-token quantization of
the activations and the scaling epilogue, one kernel each, bit for bit what
kiln.kernels.reference_quant computes on the same device.

The reference is a chain of torch ops: |x|, amax, clamp, / 127, x / scale, round, clamp,
to int8 before the product, then int32 -> float32, * x_scale, * w_scale, + bias, to the
output dtype after it: about a dozen passes over [M, K] and [M, N]. At a decode batch of
512 rows (Llama-3.1-8B) those passes move ~1 GB a layer; these kernels read x once and the
int32 product once.

Numerics: scale = max(amax, 1e-6) / 127 rounded as the reference rounds it (CPU torch
divides by the Python number, CUDA torch multiplies by the float32 reciprocal:
fp8_quant._divide_as_torch), q = round-half-even(x / scale) with the correctly rounded
quotient (div_rn), clamped to +-127. The epilogue multiplies in the reference's order,
without fused multiply-adds (enable_fp_fusion=False), so the bias add rounds apart.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.fp8_quant import _divide_as_torch
from kiln.kernels.reference_quant import INT8_MAX, MIN_AMAX

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# float32(1 / 127): what CUDA torch multiplies by for `tensor / 127.0`
_INV_127: tl.constexpr = tl.constexpr((torch.ones((), dtype=torch.float32) / INT8_MAX).item())
_MIN_AMAX: tl.constexpr = tl.constexpr(MIN_AMAX)
_ROUND: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + it - it rounds v to even


@triton.jit
def _quant_int8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                       BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """One row per program: amax, scale, then q; ONE_TILE (K <= BLOCK_K): the row is read
    once and kept in registers."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        running = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0)
            running = tl.maximum(running, tl.abs(x.to(tl.float32)))
        amax = tl.max(running, axis=0)
    scale = _int8_scale(amax, INTERPRET)
    tl.store(scale_ptr + row, scale)
    if ONE_TILE:
        tl.store(q_row + offs, _round_int8(tl.div_rn(x, scale)), mask=offs < K)
    else:
        for k in range(0, K, BLOCK_K):
            mask = k + offs < K
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k + offs, _round_int8(tl.div_rn(x, scale)), mask=mask)


@triton.jit
def _int8_scale(amax, INTERPRET: tl.constexpr):
    """A row's scale, max(amax, 1e-6) / 127, rounded as the reference rounds it (also the
    fused RMSNorm / SiLU-mul kernels' with an Int8Quant)."""
    return _divide_as_torch(tl.maximum(amax, _MIN_AMAX), 127.0, _INV_127, INTERPRET)


@triton.jit
def _round_int8(v):
    """round-half-even(v) clamped to +-127, as int8 (|v| <= 127 + a rounding error)."""
    v = (v + _ROUND) - _ROUND
    return tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int8)


@triton.jit
def _scale_int8_kernel(acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
                       stride_acc, stride_out, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = ((float(acc) * x_scale[m]) * w_scale[n] (+ float(bias[n]))) in out's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + rows * stride_acc + offs_n[None, :], mask=mask, other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    y = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows * stride_out + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


def quantize_int8_per_token(x: torch.Tensor, rows: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride along K) -> (q int8 [rows or M, K], scale float32 [M, 1]);
    rows > M leaves the rows past M unwritten (padding torch._int_mm wants, never read)."""
    M, K = x.shape
    q = torch.empty(max(M, rows or M), K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        block = min(triton.next_power_of_2(K), 4096)
        _quant_int8_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK_K=block,
                                 ONE_TILE=K <= block, INTERPRET=_INTERPRET,
                                 num_warps=4 if block <= 1024 else 8)
    return q, scale


def scale_int8_product(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """acc [>= M, N] int32 (its first M = x_scale's rows) -> [M, N] in dtype."""
    M, N = x_scale.shape[0], acc.shape[1]
    out = torch.empty(M, N, dtype=dtype, device=acc.device)
    if M and N:
        grid = (triton.cdiv(M, 16), triton.cdiv(N, 256))
        _scale_int8_kernel[grid](acc, x_scale, w_scale, w_scale if bias is None else bias,
                                 out, M, N, acc.stride(0), out.stride(0),
                                 HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=256,
                                 num_warps=4, enable_fp_fusion=False)
    return out
