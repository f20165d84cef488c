"""Decode-batch W4A16 / W8A16 products on the integer tensor cores: x as digit planes.

The tl.dot tiles of kiln.kernels.int_gemm turn every weight into a 16-bit float before the
tensor cores see it (unpack, convert, scale, offset, round: ~5 instructions a weight),
and on an H200 that work, not HBM, keeps int4 decode batches at 0.75x bf16. Here the
weight goes to `tl.dot` as the integers it stores: int8 as loaded, int4 as two int8
tiles per K step (the even-k low nibbles `b & 15`, the odd-k high ones `b >> 4`), and x
as the three signed-byte digit planes of kiln.kernels.int_gemv_digits (24-bit fixed
point relative to each row's largest value; stored with each row's even k before its odd
k for int4). Each K step lies in one quantization group: three int8 products with int32
sums (exact), combined in float32 as a1 2^16 + a2 2^8 + a3, times the row's s / 2^16 and
the group's scale; offsets add the group's offset times the step's sum of x. The
result is the float GEMM of the dequantized weight up to summation order and x's
fixed-point rounding (at most 2^-24 of the row's largest value an element).

kiln's default for int8 per channel from 17 rows, and at gate_up's large N from 2 rows
(kiln.kernels.int_launch; measured on an H200, sixteenth session: a layer at 64 rows 142
us against 196 for the float tiles; gate_up at 16 rows 37.6 against 45-62). int4 (groups:
three int32 products converted and scaled every K step) lost at every row count and
stays opt-in (IntGemmConfig.digits, KILN_INT_TILES' ninth field). The interpreter runs
the same integer products (numpy int32 matmuls)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.int_gemv_digits import PAIRS, _combine, x_digits
from kiln.kernels.split_k import finish_tile, split_k_counters, tile_coords

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _plane_dot(x_rows, lo, hi, mask_m, col, K, BLOCK_K: tl.constexpr, BITS: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N]: one digit plane's rows (x_rows) times the K step's integer
    weight tiles (int4: lo for even k, hi for odd k, col the step's first pair; int8: lo,
    col the step's first k)."""
    if BITS == 4:
        offs = col + tl.arange(0, BLOCK_K // 2)
        xe = tl.load(x_rows + offs[None, :], mask=mask_m[:, None], other=0)
        xo = tl.load(x_rows + K // 2 + offs[None, :], mask=mask_m[:, None], other=0)
        a = tl.dot(xo, tl.trans(hi), tl.dot(xe, tl.trans(lo), out_dtype=tl.int32),
                   out_dtype=tl.int32)
    else:
        offs = col + tl.arange(0, BLOCK_K)
        a = tl.dot(tl.load(x_rows + offs[None, :], mask=mask_m[:, None], other=0),
                   tl.trans(lo), out_dtype=tl.int32)
    return a


@triton.jit(do_not_specialize=["M"])
def _digits_tile_kernel(d_ptr, sx_ptr, xs_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr,
                        part_ptr, count_ptr, M, N, K, G, PLANE, stride_wn, stride_sn,
                        stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, BITS: tl.constexpr,
                        HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
                        ONE_GROUP: tl.constexpr = False):
    """out[m block, n block] = x @ dequant(w)^T from x's digit planes (d_ptr: int8 [3, M,
    K], PLANE = M K), sx (s / 2^16 a row) and xs (x summed over each K step a row); K a
    multiple of SPLIT_K * BLOCK_K, each step in one group. ONE_GROUP (no offsets): each
    split's K range lies in one group (int8 per channel), so the int32 sums run over the
    whole range and are scaled once (each |sum| <= 128 * 128 * K / SPLIT_K < 2^31;
    converted to float32 one plane at a time)."""
    tile, offs_m, offs_n, mask_m, mask_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = d_ptr + offs_m.to(tl.int64)[:, None] * K
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    i1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    i2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    i3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_len = K // SPLIT_K
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        if BITS == 4:
            col = k // 2
            packed = tl.load(w_rows + (col + tl.arange(0, BLOCK_K // 2))[None, :],
                             mask=mask_n[:, None], other=0)
            lo = (packed & 15).to(tl.int8)
            hi = (packed >> 4).to(tl.int8)
        else:
            col = k
            lo = tl.load(w_rows + (k + tl.arange(0, BLOCK_K))[None, :], mask=mask_n[:, None],
                         other=0)
            hi = lo
        a1 = _plane_dot(x_rows, lo, hi, mask_m, col, K, BLOCK_K, BITS)
        a2 = _plane_dot(x_rows + PLANE, lo, hi, mask_m, col, K, BLOCK_K, BITS)
        a3 = _plane_dot(x_rows + 2 * PLANE, lo, hi, mask_m, col, K, BLOCK_K, BITS)
        s_offs = offs_n.to(tl.int64) * stride_sn + k // G
        if ONE_GROUP:
            i1 += a1
            i2 += a2
            i3 += a3
        else:
            acc += _combine(a1, a2, a3) * sx * tl.load(s_ptr + s_offs, mask=mask_n,
                                                      other=0.0)[None, :]
        if HAS_OFFSET:
            x_sum = tl.load(xs_ptr + offs_m * (K // BLOCK_K) + k // BLOCK_K, mask=mask_m,
                            other=0.0)
            acc += x_sum[:, None] * tl.load(o_ptr + s_offs, mask=mask_n, other=0.0)[None, :]
    if ONE_GROUP:
        s_offs = offs_n.to(tl.int64) * stride_sn + k_start // G
        wide = i1.to(tl.float32) * 65536.0 + i2.to(tl.float32) * 256.0 + i3.to(tl.float32)
        acc = wide * sx * tl.load(s_ptr + s_offs, mask=mask_n, other=0.0)[None, :]
    finish_tile(acc, out_ptr, bias_ptr, part_ptr, count_ptr, tile, offs_m, offs_n, mask_m,
                mask_n, M, N, stride_om, HAS_BIAS, SPLIT_K, INTERPRET)


def digits_tiles_eligible(K: int, G: int, block_k: int, bits: int) -> bool:
    """Each K step in one group, K whole steps (the x sums are kept a step), and each int8
    tl.dot at least 32 deep (the GPU's least; int4 multiplies half a step at a time)."""
    return G % block_k == 0 and K % block_k == 0 and block_k >= (64 if bits == 4 else 32)


def digits_tiles(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None, bias: torch.Tensor | None, block_m: int,
                 block_n: int, block_k: int, split_k: int, num_warps: int,
                 num_stages: int, group_m: int = 8) -> torch.Tensor:
    """x [M, K] (16/32-bit) @ dequant(weight)^T -> [M, N] in x's dtype (see the module
    doc; digits_tiles_eligible must hold). K split over split_k programs where K is a
    multiple of split_k * block_k (else one)."""
    M, K = x.shape
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    digits, sx, xs = x_digits(x, PAIRS if bits == 4 else 0, block_k)
    split = split_k if K % (split_k * block_k) == 0 else 1
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part, counters = (torch.empty(split, M, N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, tiles)) if split > 1 else (out, out)
    _digits_tile_kernel[(tiles, split)](
        digits, sx, xs, weight, scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, part, counters, M, N, K,
        K // scale.shape[1], M * K, weight.stride(0), scale.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, BITS=bits,
        HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
        INTERPRET=_INTERPRET, ONE_GROUP=offset is None and (K // scale.shape[1]) %
        (K // split) == 0 and K // split < 2**31 // (128 * 128),
        num_warps=num_warps, num_stages=num_stages)
    return out
