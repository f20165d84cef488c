"""Neox rotary on q and k fused with writing k and v into the paged KV cache (16/32-bit,
or 1-byte e4m3fn / int8 with per-KV-head scales). Partial rotary (GPT-NeoX, Phi) rotates
the first rotary_dim dims of each head and copies the rest; rotary_dim 0 (GPT-2's learned
positions) only copies."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.paged import kv_scale_args, v_transposed
from kiln.kernels.pdl import pdl_start

FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value (the reference saturates to it)
INT8_MAX = tl.constexpr(127.0)  # symmetric int8
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 half to even
# The rotation is written with HF's roundings (each product, then the sum, to the model
# dtype), but compiled with FP fusion (Triton's default) LLVM contracts a product and the sum
# into one fma.rn.bf16x2: 12-18% of the elements one unit off HF's on an H200 (31st
# session). So the rotary launches (this kernel, the QKV GEMV's rotary epilogues) compile
# without FP fusion: HF's roundings, bit-exact on an H200 at no cost (32nd session: bf16
# batch 1 239.2 / 239.3 tok/s against 239.1 / 239.1 with fusion). KILN_ROTARY_EXACT=0: fused.
NO_FUSION = {} if os.environ.get("KILN_ROTARY_EXACT") == "0" else {"enable_fp_fusion": False}


@triton.jit
def _rotate(x_ptr, cos, sin, heads, offs_h, offs_d, half, stride_h):
    """Loads heads x [H, 2*half] and returns the two rotated halves, rounded as torch does.

    y1 = x1*cos - x2*sin,  y2 = x2*cos + x1*sin, each product and the sum rounded to the
    input dtype (the reference computes rotary in the model dtype, like HF). With FP fusion
    on (triton's default) the compiler fuses one product of each into a bf16/fp16 FMA, so on
    the GPU y can differ from the reference by half an ulp of a product.
    """
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < half)
    ptrs = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0)
    dt = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    y1 = (a1 * cos).to(dt).to(tl.float32) + (-a2 * sin).to(dt).to(tl.float32)
    y2 = (a2 * cos).to(dt).to(tl.float32) + (a1 * sin).to(dt).to(tl.float32)
    return y1, y2, mask


@triton.jit
def _to_cache(x, scale, CACHE_DTYPE: tl.constexpr):
    """x / scale in float32 as a 1-byte cache value, like the reference's quantize_kv.

    e4m3fn: saturated to +-448, then round to nearest even (one cvt.rn.satfinite on sm_90);
    int8: clamped to +-127, rounded half to even by the 1.5 * 2^23 trick (exact in float32,
    no libdevice, so the interpreter runs it too), then converted (exact for integers).
    """
    y = tl.div_rn(x, scale)  # IEEE division like torch (`/` is div.full.f32, ~2 ulp)
    if CACHE_DTYPE == tl.int8:
        y = tl.minimum(tl.maximum(y, -INT8_MAX), INT8_MAX)
        q = ((y + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)
    else:
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        q = y.to(CACHE_DTYPE, fp_downcast_rounding="rtne")
    return q


@triton.jit
def _copy_tail(src_ptr, dst_ptr, heads, offs_h, stride_src_h, stride_dst_h, tail_start,
               head_dim, scale_ptr, BLOCK_P: tl.constexpr, stride_dst_d=1):
    """dst[h, d] = src[h, d] for d in tail_start .. head_dim (the dims rotary leaves), into
    the model dtype or, for a 1-byte destination, quantized by scale[h] like _to_cache."""
    offs_p = tail_start + tl.arange(0, BLOCK_P)
    mask = (offs_h[:, None] < heads) & (offs_p[None, :] < head_dim)
    x = tl.load(src_ptr + offs_h[:, None] * stride_src_h + offs_p[None, :], mask=mask,
                other=0.0)
    dst = dst_ptr + offs_h[:, None] * stride_dst_h + offs_p[None, :] * stride_dst_d
    cdt = dst_ptr.dtype.element_ty
    if cdt.primitive_bitwidth == 8:
        scale = tl.load(scale_ptr + offs_h, mask=offs_h < heads, other=1.0)[:, None]
        tl.store(dst, _to_cache(x.to(tl.float32), scale, cdt), mask=mask)
    else:
        tl.store(dst, x.to(cdt), mask=mask)


@triton.jit
def _rotary_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr,
    k_scale_ptr, v_scale_ptr, num_heads, num_kv_heads, half, block_size,
    stride_q, stride_k, stride_v, stride_q_out, stride_cs,
    stride_cb, stride_cs_slot, stride_ch, head_dim_arg, stride_vs, stride_vh, stride_vd,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PDL: tl.constexpr, ROTATE_K: tl.constexpr = True,
):
    """One token: q_out = rot(q); cache[slot] = (rot(k), v). Slots < 0 (padding) skip the write.
    ROTATE_K False: k is cached as it comes (attention sinks rotate keys as they read them).

    rot rotates each head's halves by the angles of this token's position:
    [x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin] with cos, sin = cos_sin[pos].
    A 1-byte cache (compile-time branch on its element type) stores rot(k) (rounded to the
    model dtype) / k_scale[head] and v / v_scale[head], quantized by _to_cache.
    BLOCK_P > 0 (partial rotary): only dims 0 .. 2*half rotate; dims 2*half .. head_dim_arg
    of q, k and v are copied by _copy_tail. BLOCK_P == 0 compiles to the full-rotary code.
    V goes to v_cache at block * stride_cb + slot * stride_vs + head * stride_vh + d *
    stride_vd (K's strides, or V transposed inside each block: paged.v_transposed).
    """
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    PARTIAL: tl.constexpr = BLOCK_P > 0
    if PARTIAL:
        head_dim = head_dim_arg
    else:
        head_dim = 2 * half
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d_ok = offs_d < half
    # The reference casts the float32 table to the model dtype first.
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_ok, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs_d, mask=d_ok, other=0.0)
    cos = cos.to(dt).to(tl.float32)[None, :]
    sin = sin.to(dt).to(tl.float32)[None, :]

    offs_h = tl.arange(0, BLOCK_H)
    y1, y2, mask = _rotate(q_ptr + token * stride_q, cos, sin, num_heads, offs_h, offs_d,
                           half, head_dim)
    out = q_out_ptr + token * stride_q_out + offs_h[:, None] * head_dim + offs_d[None, :]
    tl.store(out, y1.to(dt), mask=mask)
    tl.store(out + half, y2.to(dt), mask=mask)
    if PARTIAL:
        _copy_tail(q_ptr + token * stride_q, q_out_ptr + token * stride_q_out, num_heads,
                   offs_h, head_dim, head_dim, 2 * half, head_dim, k_scale_ptr, BLOCK_P)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs_kh = tl.arange(0, BLOCK_KH)
        cache_off = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs_slot
        dst = cache_off + offs_kh[:, None] * stride_ch + offs_d[None, :]
        v_off = (slot // block_size) * stride_cb + (slot % block_size) * stride_vs
        v_dst = v_off + offs_kh[:, None] * stride_vh + offs_d[None, :] * stride_vd
        if ROTATE_K:
            k1, k2, kv_mask = _rotate(k_ptr + token * stride_k, cos, sin, num_kv_heads,
                                      offs_kh, offs_d, half, head_dim)
        else:  # cos 1, sin 0: the halves come back exactly as loaded
            k1, k2, kv_mask = _rotate(k_ptr + token * stride_k, 1.0 + 0.0 * cos, 0.0 * sin,
                                      num_kv_heads, offs_kh, offs_d, half, head_dim)
        cdt = k_cache_ptr.dtype.element_ty
        KV_QUANT: tl.constexpr = cdt.primitive_bitwidth == 8
        if KV_QUANT:
            head_ok = offs_kh < num_kv_heads
            ks = tl.load(k_scale_ptr + offs_kh, mask=head_ok, other=1.0)[:, None]
            tl.store(k_cache_ptr + dst, _to_cache(k1.to(dt).to(tl.float32), ks, cdt),
                     mask=kv_mask)
            tl.store(k_cache_ptr + dst + half, _to_cache(k2.to(dt).to(tl.float32), ks, cdt),
                     mask=kv_mask)
            v_src = v_ptr + token * stride_v + offs_kh[:, None] * head_dim + offs_d[None, :]
            vs = tl.load(v_scale_ptr + offs_kh, mask=head_ok, other=1.0)[:, None]
            v1 = tl.load(v_src, mask=kv_mask, other=0.0).to(tl.float32)
            v2 = tl.load(v_src + half, mask=kv_mask, other=0.0).to(tl.float32)
            tl.store(v_cache_ptr + v_dst, _to_cache(v1, vs, cdt), mask=kv_mask)
            tl.store(v_cache_ptr + v_dst + half * stride_vd, _to_cache(v2, vs, cdt),
                     mask=kv_mask)
        else:
            tl.store(k_cache_ptr + dst, k1.to(dt).to(cdt), mask=kv_mask)
            tl.store(k_cache_ptr + dst + half, k2.to(dt).to(cdt), mask=kv_mask)
            v_src = v_ptr + token * stride_v + offs_kh[:, None] * head_dim + offs_d[None, :]
            v1 = tl.load(v_src, mask=kv_mask, other=0.0)
            v2 = tl.load(v_src + half, mask=kv_mask, other=0.0)
            tl.store(v_cache_ptr + v_dst, v1.to(cdt), mask=kv_mask)
            tl.store(v_cache_ptr + v_dst + half * stride_vd, v2.to(cdt), mask=kv_mask)
        if PARTIAL:
            _copy_tail(k_ptr + token * stride_k, k_cache_ptr + cache_off, num_kv_heads, offs_kh,
                       head_dim, stride_ch, 2 * half, head_dim, k_scale_ptr, BLOCK_P)
            _copy_tail(v_ptr + token * stride_v, v_cache_ptr + v_off, num_kv_heads, offs_kh,
                       head_dim, stride_vh, 2 * half, head_dim, v_scale_ptr, BLOCK_P,
                       stride_vd)


def _token_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """[T, width] view (any row stride, unit column stride) of x [T, H*D] or [T, H, D]."""
    x2 = x.reshape(x.shape[0], width)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, head_dim: int, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None, rotate_k: bool = True,
) -> torch.Tensor:
    """Returns rotary(q) [T, heads*head_dim]; writes rotary(k) (k with rotate_k=False)
    and v at slot_mapping.

    k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim] (same strides for both,
    unit stride on the last dim; or v_cache [num_blocks, kv_heads, head_dim, block_size],
    V transposed inside each block: paged.v_transposed); cos_sin [max_pos, rotary_dim]
    float32 = [cos | sin], rotary_dim <= head_dim (partial rotary; 0: no rotation).
    A float8_e4m3fn or int8 cache needs k_scale and v_scale (float32 [kv_heads]).
    """
    tokens = q.shape[0]
    num_kv_heads = k_cache.shape[2]
    num_heads = q.numel() // (tokens * head_dim) if tokens else 0
    q_out = torch.empty(tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    q2 = _token_rows(q, num_heads * head_dim)
    k2 = _token_rows(k, num_kv_heads * head_dim)
    v2 = _token_rows(v, num_kv_heads * head_dim)
    block_size = k_cache.shape[1]
    v_strides = (1, head_dim * block_size, block_size) if v_transposed(k_cache, v_cache) \
        else (k_cache.stride(1), k_cache.stride(2), 1)
    assert k_cache.stride(-1) == 1
    k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    half = cos_sin.shape[1] // 2
    tail = head_dim - 2 * half
    if cos_sin.numel() == 0:  # no rotary (learned positions): a table that is never read
        cos_sin = positions
    block_d = triton.next_power_of_2(max(half, 1))
    block_h = triton.next_power_of_2(num_heads)
    num_warps = 4 if block_h * block_d <= 4096 else 8
    use_pdl = pdl.enabled(q)
    _rotary_kv_kernel[(tokens,)](
        q2, k2, v2, positions, cos_sin, k_cache, v_cache, slot_mapping, q_out,
        k_scale, v_scale, num_heads, num_kv_heads, half, block_size,
        q2.stride(0), k2.stride(0), v2.stride(0), q_out.stride(0), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), head_dim, *v_strides,
        BLOCK_H=block_h, BLOCK_KH=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d,
        BLOCK_P=triton.next_power_of_2(tail) if tail else 0, PDL=use_pdl,
        ROTATE_K=rotate_k, num_warps=num_warps, **pdl.launch_args(use_pdl), **NO_FUSION,
    )
    return q_out
