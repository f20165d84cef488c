"""RMSNorm, optionally fused with the residual add before it: one read, one write per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.pdl import pdl_start


@triton.jit(do_not_specialize=["num_rows"])  # token count varies by step
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, n_cols, stride_x, stride_res, stride_out, stride_res_out, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """s = x (+ r);  y = w * cast(s / sqrt(mean(s^2) + eps)), the mean taken in float32.

    With a residual the sum is rounded to the input dtype first (it is also written out
    as the next residual), so y matches torch's unfused `rms_norm(x + r)` bit for bit up
    to the order of the reduction.
    """
    pdl_start(PDL)
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
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, n] view with unit column stride (copies only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = _rows(x)
    num_rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
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
    grid = (triton.cdiv(num_rows, block_r),)
    use_pdl = pdl.enabled(x)
    _rms_norm_kernel[grid](
        x2, res2, weight, out2, res_out2, num_rows, n,
        x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0), eps,
        BLOCK_R=block_r, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        PDL=use_pdl, num_warps=num_warps, **pdl.launch_args(use_pdl),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps) over the last dim, any leading shape."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual; returns (rms_norm(r), r) in one pass."""
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out
