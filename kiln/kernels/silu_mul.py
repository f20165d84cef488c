"""act(gate) * up for the fused gate_up projection output [T, 2I] = [gate | up]: SiLU
(SwiGLU) or the tanh GELU (GeGLU, Gemma); optionally quantized to FP8 or INT8 in the same
pass for the W8A8 down projection (one row per program: the per-token scale needs the row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from kiln.kernels import pdl
from kiln.kernels.fp8_quant import (
    _INTERPRET,
    FP8Act,
    FP8Quant,
    Int8Quant,
    _dynamic_scale,
    _quantize_values,
    fused_quant_args,
    quantized_act,
)
from kiln.kernels.int8_act import _int8_scale, _round_int8
from kiln.kernels.pdl import pdl_enter
from kiln.layers.swap_input import SwapPrologue, pending_act


@triton.jit
def _act_mul(row, cols, mask, inter, GELU_TANH: tl.constexpr):
    """The product for columns cols of one row, rounded to the input dtype (float32)."""
    gate = tl.load(row + cols, mask=mask, other=0.0)
    up = tl.load(row + inter + cols, mask=mask, other=0.0)
    return act_mul_values(gate, up, GELU_TANH)


@triton.jit
def glu_rows(pid, cols, BLOCK: tl.constexpr):
    """A GLU program's BLOCK rows of a [gate | up] weight of 2 * cols rows (the fused
    epilogues of the decode GEMVs): the gate rows of BLOCK / 2 columns, then the up rows of
    the same columns; and whether each column is real."""
    HALF: tl.constexpr = BLOCK // 2
    i = tl.arange(0, BLOCK)
    col = pid * HALF + i % HALF
    return col + (i // HALF) * cols, col < cols


@triton.jit
def act_mul_values(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up of gate and up as stored (16-bit), the activation rounded to their
    dtype before the product, the result too."""
    g = gate.to(tl.float32)
    if GELU_TANH:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:
        act = g / (1.0 + tl.exp(-g))
    out = act.to(gate.dtype).to(tl.float32) * up.to(tl.float32)
    return out.to(gate.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr,
                     PDL: tl.constexpr, GELU_TANH: tl.constexpr = False,
                     DEPENDENTS: tl.constexpr = False):
    """out[t, i] = cast(g / (1 + exp(-g))) * u  with g = x[t, i], u = x[t, I + i];
    GELU_TANH: cast(g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3)))) * u, with
    tanh(z) = 1 - 2 / (exp(2z) + 1) (saturates to +-1).

    The activation is rounded to the input dtype before the product, as torch's unfused
    `F.silu(gate) * up` does. DEPENDENTS: the swapped GEMV behind it may start at once.
    """
    pdl_enter(PDL, DEPENDENTS)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    out = _act_mul(x_ptr + token * stride_x, cols, mask, inter, GELU_TANH)
    tl.store(out_ptr + token * stride_out + cols, out, mask=mask)


@triton.jit
def _act_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, inter, stride_x,
                          stride_q, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                          QUANT: tl.constexpr, GELU_TANH: tl.constexpr,
                          INTERPRET: tl.constexpr, DEPENDENTS: tl.constexpr = False):
    """One token per program: the row of act(gate) * up (rounded to the input dtype, as
    _silu_mul_kernel stores it), then e4m3 with the row's dynamic scale (QUANT 1) or the
    static one (2), bit for bit what fp8_quant's kernel makes of the stored row (QUANT 3:
    int8 with the row's scale, as int8_act's kernel). ONE_TILE:
    the row stays in registers; else it is computed twice (amax pass, quantize pass).
    DEPENDENTS (sm_90+): the FP8 GEMM behind, launched with PDL, may start fetching its
    weight at once."""
    if DEPENDENTS:
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    row = x_ptr + token * stride_x
    q_row = q_ptr + token * stride_q
    offs = tl.arange(0, BLOCK)
    if QUANT == 2:
        scale = tl.load(static_scale_ptr)
        inv = tl.div_rn(1.0, scale)
    if ONE_TILE:
        mask = offs < inter
        y = _act_mul(row, offs, mask, inter, GELU_TANH).to(tl.float32)
        if QUANT == 1:
            scale, inv = _dynamic_scale(tl.max(tl.abs(y), axis=0), INTERPRET)
        if QUANT == 3:
            scale = _int8_scale(tl.max(tl.abs(y), axis=0), INTERPRET)
            tl.store(q_row + offs, _round_int8(tl.div_rn(y, scale)), mask=mask)
        else:
            tl.store(q_row + offs, _quantize_values(y, scale, inv, INTERPRET), mask=mask)
    else:
        if QUANT != 2:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, inter, BLOCK):
                y = _act_mul(row, k + offs, k + offs < inter, inter, GELU_TANH)
                amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
            if QUANT == 3:
                scale = _int8_scale(tl.max(amax, axis=0), INTERPRET)
            else:
                scale, inv = _dynamic_scale(tl.max(amax, axis=0), INTERPRET)
        for k in range(0, inter, BLOCK):
            mask = k + offs < inter
            y = _act_mul(row, k + offs, mask, inter, GELU_TANH).to(tl.float32)
            if QUANT == 3:
                tl.store(q_row + k + offs, _round_int8(tl.div_rn(y, scale)), mask=mask)
            else:
                tl.store(q_row + k + offs, _quantize_values(y, scale, inv, INTERPRET),
                         mask=mask)
    tl.store(scale_ptr + token, scale)


def act_mul_quant(x: torch.Tensor, quant: FP8Quant | Int8Quant, gelu_tanh: bool = False,
                  launch: dict | None = None) -> FP8Act:
    """x [T, 2I] -> e4m3 (int8 for an Int8Quant) of act(x[:, :I]) * x[:, I:] with per-row
    scales (an FP8Act / Int8Act).
    launch: block / num_warps instead of the choice below (benchmarks). quant
    SWAP_PROLOGUE: left to the swapped GEMV after it (a PendingInput) where that takes x,
    else the unquantized product."""
    if isinstance(quant, SwapPrologue):
        pending = pending_act(x, gelu_tanh)
        return pending if pending is not None else silu_and_mul(x, gelu_tanh)
    inter = x.shape[-1] // 2
    assert x.dim() == 2, "the fused FP8 output is [tokens, features]"
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens = x.shape[0]
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    q, act_type = quantized_act(quant, (tokens, inter), scale)
    if tokens:
        block = min(triton.next_power_of_2(inter), 16384)
        num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
        if tokens >= 128 and inter > 8192:
            # Rows enough to fill the SMs: the row in 4096-wide slices over 8 warps (two
            # passes, the second from L2) rather than one 16384-wide tile in registers
            # (H200, Llama-3.1-8B, CUDA-graph timing, benchmarks/small_kernels_bench.py:
            # 16384 rows, a prefill step, 488.6 us against 507.7-546.3 for 8192-wide slices
            # over 16 warps, the launch before, timed three times; 496 rows 20.1 against
            # 20.4-20.7). The same bits either way.
            block, num_warps = 4096, 8
        if launch:
            block, num_warps = launch.get("block", block), launch.get("num_warps", num_warps)
        _act_mul_quant_kernel[(tokens,)](
            x, q, scale, inter=inter, stride_x=x.stride(0), stride_q=q.stride(0),
            BLOCK=block, ONE_TILE=inter <= block, GELU_TANH=gelu_tanh,
            **fused_quant_args(quant, scale), INTERPRET=_INTERPRET, DEPENDENTS=pdl.hopper(x),
            num_warps=num_warps)
    return act_type(q, scale, x.dtype)


def silu_and_mul(x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  [..., I] (gelu_tanh: GeGLU)."""
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
                           PDL=use_pdl, GELU_TANH=gelu_tanh, DEPENDENTS=pdl.dependents(x),
                           num_warps=num_warps, **pdl.launch_args(use_pdl))
    return out


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> gelu_tanh(x[..., :I]) * x[..., I:]  [..., I]."""
    return silu_and_mul(x, gelu_tanh=True)
