"""FP8 W8A8 linear for decode rows (M <= 64) with the operands swapped: the weight's rows
are the tensor core's M, the tokens its N.

    out^T[n, m] = sum_k w_q[n, k] * x_q[m, k],  y[m, n] = out^T[n, m] * x_scale[m] * w_scale[n]

kiln.kernels.fp8's decode tile puts the (padded) tokens in the MMA's 16 rows, so on Hopper
it runs on mma.sync, which takes fp8 operands only after widening them to f16 in
registers: every weight byte is converted and moved through registers. Swapped, a
[BLOCK_W, BLOCK_K] weight tile is the A operand of a 64-row wgmma, read from shared memory
as it arrived (fp8 into the tensor core, no conversion), and the tokens pad to the B
tile's BLOCK_T (16, 32 or 64: all of M in one tile); the issue slots saved go to a deeper
pipeline of weight tiles. cuBLAS's own skinny GEMMs take this layout (its bf16 decode
GEMVs on the H200: 128 weight rows x 8 tokens, 12 stages). The sums, the scales (x's
first, then w's, as _fp8_epilogue) and split-K (kiln.kernels.split_k) are the unswapped
kernel's; only the order of the tensor core's partial sums differs, and Hopper's fp8
wgmma sums in reduced precision between promotions (PROMOTE_K), as _scaled_mm does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from kiln.kernels.fp8_quant import _INTERPRET, _fp8_epilogue
from kiln.kernels.split_k import split_k_counters, split_k_fixup

ENABLED = os.environ.get("KILN_FP8_SWAP", "1") != "0"  # 0: the unswapped decode tile
_WGMMA: dict[int, bool] = {}


def wgmma_device(t: torch.Tensor) -> bool:
    """Whether t's GPU runs the swapped launches as measured: Hopper or datacenter
    Blackwell (sm_90 / sm_100: 64-row fp8 MMAs from shared memory, 227 KB of it); not
    under the interpreter, not on sm_89 / sm_120 (about 100 KB of shared memory), not
    with KILN_FP8_SWAP=0."""
    if not ENABLED or not t.is_cuda or _INTERPRET:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _WGMMA:
        _WGMMA[index] = torch.cuda.get_device_capability(index)[0] in (9, 10)
    return _WGMMA[index]


@triton.jit(do_not_specialize=["M"])
def _fp8_swap_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                     M, N, K, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                     PROMOTE_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """acc[BLOCK_W weight rows, BLOCK_T tokens] over the program's share of K (program_id(1)
    of SPLIT_K), then out[token, row] = acc * x_scale[token] * w_scale[row] (+ bias[row]).
    x [M, K] e4m3fn with per-row scales xs [M]; w [N, K] e4m3fn with scales ws [N]; M <=
    BLOCK_T (all tokens in one tile)."""
    pid_w = tl.program_id(0)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_w = offs_w < N
    mask_t = offs_t < M
    w_rows = w_ptr + offs_w.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xm
    if PDL:
        gdc_wait()  # x and its scales come from the kernel before

    acc = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
    k_len = K // SPLIT_K
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        if EVEN_K:
            if EVEN_N:
                w = tl.load(w_rows + (k + offs_k)[None, :])
            else:
                w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_w[:, None], other=0.0)
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=mask_t[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < K
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_w[:, None] & mask_k[None, :],
                        other=0.0)
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=mask_t[:, None] & mask_k[None, :],
                        other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=PROMOTE_K)

    if SPLIT_K > 1:
        acc, last = split_k_fixup(acc, part_ptr, count_ptr, pid_w,
                                  offs_t.to(tl.int64)[None, :] * N + offs_w[:, None],
                                  mask_w[:, None] & mask_t[None, :], M * N, offs_w, SPLIT_K,
                                  INTERPRET)
    else:
        last = True
    if last:  # QUANT_NONE with per-row x scales, on [tokens, weight rows]
        _fp8_epilogue(tl.trans(acc), None, xs_ptr, ws_ptr, bias_ptr, out_ptr, offs_t, offs_w,
                      mask_t, mask_w, stride_om, 0, True, HAS_BIAS)


def swap_constexprs(block_t: int, block_w: int, block_k: int, split_k: int, M: int, N: int,
                    K: int, has_bias: bool, pdl_ok: bool, interpret: bool) -> dict:
    """_fp8_swap_kernel's compile-time arguments (also what compile checks use)."""
    block_k = min(block_k, max(32, triton.next_power_of_2(K)))
    split = split_k if K % (split_k * block_k) == 0 else 1
    assert M <= block_t, "the swapped FP8 GEMM takes all tokens in one tile"
    return dict(HAS_BIAS=has_bias, BLOCK_W=block_w, BLOCK_T=block_t, BLOCK_K=block_k,
                EVEN_K=K % block_k == 0, EVEN_N=N % block_w == 0,
                PROMOTE_K=min(128, block_k), SPLIT_K=split, PDL=pdl_ok and not interpret,
                INTERPRET=interpret)


def swap_fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                    weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                    block_t: int, block_w: int, block_k: int, num_warps: int, num_stages: int,
                    split_k: int, pdl_ok: bool, interpret: bool) -> torch.Tensor:
    """out [M, N] (M <= block_t) = the swapped GEMM of an already quantized x_q [M, K] (per-row
    scales x_scale [M, 1]) and weight [N, K] e4m3fn with weight_scale [N]."""
    M, K = x_q.shape
    N = weight.shape[0]
    meta = swap_constexprs(block_t, block_w, block_k, split_k, M, N, K, bias is not None,
                           pdl_ok, interpret)
    tiles = triton.cdiv(N, block_w)
    split = meta["SPLIT_K"]
    part = torch.empty(split, M, N, dtype=torch.float32, device=out.device) \
        if split > 1 else out
    _fp8_swap_kernel[(tiles, split)](
        x_q, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out,
        part, split_k_counters(out.device, tiles) if split > 1 else weight_scale, M, N, K,
        x_q.stride(0), weight.stride(0), out.stride(0), **meta, num_warps=num_warps,
        num_stages=num_stages, **({"launch_pdl": True} if meta["PDL"] else {}))
    return out
