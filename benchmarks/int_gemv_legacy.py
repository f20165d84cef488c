"""The one-row int4 / int8 GEMV as it was before the K-major 4-bit storage (engine format
2: even k in the low nibble of each byte, word j of a row holding k = 8j..8j+7), kept
only so that benchmarks/int_gemv_bench.py can time old against new on the same GPU.

    gemv1_old(x, weight, scale, offset, block_n, block_k, split_k, warps, stages)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pack_int4_old(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> uint8 [N, K // 2], even k in the low nibble (format 2)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


@triton.jit
def _gemv1_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, N, K, G, W_PER_SPLIT,
                  stride_wn, stride_sn,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
                  ATOMIC: tl.constexpr, EVEN_K: tl.constexpr = False):
    """out[n block] (+)= x[k split] . w[n block, k split] for one row x (batch-1 decode).

    The weight is read as 32-bit words (w_ptr is the storage viewed as int32, stride_wn in
    words): word j of a row holds k = PER j .. PER j + PER - 1 (PER = 8 nibbles or 4
    bytes, the lowest bits first). Each value becomes a float with integer ops only, as
    the mantissa of 2^23: float(bits(2^23) | u) - 2^23 = u exactly (int8 goes through
    u = q + 128); so the loop is shifts, masks and FMAs, no quarter-rate int -> float
    conversions, and the weight is not rounded to x's dtype (the dequantized value in
    float32, as the tests bound it). A K step spans GROUPS whole quantization groups (1
    when it lies in one): tiles are [BLOCK_N, GROUPS, words per group], so each row loads
    one scale (and offset) per group and step. Products accumulate elementwise in float32
    registers over the whole K loop and are summed once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BIAS: tl.constexpr = 8388608.0 + (128.0 if BITS == 8 else 0.0)
    WPG: tl.constexpr = BLOCK_K // PER // GROUPS  # words per group in a step
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < N)[:, None, None]
    rows = offs_n.to(tl.int64)[:, None, None]
    s_rows = rows * stride_sn
    g = tl.arange(0, GROUPS)[None, :, None]
    word = g * WPG + tl.arange(0, WPG)[None, None, :]  # [1, GROUPS, WPG] in the step
    acc = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    # The loop runs over words (W_PER_SPLIT words a split, specialized as a multiple of
    # 16): the compiler then knows where rows' words are 16-byte aligned.
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // PER)
    k_end = w_end * PER
    for w0 in range(w_start, w_end, BLOCK_K // PER):
        k = w0 * PER
        kw = k + PER * word  # the first k of each word
        if EVEN_K:  # every step whole: masks only on rows, so loads can be vectors
            words = tl.load(w_ptr + rows * stride_wn + w0 + word, mask=mask_n, other=0)
            mask_g = mask_n & (g < GROUPS)
            mask_w = word >= 0  # unused
        else:
            mask_w = kw < k_end
            mask_g = mask_n & (k + g * (WPG * PER) < k_end)
            words = tl.load(w_ptr + rows * stride_wn + w0 + word, mask=mask_n & mask_w,
                            other=0)
        group = k // G + g  # [1, GROUPS, 1]
        scale = tl.load(s_ptr + s_rows + group, mask=mask_g, other=0.0)
        if HAS_OFFSET:
            offset = tl.load(o_ptr + s_rows + group, mask=mask_g, other=0.0)
        for i in tl.static_range(PER):
            u = (words >> (BITS * i)) & MASK
            if BITS == 8:
                u = u ^ 0x80
            q = (u | 0x4B000000).to(tl.float32, bitcast=True) - BIAS
            w = q * scale
            if HAS_OFFSET:
                w = w + offset
            if EVEN_K:
                xi = tl.load(x_ptr + kw + i).to(tl.float32)
            else:
                xi = tl.load(x_ptr + kw + i, mask=mask_w, other=0.0).to(tl.float32)
            acc += w * xi
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, 1.0, 0.0) * bias
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, y, mask=offs < N, sem="relaxed")
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < N)



def gemv1_old(x, weight, scale, offset, block_n=32, block_k=256, split_k=4, warps=4,
              stages=3):
    """x [1, K] @ dequant(weight)^T -> [1, N] with the old kernel (the old default launch
    when the arguments are left as they are)."""
    K = x.shape[1]
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    G = K // scale.shape[1]
    per = 32 // bits
    groups = 1 if G % block_k == 0 else block_k // G
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    atomic = splits > 1
    out = torch.zeros(N, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(N, dtype=x.dtype, device=x.device)
    o = offset if offset is not None else scale
    _gemv1_kernel[(triton.cdiv(N, block_n), splits)](
        x, weight.view(torch.int32), scale, o, scale, out, N, K, G, k_per_split // per,
        weight.stride(0) // 4, scale.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, BITS=bits,
        HAS_OFFSET=offset is not None, HAS_BIAS=False, GROUPS=groups, ATOMIC=atomic,
        EVEN_K=K % k_per_split == 0, num_warps=warps, num_stages=stages)
    return (out.to(x.dtype) if atomic else out).view(1, N)
