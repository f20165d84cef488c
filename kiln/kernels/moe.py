"""Fused mixture-of-experts: the (token, expert) pairs sorted by expert once, then one
grouped GEMM per projection over expert-aligned row blocks (no loop over experts).

FP8 experts (W8A8: e4m3 weights with per-row scales, as FP8 linear layers hold them):
the tokens are quantized per token before the up GEMM, and SiLU*mul writes the down
GEMM's input as e4m3 with per-pair scales; both GEMMs multiply e4m3 on the tensor cores.

CUDA-graph safe: every size is fixed by T, top_k, E and the block size; where each pair
goes is computed on the device (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import reference as ref
from kiln.kernels.paged import dot_precision
from kiln.kernels.reference_quant import FP8, FP8Quant


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs p = t * k + j grouped by expert, each expert's group padded to whole blocks.

    Returns sorted_pairs [max_blocks * block_m] int32 (P = T * k marks padding) and
    block_experts [max_blocks] int32 (the expert of each block; num_experts for blocks
    past the last expert's). max_blocks = ceil((P + E * (block_m - 1)) / block_m) covers
    every routing.
    """
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[expert_of]
    max_blocks = triton.cdiv(pairs + num_experts * (block_m - 1), block_m)
    sorted_pairs = torch.full((max_blocks * block_m,), pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_experts


@triton.jit(do_not_specialize=["num_pairs"])  # token count varies by step
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr,
    a_scale_ptr, w_scale_ptr,
    N, K, num_pairs, num_experts, stride_am, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, FP8_SCALES: tl.constexpr = False, PROMOTE_K: tl.constexpr = 128,
):
    """out[p, n] = sum_k a[row(p), k] * w[e, n, k] (* weights[p]) for the BLOCK_M pairs p
    of this block, all routed to expert e; row(p) = p // TOP_K (the token) when the input
    is per token, else p. Padding pairs (p == num_pairs) are neither read nor written.

    FP8_SCALES: a and w are e4m3; the product is scaled by a_scale[row(p)] (per row of a)
    and w_scale[e, n] (per weight row, [E, N] contiguous). PROMOTE_K: how deep the tensor
    core sums e4m3 products before adding them to the float32 accumulator (as in
    kernels.fp8)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    row_ok = pairs < num_pairs
    if A_PER_TOKEN:
        a_rows = pairs // TOP_K
    else:
        a_rows = pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
              + offs_k[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8_SCALES:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if FP8_SCALES:
        a_scale = tl.load(a_scale_ptr + a_rows, mask=row_ok, other=0.0)
        w_scale = tl.load(w_scale_ptr + expert.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
        acc = acc * a_scale[:, None] * w_scale[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                  sorted_pairs: torch.Tensor, block_experts: torch.Tensor,
                  weights: torch.Tensor | None, top_k: int, per_token: bool,
                  block_m: int, a_scale: torch.Tensor | None = None,
                  w_scale: torch.Tensor | None = None) -> None:
    num_experts, n, k = w.shape
    fp8 = w_scale is not None
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    # e4m3 tiles: twice the depth for the same bytes (the fp8 MMA takes k = 32 a step)
    block_k = (128 if fp8 and k >= 128 else 64) if k >= 64 else \
        max(32 if fp8 else 16, triton.next_power_of_2(k))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_pairs, block_experts, weights if weights is not None else out,
        a_scale if fp8 else out, w_scale if fp8 else out,
        n, k, out.shape[0], num_experts, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        TOP_K=top_k, A_PER_TOKEN=per_token, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PREC=dot_precision(out.dtype), FP8_SCALES=fp8, PROMOTE_K=min(128, block_k),
        num_warps=4, num_stages=3 if a.is_cuda else 1,
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              block_m: int | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k] -> [T, H]; see reference.

    Pairs are aligned to blocks of block_m rows (16 for small batches, where few pairs
    share an expert, else 64); the up GEMM writes [T*k, 2I], SiLU*mul halves it, the down
    GEMM scales each row by its routing weight, and the k rows of a token are summed.
    FP8 experts (w13 / w2 e4m3 with w13_scale [E, 2I] and w2_scale [E, H] float32): x is
    quantized per token, and the SiLU*mul kernel quantizes its output per pair.
    """
    from kiln.kernels.silu_mul import act_mul_quant, silu_and_mul

    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    assert x.stride(-1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    fp8 = w13.dtype == FP8
    assert not fp8 or (w13_scale is not None and w2_scale is not None), "FP8 experts need scales"
    pairs = tokens * top_k
    if block_m is None:
        block_m = 16 if pairs <= 4 * w13.shape[0] else 64
    sorted_pairs, block_experts = align_by_expert(topk_ids, w13.shape[0], block_m)
    up = torch.empty(pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    routing = topk_weights.reshape(-1).float().contiguous()
    down = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    if fp8:
        from kiln.kernels.fp8_quant import quantize_fp8_per_token

        x_q, x_scale = quantize_fp8_per_token(x)
        _grouped_gemm(x_q, w13, up, sorted_pairs, block_experts, None, top_k, True, block_m,
                      x_scale, w13_scale)
        act = act_mul_quant(up, FP8Quant())
        _grouped_gemm(act.q, w2, down, sorted_pairs, block_experts, routing, top_k, False,
                      block_m, act.scale, w2_scale)
    else:
        _grouped_gemm(x, w13, up, sorted_pairs, block_experts, None, top_k, True, block_m)
        act = silu_and_mul(up) if x.is_cuda else ref.silu_and_mul(up)
        _grouped_gemm(act, w2, down, sorted_pairs, block_experts, routing, top_k, False,
                      block_m)
    return down.view(tokens, top_k, hidden).sum(dim=1)
