"""RMSNorm, optionally fused with the residual add before it: one read, one write per tensor.
Optionally also fused with the quantization of its output for the W8A8 GEMM after it: FP8
(per-token dynamic or static scale), written as e4m3 plus a scale per row, or INT8 per
token (SmoothQuant)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from kiln.kernels import pdl
from kiln.kernels.fp8_quant import (
    _INTERPRET,
    FP8Act,
    _dynamic_scale,
    _quantize_values,
    fused_quant_args,
    quantized_act,
)
from kiln.kernels.int8_act import _int8_scale, _round_int8
from kiln.kernels.pdl import pdl_start
from kiln.layers.swap_input import SwapPrologue, pending_norm

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["num_rows"])  # token count varies by step
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, n_cols, stride_x, stride_res, stride_out, stride_res_out, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr, scale_ptr=None, static_scale_ptr=None, QUANT: tl.constexpr = 0,
    Y_DTYPE: tl.constexpr = None, INTERPRET: tl.constexpr = False,
    DEPENDENTS: tl.constexpr = False,
):
    """s = x (+ r);  y = w * cast(s / sqrt(mean(s^2) + eps)), the mean taken in float32.

    With a residual the sum is rounded to the input dtype first (it is also written out
    as the next residual), so y matches torch's unfused `rms_norm(x + r)` bit for bit up
    to the order of the reduction.
    QUANT (1 dynamic, 2 static): y, rounded to Y_DTYPE (what the unfused norm would
    store), is quantized to e4m3 as kiln.kernels.fp8_quant's kernel
    quantizes a stored row, bit for bit; out_ptr is e4m3 and each row's scale goes to
    scale_ptr. QUANT 3: to int8 per row as int8_act's kernel does (out_ptr int8).
    (Compiled, at widths not a power of two the 1-byte output's register layout may sum
    the squares in another order than the 16-bit one's: H200, 300 x 14336, 18 of 4.3M
    int8 values and 4 e4m3 ones one step apart; none at 4096 or 8192.)
    DEPENDENTS (sm_90+): the GEMM behind it, launched with PDL, may start at once.
    """
    pdl_start(PDL)
    if DEPENDENTS and not PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + rows64[:, None] * stride_res_out + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    normed = (xf * inv_rms[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    if QUANT == 0:
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        y = y.to(Y_DTYPE).to(tl.float32)
        if QUANT == 3:  # int8 per token (SmoothQuant), int8_act's kernel's numbers
            scale = _int8_scale(tl.max(tl.abs(y), axis=1), INTERPRET)
            q = _round_int8(tl.div_rn(y, scale[:, None]))
        else:
            if QUANT == 2:
                scale = tl.zeros([BLOCK_R], tl.float32) + tl.load(static_scale_ptr)
                inv = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), scale)
            else:
                scale, inv = _dynamic_scale(tl.max(tl.abs(y), axis=1), INTERPRET)
            q = _quantize_values(y, scale[:, None], inv[:, None], INTERPRET)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], q, mask=mask)
        tl.store(scale_ptr + rows64, scale, mask=row_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, n] view with unit column stride (copies only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, quant: object = None, launch: dict | None = None
            ) -> tuple[torch.Tensor | FP8Act, torch.Tensor | None]:
    """launch: block_r / num_warps instead of the choice below (benchmarks)."""
    n = x.shape[-1]
    x2 = _rows(x)
    num_rows = x2.shape[0]
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    extra = {"DEPENDENTS": pdl.dependents(x)}  # a swapped GEMV behind it may start
    if quant is not None:  # an FP8Quant / Int8Quant: e4m3 / int8 rows and their scales
        assert x.dim() == 2, "the fused quantized output is [tokens, hidden]"
        scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
        out, act_type = quantized_act(quant, x.shape, scale)
        extra = dict(scale_ptr=scale, **fused_quant_args(quant, scale),
                     Y_DTYPE=_TL_DTYPES[y_dtype], INTERPRET=_INTERPRET,
                     DEPENDENTS=pdl.hopper(x))
    out2 = out.view(-1, n)
    if residual is not None:
        res2 = _rows(residual)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2 = res_out.view(-1, n)
    else:
        res2, res_out, res_out2 = x2, None, out2
    block_n = triton.next_power_of_2(n)
    # Small rows (per-head q/k norms) are batched several to a program.
    block_r = max(1, min(64, 2048 // block_n))
    num_warps = min(max(block_r * block_n // 512, 1), 16)
    if launch:
        block_r, num_warps = launch.get("block_r", block_r), launch.get("num_warps", num_warps)
    grid = (triton.cdiv(num_rows, block_r),)
    use_pdl = pdl.enabled(x)
    _rms_norm_kernel[grid](
        x2, res2, weight, out2, res_out2, num_rows, n,
        x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0), eps,
        BLOCK_R=block_r, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        PDL=use_pdl, num_warps=num_warps, **extra, **pdl.launch_args(use_pdl),
    )
    if quant is not None:
        return act_type(out, extra["scale_ptr"], y_dtype), res_out
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quant: object = None
             ) -> torch.Tensor | FP8Act:
    """y = w * x / sqrt(mean(x^2) + eps) over the last dim, any leading shape.
    quant (an FP8Quant / Int8Quant; x 2-D): y quantized to e4m3 / int8 in the same pass,
    as an FP8Act / Int8Act;
    SWAP_PROLOGUE: left to the swapped GEMV after it where that takes x (a PendingInput)."""
    if isinstance(quant, SwapPrologue):
        pending = pending_norm(x, None, weight, eps)
        if pending is not None:
            return pending
        quant = None
    return _launch(x, None, weight, eps, quant)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, quant: object = None) -> tuple[torch.Tensor | FP8Act, torch.Tensor]:
    """r = x + residual; returns (rms_norm(r), r) in one pass (quant: as rms_norm)."""
    if isinstance(quant, SwapPrologue):
        pending = pending_norm(x, residual, weight, eps)
        if pending is not None:
            return pending
        quant = None
    out, res_out = _launch(x, residual, weight, eps, quant)
    assert res_out is not None
    return out, res_out
