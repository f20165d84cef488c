"""INT8 W8A8 GEMM with the scaling epilogue in the kernel (SmoothQuant engines, decode
batches and prefill): the int32 tile of sum_k x_q[m, k] * w_q[n, k] never leaves registers.

    y[m, n] = (float(acc[m, n]) * x_scale[m]) * w_scale[n] (+ bias[n]), in x's dtype

Beside it the default path is torch._int_mm, which writes the int32 product [M, N] to
memory, then kernels.int8_act's epilogue reads it back: 8 bytes an output element moved
for nothing. At 512 rows of Llama-3.1-8B that is ~176 MB a layer (~40 us at the copy
bandwidth) beside GEMMs of ~300 us at cuBLAS's int8 rate, plus a launch a linear.

Bits: the integer sums are exact (|q| <= 127, so K up to 133,000 fits int32), and the
epilogue is _scale_int8_kernel's arithmetic in its order without fused multiply-adds,
so the output is the default path's to the bit.

Tiles: a wgmma of BLOCK_M x BLOCK_N x BLOCK_K int8 (s8 . s8 -> s32 on Hopper), the K loop
software-pipelined over `num_stages` cp.async buffers, programs ordered in groups of
GROUP_M row tiles so a band of weight columns is read from L2 by each of them. Rows and
columns past M / N are loaded from rows / columns M / N back (offs % M: no masks in the K
loop) and not stored. (Until the 37th session they were all row 0: a partial band of
128-row tiles was far slower than a full one, H200, gate_up 134.4 us at 296 rows against
81.7 at 384, every program of the band reading one line of x ~88 times a K step.) Where
the tiles are too few for two programs an SM (o and down at decode batches),
K is split: each split stores its int32 partials and the last to arrive adds them in
split order (kernels.split_k), still exact, then runs the epilogue.

The default on Hopper from 2 rows on (one row keeps the dp4a GEMV; KILN_INT8_GEMM=torch
for _int_mm + epilogue, =triton on other GPUs); benchmarks/int8_gemm_bench.py times it
against _int_mm + epilogue, bf16 and FP8 at the 8B shapes. int8_linear at the end is where
CUDA W8A8 linears choose among the routes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kiln.kernels import int8_act, int8_gemv, num_sms
from kiln.kernels.reference_quant import Int8Act
from kiln.kernels.split_k import split_k_counters, split_k_fixup

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Int8GemmConfig:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1  # K split over this many programs a tile (int32 partials, summed exactly)

    @property
    def smem_bytes(self) -> int:
        return (self.block_m + self.block_n) * self.block_k * self.num_stages


def gemm_config(M: int, N: int, K: int, sms: int = 132) -> Int8GemmConfig:
    """Tiles by row count, from the 35th / 36th sessions' H200 sweeps at the 8B shapes
    (benchmarks/int8_gemm_bench.py; BENCHMARKS.md): 16-row tiles (mma.sync) up to 16 rows,
    32-row ones up to 32,
    128 columns wide where the 64-wide ones would be more than two an SM (gate_up); from
    128 rows, 128 x 128 x 128 tiles on 4 warps, three stages, where they are at least 1.5
    an SM (gate_up at 512 rows: 107 us against 122 on 8 warps), else 64-row ones. Small
    tiles let two or three programs share an SM so one's products run while another
    waits (Triton 3.6 does not pipeline integer wgmma within one). K is split where the
    tiles are too few: at 16-row tiles until two programs an SM (>= 1024 of K a split),
    at 64-row ones until one (>= 3072: at 64 rows down's K split 4 ways took 29 us against
    43, o's 2 ways 16 against 14). sms: the GPU's multiprocessors (an H100 / H200 SXM's
    132 by default; int8_scaled_mm passes the device's)."""
    if M <= 32:
        # 17-32 rows: 32-row tiles, K split only to one program an SM (36th, 24 / 32 rows:
        # a layer 76 us against 97 for _int_mm + the epilogue; down split 2 ways 22 vs 34)
        rows = 16 if M <= 16 else 32
        cfg = Int8GemmConfig(rows, 128, 128, 1, 4, 4) if triton.cdiv(N, 64) > 2 * sms else \
            Int8GemmConfig(rows, 64, 256, 1, 4, 4)
        per_sm, min_k = (2 if M <= 16 else 1), 1024
    else:
        big = M >= 128 and triton.cdiv(M, 128) * triton.cdiv(N, 128) * 2 >= 3 * sms
        # 64-row tiles: four stages (96 KB, two programs an SM) while that is one wave,
        # else three (72 KB, three an SM): qkv at 512 rows, 384 tiles, 23 us against 31
        tiles = triton.cdiv(M, 64) * triton.cdiv(N, 128)
        cfg = Int8GemmConfig(128, 128, 128, 8, 4, 3) if big else \
            Int8GemmConfig(64, 128, 128, 8, 4, 4 if tiles <= 2 * sms else 3)
        per_sm, min_k = 1, 3072
    tiles, split = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), 1
    while tiles * split * 2 <= per_sm * sms and K // (split * 2) >= min_k:
        split *= 2
    return replace(cfg, split_k=split)


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, part_ptr,
                      count_ptr, M, N, K, stride_x, stride_w, stride_out,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # past M / N: distinct rows / columns (one line of
    cols = (offs_n % N).to(tl.int64)  # x read by every row past M was a hot spot)
    steps = tl.cdiv(K, BLOCK_K)  # this split's K steps: [first, last)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, steps)
    x_tile = x_ptr + rows[:, None] * stride_x + first * BLOCK_K + offs_k[None, :]
    w_tile = w_ptr + cols[:, None] * stride_w + first * BLOCK_K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(first, last):
        if EVEN_K:
            a = tl.load(x_tile)
            b = tl.load(w_tile)
        else:
            in_k = offs_k[None, :] < K - k * BLOCK_K
            a = tl.load(x_tile, mask=in_k, other=0)
            b = tl.load(w_tile, mask=in_k, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_tile += BLOCK_K
        w_tile += BLOCK_K

    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    done = True
    if SPLIT_K > 1:  # the last split of the tile adds the others' int32 partials, exactly
        acc, done = split_k_fixup(acc, part_ptr, count_ptr, pid,
                                  offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], mask,
                                  M * N, offs_n, SPLIT_K, INTERPRET)
    if done:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def int8_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   config: Int8GemmConfig | None = None) -> torch.Tensor:
    """x_q int8 [>= M, K] (its first M rows: x_scale's), x_scale float32 [M, 1], weight int8
    [N, K], weight_scale float32 [N] -> [M, N] in dtype: int8_act.scale_int8_product(
    torch._int_mm(x_q, weight.t()), ...) to the bit, without the int32 product in memory."""
    M, (N, K) = x_scale.shape[0], weight.shape
    if x_q.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("the scaled GEMM wants x_q and weight contiguous along K")
    if x_q.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"the scaled GEMM takes int8 x_q and weight, not "
                         f"{x_q.dtype} and {weight.dtype}")
    out = torch.empty(M, N, dtype=dtype, device=x_q.device)
    if M == 0 or N == 0:
        return out
    cfg = config or gemm_config(M, N, K, num_sms(x_q.device))
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    part = count = out  # not read with one split
    if cfg.split_k > 1:
        part = torch.empty(cfg.split_k, M * N, dtype=torch.int32, device=x_q.device)
        count = split_k_counters(x_q.device, tiles)
    _int8_gemm_kernel[(tiles, cfg.split_k)](
        x_q, x_scale, weight, weight_scale, weight_scale if bias is None else bias, out, part,
        count, M, N, K, x_q.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=K % cfg.block_k == 0,
        SPLIT_K=cfg.split_k, INTERPRET=_INTERPRET, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=False)
    return out


def int8_linear(x: torch.Tensor | Int8Act, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 on CUDA, x [M, K] -> [M, N] in x's dtype: x quantized per token by one kernel
    (int8_act; an Int8Act comes quantized by the RMSNorm / SiLU-mul before, the same
    numbers), then the int32 sums by one of three routes, all the same integers, and the
    scaling (one kernel; KILN_INT8_FUSED=0 in kiln.functional runs the torch chain
    instead, the same bits: H200, int8_sq 500 x 1000/1000, 10,948 vs 7,152 out tok/s):
    - one row: dp4a on the CUDA cores (int8_gemv) instead of _int_mm padded to 17 rows,
      H200 8B shapes 67.7 vs 88.0 us a layer. KILN_INT8_GEMV=0: never; =1: up to 16 rows
      (at 4 rows _int_mm wins qkv and gate_up, at 16 every shape);
    - from 2 rows on a Hopper GPU, this module's GEMM with the scaling inside it (H200,
      8B shapes, a layer at 4 / 64 / 256 / 1024 / 4096 rows: 73 / 90 / 132 / 338 / 1453
      us against 96 / 103 / 219 / 630 / 2283; 32-row tiles at 17-32 rows, 76 against 97
      at 24; 33-48 rows since the 37th session's fix of rows past M: 87.8 against 101.4
      at 48, 296 rows 159.7 against 289.9). KILN_INT8_GEMM=torch: never; =triton: on any
      CUDA GPU (untimed off Hopper);
    - else torch._int_mm (rows padded to 17) and int8_act's epilogue."""
    M = x.shape[0]
    gemv = os.environ.get("KILN_INT8_GEMV", "")
    if M == 1 and gemv != "0" or 0 < M <= int8_gemv.MAX_ROWS and gemv == "1":
        x_q, x_scale = _quantized(x)
        acc = int8_gemv.int8_gemv(x_q, weight)
    elif _fused_gemm(x.device):
        x_q, x_scale = _quantized(x)
        return int8_scaled_mm(x_q, x_scale, weight, weight_scale, bias, x.dtype)
    else:
        x_q, x_scale = _quantized(x, rows=17)
        acc = torch._int_mm(x_q, weight.t())
    return int8_act.scale_int8_product(acc, x_scale, weight_scale, bias, x.dtype)


def _quantized(x: torch.Tensor | Int8Act, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q [>= rows, K], x_scale [M, 1]): x quantized per token, or an Int8Act's (its q
    padded with rows of zeros, never read, to `rows`)."""
    if not isinstance(x, Int8Act):
        return int8_act.quantize_int8_per_token(x.contiguous(), rows or None)
    pad = rows - x.q.shape[0]
    return (torch.nn.functional.pad(x.q, (0, 0, 0, pad)) if pad > 0 else x.q), x.scale


def _fused_gemm(device: torch.device) -> bool:
    """int8_linear's choice of this module's GEMM (KILN_INT8_GEMM read each call, as tests
    and benchmarks switch it)."""
    choice = os.environ.get("KILN_INT8_GEMM", "")
    if choice in ("torch", "0"):
        return False
    return choice == "triton" or _is_hopper(device.index)


@functools.cache
def _is_hopper(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9
