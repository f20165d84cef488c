"""Per-token (dynamic) and per-tensor (static) FP8 e4m3 quantization of activations.

One kernel, one row per program: amax, then x / scale (the correctly rounded float32
quotient) and a round-to-nearest-even e4m3 conversion, bit for bit what
kiln.kernels.reference computes on the same device: the dynamic scale
max(amax, 1e-6) / 448 is rounded the way torch rounds `amax / 448` there (see
_dynamic_scale). Under TRITON_INTERPRET=1 the e4m3 rounding is done in integer
arithmetic, since the interpreter's own float -> fp8 conversion rounds ties away from
zero. The jit helpers are shared with the fused path of the FP8 GEMM (kernels/fp8.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kiln.kernels import pdl
from kiln.kernels.reference import FP8, FP8_MAX
from kiln.kernels.reference_quant import (  # noqa: F401 -- FP8Act, FP8Quant re-exported
    FP8Act,
    FP8Quant,
    Int8Act,
    Int8Quant,
)

# TRITON_INTERPRET is read when the @triton.jit decorators below run, so read it here too.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# float32(1 / 448): what CUDA torch multiplies by for `tensor / 448.0` (_divide_as_torch)
_INV_448: tl.constexpr = tl.constexpr((torch.ones((), dtype=torch.float32) / FP8_MAX).item())


QUANT_NONE, QUANT_DYNAMIC, QUANT_STATIC, QUANT_INT8 = 0, 1, 2, 3


def fused_quant_args(quant: FP8Quant | Int8Quant, scale: torch.Tensor) -> dict:
    """Launch arguments of a kernel that quantizes its own output as `quant` says (RMSNorm,
    SiLU-mul): QUANT (QUANT_INT8: int8 per token, int8_act's numbers), and the static [1]
    scale (dynamic: `scale`, the per-row output, as a placeholder never read)."""
    if isinstance(quant, Int8Quant):
        return dict(static_scale_ptr=scale, QUANT=QUANT_INT8)
    static = quant.static_scale
    return dict(static_scale_ptr=scale if static is None else static,
                QUANT=QUANT_DYNAMIC if static is None else QUANT_STATIC)


def quantized_act(quant: FP8Quant | Int8Quant, q_shape: tuple, scale: torch.Tensor
                  ) -> tuple[torch.Tensor, type]:
    """The fused kernel's output buffer for `quant` (e4m3, or int8 for an Int8Quant) and
    the class wrapping it with its scales (FP8Act / Int8Act)."""
    int8 = isinstance(quant, Int8Quant)
    return (torch.empty(q_shape, dtype=torch.int8 if int8 else FP8, device=scale.device),
            Int8Act if int8 else FP8Act)


# ---- quantization ---------------------------------------------------------------------
@triton.jit
def _e4m3_soft(q):
    """float32 in [-448, 448] -> e4m3fn, round to nearest even, in integer arithmetic."""
    bits = q.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # normal results (|q| >= 2^-6): keep 3 mantissa bits, ties to even; the carry of the
    # rounding runs into the exponent. e4m3 exponent = float32 exponent - 120.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal results: multiples of 2^-9, rounded to even by the 2^23 trick (exact: the
    # product by 512 is a power of two, the sum rounds once); 8 * 2^-9 = 2^-6 is code 8.
    sub = ((mag.to(tl.float32, bitcast=True) * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(mag >= (121 << 23), normal, sub) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize_values(x, scale, inv_scale, INTERPRET: tl.constexpr):
    """e4m3fn(clamp(x / scale, +-448)) for float32 x, scale broadcastable to x.

    inv_scale = div_rn(1, scale). x / scale correctly rounded is q0 = x * inv_scale with
    one Markstein correction: r = x - q0 * scale is exact (fma) and fma(r, inv_scale, q0)
    is the correctly rounded quotient whenever it is a normal float32 (Markstein's
    theorem; also checked against float32 division on 2.5e8 cases, every bf16 and fp16
    value over 1500 scales); 3 flops instead of a division per element. Quotients below
    the normal range may differ in the float32 result but are +-0 in e4m3 either way.
    q0 is kept where |q0| >= 448 (the clamp decides; also inf) and where q0 == 0 (the
    correction would turn -0.0 into +0.0). NaN and inf inputs are not handled as the
    reference handles them (its NaN amax makes the whole row NaN).
    """
    q0 = x * inv_scale
    r = tl.fma(-q0, scale, x)
    q1 = tl.fma(r, inv_scale, q0)
    q = tl.where((tl.abs(q0) >= 448.0) | (q0 == 0.0), q0, q1)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if INTERPRET:
        return _e4m3_soft(q)
    return q.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _divide_as_torch(x, DIVISOR: tl.constexpr, INVERSE: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """x / DIVISOR rounded as torch rounds `tensor / python_number` (INVERSE: the float32
    1 / DIVISOR). On the CPU torch divides (correctly rounded), on CUDA it multiplies by
    the float32 reciprocal (a CPU scalar divisor is turned into a product), which differs
    in the last bit about half the time. The interpreter runs against CPU tensors,
    compiled kernels against CUDA ones."""
    if INTERPRET:
        return tl.div_rn(x, DIVISOR)
    return x * INVERSE


@triton.jit
def _dynamic_scale(amax, INTERPRET: tl.constexpr):
    """max(amax, 1e-6) / 448 rounded as the reference rounds it, and its reciprocal."""
    scale = _divide_as_torch(tl.maximum(amax, 1e-6), 448.0, _INV_448, INTERPRET)
    return scale, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_x, stride_q,
                  STATIC: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
                  PDL: tl.constexpr, WAIT: tl.constexpr, INTERPRET: tl.constexpr):
    """One row per program: amax over the row (dynamic), then scale, convert, store.

    ONE_TILE (K <= BLOCK_K): the row is read once and kept in registers. Writes the row's
    scale to scale_ptr[row] in both modes (static: a copy of the [1] scale), so the
    scaled-mm path gets the [M, 1] scale it wants either way.
    """
    if WAIT:  # launched with PDL behind the kernel that wrote x
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_scale_ptr)
            inv = tl.div_rn(1.0, scale)
        else:
            scale, inv = _dynamic_scale(tl.max(tl.abs(x), axis=0), INTERPRET)
        tl.store(q_row + offs, _quantize_values(x, scale, inv, INTERPRET), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr)
            inv = tl.div_rn(1.0, scale)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                x = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            scale, inv = _dynamic_scale(tl.max(amax, axis=0), INTERPRET)
        for k in range(0, K, BLOCK_K):
            mask = k + offs < K
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k + offs, _quantize_values(x, scale, inv, INTERPRET), mask=mask)
    tl.store(scale_ptr + row, scale)


def _quantize(x: torch.Tensor, static_scale: torch.Tensor | None,
              launch_dependents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, per-row scale [M, 1]); launch_dependents: let a kernel launched behind this
    one with programmatic dependent launch start at once (it waits in gdc_wait)."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    block = min(triton.next_power_of_2(K), 16384)
    one_tile = K <= block
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 1
    wait = pdl.enabled(x)
    _quant_kernel[(M,)](x, q, scale, scale if static_scale is None else static_scale, K,
                        x.stride(0), q.stride(0), STATIC=static_scale is not None,
                        BLOCK_K=block, ONE_TILE=one_tile, PDL=launch_dependents or wait,
                        WAIT=wait, INTERPRET=_INTERPRET, num_warps=warps,
                        **pdl.launch_args(wait))
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16/32-bit) -> (e4m3fn [M, K], float32 scale [M, 1]); as the reference."""
    return _quantize(x, None)


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> e4m3fn(clamp(x / scale, +-448)) with a float32 [1] scale."""
    return _quantize(x, scale.reshape(1).float())[0]


@triton.jit
def _double_rows(q):
    """[R, C] -> [2R, C]: q on top of R rows of zeros (goes through shared memory)."""
    return tl.reshape(tl.permute(tl.join(q, tl.zeros_like(q)), (2, 0, 1)),
                      (2 * q.shape[0], q.shape[1]))


@triton.jit
def _pad_rows(q, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """[ROWS, C] -> [BLOCK_M, C] (BLOCK_M = 16), zeros below; ROWS a power of two."""
    if ROWS * 16 <= BLOCK_M:
        q = _double_rows(q)
    if ROWS * 8 <= BLOCK_M:
        q = _double_rows(q)
    if ROWS * 4 <= BLOCK_M:
        q = _double_rows(q)
    if ROWS * 2 <= BLOCK_M:
        q = _double_rows(q)
    return q


@triton.jit
def _fp8_epilogue(acc, x_scale, xs_ptr, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m,
                  mask_n, stride_om, QUANT: tl.constexpr, XS_PER_ROW: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """out = acc * x_scale * w_scale (+ bias), in the output's dtype: the epilogue of
    kiln.kernels.fp8's GEMM and of fp8_swap's (which hands its [weight rows, tokens]
    sums over transposed)."""
    if QUANT == 0:
        if XS_PER_ROW:
            x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        else:
            x_scale = tl.load(xs_ptr)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    if QUANT == 2 or (QUANT == 0 and not XS_PER_ROW):
        y = acc * x_scale
    else:
        y = acc * x_scale[:, None]
    y = y * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
