"""The factored integer GEMV for a few rows (decode at 2-4 sequences, a speculative verify):
the one-row kernel's reading (kiln.kernels.int_gemv1._gemv1_kernel: 32-bit words, each
value read in place as a float's mantissa, the scale and offset applied once a word as
s sum q x + o sum x) with every word used for all M <= ROWS rows of x, so the weight is
read once for the batch. Opt-in (IntGemmConfig.factored for 2-4 rows) until timed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.int_gemv import _exponent_base, _gemv1_load, _value_at, _word_tile


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, G, W_PER_SPLIT,
                      stride_xm, stride_wn, stride_sn, stride_om,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                      GROUPS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr):
    """out[:M, n block] (+)= x[:M, k split] @ w[n block, k split]^T, M <= ROWS, x rows
    stride_xm apart. w_ptr: the storage as int32 words (stride_wn in words); a K step
    spans GROUPS whole groups, as in _gemv1_kernel. ATOMIC: out is a zeroed float32
    buffer the splits add into (the first adds the bias); otherwise one split, out in x's
    dtype. Tiles are [ROWS, BLOCK_N, GROUPS, words a group]: the products of each row in
    float32 registers, summed once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = BLOCK_K // PER // GROUPS
    STEP: tl.constexpr = BLOCK_K // PER
    SPLIT: tl.constexpr = 5 if BITS == 4 else 2  # values read in place: bits 0..19 / 0..15
    SHIFT: tl.constexpr = 12 if BITS == 4 else 16
    mask_n, rows, s_rows, g, word = _word_tile(pid_n, N, stride_sn, BLOCK_N, GROUPS, WPG)
    r = tl.arange(0, ROWS)[:, None, None, None]  # [ROWS, 1, 1, 1]
    x_rows = x_ptr + r.to(tl.int64) * stride_xm
    mask_r = r < M
    acc = tl.zeros([ROWS, BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // PER)
    k_end = w_end * PER
    E0 = _exponent_base(k_end)
    for w0 in range(w_start, w_end, STEP):
        words, scale, offset = _gemv1_load(
            w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w0, k_end, G, stride_wn,
            PER, WPG, GROUPS, HAS_OFFSET, EVEN_K)
        kw = (w0 * PER + PER * word)[None, :, :, :]  # [1, 1, GROUPS, WPG]: a word's first k
        mask_x = mask_r if EVEN_K else mask_r & (kw < k_end)
        hi = words >> SHIFT
        part = tl.zeros([ROWS, BLOCK_N, GROUPS, WPG], dtype=tl.float32)
        x_sum = tl.zeros([ROWS, 1, GROUPS, WPG], dtype=tl.float32)
        for i in tl.static_range(PER):
            if i < SPLIT:
                q = _value_at(words, BITS * i, BITS, E0)
            else:
                q = _value_at(hi, BITS * i - SHIFT, BITS, E0)
            xi = tl.load(x_rows + kw + i, mask=mask_x, other=0.0).to(tl.float32)
            part += q[None, :, :, :] * xi
            if HAS_OFFSET:
                x_sum += xi
        acc += part * scale[None, :, :, :]
        if HAS_OFFSET:
            acc += offset[None, :, :, :] * x_sum
    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [ROWS, BLOCK_N]
    offs_m = tl.arange(0, ROWS)[:, None]
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (offs_m < M) & (offs < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = bias * tl.where(pid_k == 0, 1.0, 0.0)
        y += bias
    out = out_ptr + offs_m.to(tl.int64) * stride_om + offs
    if ATOMIC:
        tl.atomic_add(out, y, mask=mask, sem="relaxed")
    else:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_gemv_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     offset: torch.Tensor | None, bias: torch.Tensor | None, block_n: int,
                     block_k: int, groups: int, num_warps: int, num_stages: int, G: int,
                     k_per_split: int) -> torch.Tensor:
    """x [M, K] (M <= 4) @ dequant(weight)^T -> [M, N] in x's dtype; weight as stored
    (int8 [N, K] or uint8 [N, K // 2], rows whole 32-bit words), k_per_split a multiple
    of block_k (int_gemm.split_length)."""
    M, K = x.shape
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    per = 32 // bits
    splits = triton.cdiv(K, k_per_split)
    atomic = splits > 1
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_rows_kernel[(triton.cdiv(N, block_n), splits)](
        x, weight.view(torch.int32), scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, M, N, K, G, k_per_split // per,
        x.stride(0), weight.stride(0) // 4, scale.stride(0), out.stride(0),
        ROWS=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_K=block_k, BITS=bits,
        HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, GROUPS=groups,
        ATOMIC=atomic, EVEN_K=K % k_per_split == 0 and k_per_split % block_k == 0,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(x.dtype) if atomic else out
