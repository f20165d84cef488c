"""16-bit decode GEMM (up to 16 rows) in Triton, split-K finished in the kernel. Opt-in
(KILN_TRITON_GEMV=1) until measured on a GPU.

In a batch-1 bf16 decode step on an H200 cuBLAS reads the weights at ~90% of the copy
bandwidth for the big projections but only ~3.1-3.2 TB/s for QKV and O, and adds a
split-K reduce kernel after two of the four GEMMs of every layer (64 launches a step of
the ~10 a layer that batch 1 pays for: BENCHMARKS.md, eleventh session). This kernel is
the same tile as the FP8 decode GEMM (kiln.kernels.fp8): 16 rows (the step's 1-16 real
ones) x BLOCK_N weight rows a program, tl.dot per K step, SPLIT_K programs a tile whose
partials the last one adds in split order (kiln.kernels.split_k): one launch a GEMM. It
is also where the RMSNorm / SiLU*mul before a projection can move into the prologue.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.silu_mul import _act_mul
from kiln.kernels.split_k import decode_split, finish_rows, num_sms, split_k_buffers

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ROWS = 16


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                 stride_xm, stride_wn, stride_om,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 INTERPRET: tl.constexpr, ACT: tl.constexpr = 0):
    """out[:M, n block] = x[:M] @ w[n block]^T (+ bias). SPLIT_K > 1: program_id(1) takes
    the SPLIT_K-th part of K it names (K a multiple of SPLIT_K * BLOCK_K).
    ACT 1 (SiLU) / 2 (tanh GELU): x is a gate_up projection's output [M, 2K] and the
    input is act(gate) * up, made as the SiLU*mul kernel makes it (the same rounding), so
    the down projection needs no kernel before it."""
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = tl.cdiv(K, SPLIT_K)
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        if EVEN_K:
            x_mask = mask_m[:, None]
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < K
            x_mask = mask_m[:, None] & mask_k[None, :]
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0.0)
        if ACT > 0:
            x = _act_mul(x_rows, (k + offs_k)[None, :], x_mask, K, ACT == 2)
        else:
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=x_mask, other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    finish_rows(acc, part_ptr, count_ptr, bias_ptr, out_ptr, pid_n, offs_m, offs_n, M, N,
                stride_om, SPLIT_K, HAS_BIAS, INTERPRET)


@dataclass(frozen=True)
class GatedAct:
    """act(gate) * up of a gate_up output [..., 2I] = [gate | up], left for the down
    projection's GEMM to make as it reads it (gelu: the tanh GELU, else SiLU)."""
    gate_up: torch.Tensor
    gelu: bool = False


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


def gemv_enabled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """KILN_TRITON_GEMV=1, a CUDA 16-bit weight, and at most MAX_ROWS rows."""
    if isinstance(x, GatedAct):
        x = x.gate_up
    return os.environ.get("KILN_TRITON_GEMV", "0") == "1" and x.is_cuda and \
        weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype and \
        x.numel() // x.shape[-1] <= MAX_ROWS


def gemv_config(M: int, N: int, K: int, device: torch.device, sms: int | None = None
                ) -> GemvConfig:
    """First choices, not tuned on a GPU yet (the FP8 decode tile's shape): 32 weight
    rows x 256 inputs a step, K split until there are about two programs an SM.
    KILN_GEMV_LAUNCH="block_n,block_k,split_k,warps,stages" overrides them."""
    override = os.environ.get("KILN_GEMV_LAUNCH")
    if override:
        bn, bk, split, warps, stages = (int(v) for v in override.split(","))
        if K % (split * bk) == 0 or split == 1:
            return GemvConfig(bn, bk, split, warps, stages)
    block_n, block_k = 32, min(256, triton.next_power_of_2(K))
    split = decode_split(triton.cdiv(N, block_n), K, block_k, sms or num_sms(device))
    return GemvConfig(block_n, block_k, split)


def gemv_linear(x: torch.Tensor | GatedAct, weight: torch.Tensor,
                bias: torch.Tensor | None = None, cfg: GemvConfig | None = None
                ) -> torch.Tensor:
    """x [..., K] (at most 16 rows) @ weight [N, K]^T (+ bias) -> [..., N] in x's dtype;
    x a GatedAct: its product made on the fly (K = I)."""
    act = 0
    if isinstance(x, GatedAct):
        act, x = 2 if x.gelu else 1, x.gate_up
        lead, K = x.shape[:-1], x.shape[-1] // 2
        x2 = x.reshape(-1, 2 * K)
    else:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], weight.shape[0]
    assert M <= MAX_ROWS and weight.stride(-1) == 1, (M, weight.stride())
    cfg = cfg or gemv_config(M, N, K, x.device)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*lead, N)
    tiles = triton.cdiv(N, cfg.block_n)
    split = cfg.split_k if K % (cfg.split_k * cfg.block_k) == 0 else 1
    part, counters = split_k_buffers(split, M, N, tiles, out)
    _gemv_kernel[(tiles, split)](
        x2, weight, bias if bias is not None else out, out, part, counters, M, N, K,
        x2.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, HAS_BIAS=bias is not None,
        EVEN_K=K % (split * cfg.block_k) == 0, IEEE=x.dtype == torch.float32,
        INTERPRET=_INTERPRET, ACT=act, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*lead, N)
