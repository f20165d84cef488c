"""SiLU(gate) * up for the fused gate_up projection output [T, 2I] = [gate | up]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.pdl import pdl_start


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    """out[t, i] = cast(g / (1 + exp(-g))) * u  with g = x[t, i], u = x[t, I + i].

    The SiLU is rounded to the input dtype before the product, as torch's unfused
    `F.silu(gate) * up` does.
    """
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    row = x_ptr + token * stride_x
    gate = tl.load(row + cols, mask=mask, other=0.0)
    up = tl.load(row + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = silu * up.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, out.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I]."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    block = min(triton.next_power_of_2(inter), 2048)
    num_warps = max(1, min(block // 256, 8))
    grid = (x2.shape[0], triton.cdiv(inter, block))
    use_pdl = pdl.enabled(x)
    _silu_mul_kernel[grid](x2, out2, inter, x2.stride(0), out2.stride(0), BLOCK=block,
                           PDL=use_pdl, num_warps=num_warps, **pdl.launch_args(use_pdl))
    return out
