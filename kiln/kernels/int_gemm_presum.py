"""x's sums over each K step of the int4 tiles, taken once per call before the GEMM
(IntGemmConfig.presum): the factored / magic tiles add offset * sum(x) for each step, and
without this every column tile of the weight sums the same x again (a reduction, or a
tl.dot with ones: sum_dot). Here one small launch writes them, float32 [M, K / BLOCK_K],
and each tile loads its step's BLOCK_M of them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _step_sums_kernel(x_ptr, out_ptr, K, STEPS, stride_xm, stride_om,
                      BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[m, s] = sum of x[m, s * BLOCK_K : (s + 1) * BLOCK_K] in float32, BLOCK_S steps a
    program (columns past K read as zeros)."""
    m = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = offs_s[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    x = tl.load(x_ptr + m * stride_xm + offs_k, mask=(offs_k < K) & (offs_s < STEPS)[:, None],
                other=0.0)
    tl.store(out_ptr + m * stride_om + offs_s, tl.sum(x.to(tl.float32), axis=1),
             mask=offs_s < STEPS)


def step_sums(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """x [M, K] (unit column stride) -> float32 [M, cdiv(K, block_k)]: each K step's sum."""
    M, K = x.shape
    steps = triton.cdiv(K, block_k)
    out = torch.empty(M, steps, dtype=torch.float32, device=x.device)
    per = max(1, min(triton.next_power_of_2(steps), 4096 // block_k))
    _step_sums_kernel[(M, triton.cdiv(steps, per))](
        x, out, K, steps, x.stride(0), out.stride(0), BLOCK_K=block_k, BLOCK_S=per,
        num_warps=4)
    return out
