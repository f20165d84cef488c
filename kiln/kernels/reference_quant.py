"""Torch references for the quantized formats: FP8 (e4m3) weights, activations and KV
cache, integer weights (W8A16 / W4A16) and INT8 W8A8. The CPU path runs them; the Triton
kernels are tested against them. Re-exported by kiln.kernels.reference."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---- low precision ----------------------------------------------------------------------
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127.0  # symmetric int8: [-127, 127]
MIN_AMAX = 1e-6  # a row of zeros still gets a finite, nonzero scale


class FP8Quant(NamedTuple):
    """How a W8A8 FP8 linear wants its input quantized, for the kernel before it to do it
    (RMSNorm, SiLU*mul on a GPU): per token (static_scale None) or with a static [1]
    scale."""
    static_scale: torch.Tensor | None = None


class FP8Act(NamedTuple):
    """An activation already quantized for an FP8 linear: q [M, K] e4m3fn, scale [M, 1]
    float32 (per row; a copy of the static scale in static mode), and dtype, the dtype
    the unquantized activation had (the linear's output dtype)."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


class Int8Quant(NamedTuple):
    """What an INT8 W8A8 linear (SmoothQuant) asks of the kernel before it (by default;
    KILN_INT8_FUSED_QUANT=0: nothing): its input quantized per token (as
    quantize_int8_per_token)."""


class Int8Act(FP8Act):
    """An activation already quantized for an INT8 W8A8 linear: FP8Act's fields, q int8
    [M, K] with symmetric per-row scales."""
    __slots__ = ()


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn(clamp(x / scale, +-448)) in float32 arithmetic; scale broadcasts against x."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row FP8: scale [M, 1] = max(amax(|x_row|), 1e-6) / 448, float32."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(MIN_AMAX)
    scale = amax / FP8_MAX
    return quantize_fp8(x, scale), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               weight_float: torch.Tensor | None = None,
               packed: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x_q @ w_q^T) * x_scale * w_scale (+ bias), in x's dtype.

    weight [N, K] e4m3fn with per-output-row weight_scale [N] float32; x [M, K] is
    quantized per token (input_scale None) or with the static per-tensor input_scale [1].
    Products of two e4m3 values are exact in float32, so this is what an FP8 tensor core
    computes up to the order of the float32 sums. weight_float (weight.float(), cached by
    the caller) spares the conversion on every call.
    """
    if isinstance(x, FP8Act):  # quantized already (by a fused norm / activation kernel)
        x_q, x_scale, out_dtype = x.q, x.scale, x.dtype
    elif input_scale is None:
        (x_q, x_scale), out_dtype = quantize_fp8_per_token(x), x.dtype
    else:
        x_q, x_scale, out_dtype = quantize_fp8(x, input_scale), input_scale.view(1, 1), x.dtype
    w = weight_float if weight_float is not None else weight.float()
    if packed is not None:  # w packed for oneDNN (kiln.functional.linear)
        from kiln.functional import linear

        y = linear(x_q.float(), w, None, packed) * x_scale * weight_scale.view(1, -1)
    else:
        y = (x_q.float() @ w.T) * x_scale * weight_scale.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [T, kv_heads, d] into a cache of `dtype`: 16/32-bit as is; e4m3fn or int8 as
    x / scale[head] (float32), int8 rounded half to even and clamped to +-127."""
    if dtype not in (FP8, torch.int8):
        return x.to(dtype)
    scaled = x.float() / scale.view(1, -1, 1)
    if dtype == FP8:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """Cache values [..., kv_heads, d] back to `dtype` (x * scale[head] for 1-byte caches)."""
    if scale is None or x.dtype not in (FP8, torch.int8):
        return x.to(dtype)
    return (x.float() * scale.view(-1, 1)).to(dtype)


def read_kv(cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `length` tokens held by blocks [..., n] of a paged cache [blocks,
    block_size, kv_heads, d], as [..., length, kv_heads, d] in `dtype` (index_select copies
    a block at a time: 3x faster than cache[blocks] on the CPU)."""
    x = cache.index_select(0, blocks.reshape(-1)).view(*blocks.shape, *cache.shape[1:])
    return dequantize_kv(x.flatten(blocks.dim() - 1, blocks.dim())[..., :length, :, :], scale,
                         dtype)


# ---- integer weights, 16/32-bit activations (W8A16 / W4A16) ------------------------------
# Storage of an [N, K] weight quantized in groups of G along K (G = K: per channel):
#   weight  int8 [N, K] (8-bit values), or uint8 [N, K // 2] (4-bit values in 0..15, two a
#           byte: even k in the low nibble, odd k in the high one)
#   weight_scale  float32 [N, K // G];  weight_offset  float32 [N, K // G] (or none)
#   w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G], computed in float32.
# A float scale and offset per group hold symmetric (offset none), integer-zero-point
# (offset = -zero * scale) and GGUF's scale-and-minimum blocks (Q4_1, Q4_K, ...) exactly.
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K // 2], even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] (the inverse of pack_int4)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_int_weight(weight: torch.Tensor, scale: torch.Tensor,
                          offset: torch.Tensor | None) -> torch.Tensor:
    """The float32 [N, K] weight of the storage above (4-bit when weight is uint8)."""
    q = unpack_int4(weight) if weight.dtype == torch.uint8 else weight
    n, k = q.shape
    groups = scale.shape[1]
    w = q.float().view(n, groups, k // groups) * scale.float()[:, :, None]
    if offset is not None:
        w = w + offset.float()[:, :, None]
    return w.view(n, k)


def int_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor | None, bias: torch.Tensor | None = None,
                      weight_float: torch.Tensor | None = None,
                      packed: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W dequantized (float32, then x's dtype): the GEMM a float engine
    holding the dequantized weight computes. weight_float: a cached dequantized weight;
    packed: it packed for oneDNN (float32 x only; kiln.functional.linear)."""
    if packed is not None and x.dtype == torch.float32:
        from kiln.functional import linear

        return linear(x, weight_float, None if bias is None else bias.float(), packed)
    w = weight_float if weight_float is not None else dequantize_int_weight(weight, scale, offset)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


# ---- INT8 W8A8 (SmoothQuant) ------------------------------------------------------------
def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row INT8: scale [M, 1] = max(amax(|x_row|), 1e-6) / 127 (float32),
    q = round-half-even(x / scale) in [-127, 127]."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(MIN_AMAX)
    scale = amax / INT8_MAX
    q = (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x_q @ w_q^T) * x_scale * w_scale (+ bias) in x's dtype, x quantized per token;
    weight int8 [N, K], weight_scale float32 [N]. The integer products are summed exactly
    (int32, torch._int_mm), as an INT8 tensor core does."""
    x_q, x_scale = quantize_int8_per_token(x)
    acc = torch._int_mm(x_q, weight.t())
    y = acc.float() * x_scale * weight_scale.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
