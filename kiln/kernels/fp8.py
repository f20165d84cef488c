"""FP8 (e4m3fn) W8A8 linear layers: activation quantization and the scaled GEMM.

    y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])

x_q = e4m3fn(clamp(x / x_scale, +-448)), x_scale per token (dynamic: max(amax(|x_m|),
1e-6) / 448) or one static [1] scale; w_q [N, K] e4m3fn with w_scale [N] float32.
The quantization matches kiln.kernels.reference bit for bit on the device it runs on:
x / scale is the correctly rounded float32 quotient, the e4m3 conversion rounds to
nearest even, and the dynamic scale is rounded the way torch rounds `amax / 448` there
(see _quantize_values and _dynamic_scale). The products x_q * w_q are exact in float32.

fp8_linear picks one of two GEMM backends by shape (_use_scaled_mm: M > 64 tokens),
from H200 measurements that `python benchmarks/fp8_gemm.py --sweep` repeats:

* M <= 64 (decode): Triton kernels. On Hopper mostly kiln.kernels.fp8_swap (the
  weight's rows as a 64-row fp8 wgmma's M, the tokens padded to 16 / 32 / 64; see
  gemm_config for where); else _fp8_gemm_kernel, tiles of 16 rows (mma.sync, fp8 widened
  to f16, float32 sums) or 64 (fp8 wgmma) up to 64 tokens, 32 weight rows a program, K
  split where long (kiln.kernels.split_k). x comes
  quantized from the fused RMSNorm / SiLU*mul kernels, or from _quant_kernel (launched
  before the GEMM with programmatic dependent launch). At 1-16 tokens 1.25-1.9x faster
  than _scaled_mm, 1.2-1.55x faster than bf16 F.linear on the same shapes.
* M > 64: torch._scaled_mm on x_q from _quant_kernel (rowwise scales, bf16/fp16/fp32
  out; at 65-192 rows tensorwise plus a scale kernel, kiln.kernels.fp8_mid): up to 1.6x
  faster than the Triton kernel's large tiles. (The kernel can also quantize x itself,
  but slower: see GemmConfig.fuse_quant.)

Everything is CUDA-graph safe: launches depend only on shapes, no value is read on the
host. Under TRITON_INTERPRET=1 (CPU tests) the kernels follow the CPU reference (see
_dynamic_scale) and round e4m3 with integer arithmetic, since the interpreter's own
float -> fp8 conversion rounds ties away from zero; compiled, they use the hardware
conversion (cvt.rn.satfinite.e4m3x2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from kiln.kernels import fp8_mid, fp8_swap, pdl
from kiln.kernels.fp8_quant import (  # noqa: F401 -- the quantizers are part of this API
    _INTERPRET,
    FP8,
    FP8_MAX,
    QUANT_DYNAMIC,
    QUANT_NONE,
    QUANT_STATIC,
    FP8Act,
    _dynamic_scale,
    _fp8_epilogue,
    _pad_rows,
    _quant_kernel,
    _quantize,
    _quantize_values,
    quantize_fp8_per_token,
    quantize_fp8_static,
)
from kiln.kernels.split_k import grouped_tile, split_k_counters, split_k_fixup

# ---- GEMM -----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                     M, N, K, stride_xm, stride_wn, stride_om,
                     QUANT: tl.constexpr, XS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, AMAX_BLOCK: tl.constexpr,
                     PROMOTE_K: tl.constexpr, ROWS: tl.constexpr, PREFETCH: tl.constexpr,
                     PDL: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    """out[BLOCK_M, BLOCK_N] tile = (x_q @ w_q^T) * x_scale * w_scale (+ bias).

    QUANT_NONE: x is e4m3fn, x scales in xs_ptr ([M] with XS_PER_ROW, else [1]).
    QUANT_DYNAMIC / QUANT_STATIC: x is 16/32-bit and each program quantizes its rows
    itself (dynamic: the rows' amax first, over the whole of K; static: xs_ptr[0]),
    exactly as _quant_kernel does. ROWS > 0 (all of M <= ROWS rows in one tile, decode):
    only those ROWS rows are loaded and quantized, then padded with zeros to the dot's
    16 rows; otherwise the whole BLOCK_M tile is quantized in the dot's operand layout,
    which repeats the work in every warp. w [N, K] row-major e4m3fn, enters the dot
    transposed (K-major, as the fp8 tensor-core instructions want both operands).
    PROMOTE_K: fp8 products are summed by the tensor core at most PROMOTE_K deep before
    being added to the float32 accumulator (Hopper's fp8 wgmma accumulates with a shorter
    mantissa). PREFETCH: bytes of each of the program's weight rows asked into L2 first
    thing, so the weight streams while the program waits (PDL: for the quantize kernel
    this one was launched behind) or computes the rows' amax.
    SPLIT_K > 1 (QUANT_NONE only): program_id(1) takes the SPLIT_K-th part of K it names (K a
    multiple of SPLIT_K * BLOCK_K), and the tile is finished by split_k_fixup.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if GROUP_M == 1:
        pid_m = pid % num_m
        pid_n = pid // num_m
    else:
        pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if PREFETCH > 0:
        lines = w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * stride_wn \
            + tl.arange(0, PREFETCH // 128)[None, :] * 128
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines],
                                  dtype=tl.int32, is_pure=False, pack=1)
    if PDL:
        gdc_wait()  # x and its scales come from the kernel before

    if ROWS > 0:
        offs_m = tl.arange(0, ROWS)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    if QUANT == 1:
        if ROWS > 0:
            offs_a = tl.arange(0, AMAX_BLOCK)
            amax = tl.zeros([ROWS], dtype=tl.float32)
            for k in range(0, K, AMAX_BLOCK):
                v = tl.load(x_rows + (k + offs_a)[None, :],
                            mask=mask_m[:, None] & ((k + offs_a) < K)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
        else:  # amax of each valid row, one row at a time (rows past M cost nothing)
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            offs_a = tl.arange(0, AMAX_BLOCK)
            rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
            for r in range(0, rows):
                row_ptr = x_ptr + (pid_m * BLOCK_M + r).to(tl.int64) * stride_xm
                row_max = tl.zeros([AMAX_BLOCK], dtype=tl.float32)
                for k in range(0, K, AMAX_BLOCK):
                    v = tl.load(row_ptr + k + offs_a, mask=k + offs_a < K, other=0.0)
                    row_max = tl.maximum(row_max, tl.abs(v.to(tl.float32)))
                amax = tl.where(tl.arange(0, BLOCK_M) == r, tl.max(row_max, axis=0), amax)
        x_scale, x_inv = _dynamic_scale(amax, INTERPRET)
        x_scale_2d = x_scale[:, None]
        x_inv_2d = x_inv[:, None]
    elif QUANT == 2:
        x_scale = tl.load(xs_ptr)
        x_inv = tl.div_rn(1.0, x_scale)
        x_scale_2d = x_scale
        x_inv_2d = x_inv
    else:
        x_scale = 0.0  # read in the epilogue

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = K // SPLIT_K
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < K
            x = tl.load(x_rows + (k + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0.0)
        if QUANT != 0:
            x = _quantize_values(x.to(tl.float32), x_scale_2d, x_inv_2d, INTERPRET)
        if ROWS > 0:
            x = _pad_rows(x, ROWS, BLOCK_M)
        acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=PROMOTE_K)

    if ROWS > 0:  # back to the tile's rows (the padding rows of acc are zeros)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if QUANT == 1:
            x_scale = _pad_rows(x_scale[:, None], ROWS, BLOCK_M).reshape(BLOCK_M)
    if SPLIT_K == 1:
        _fp8_epilogue(acc, x_scale, xs_ptr, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m,
                      mask_n, stride_om, QUANT, XS_PER_ROW, HAS_BIAS)
    else:
        acc, last = split_k_fixup(acc, part_ptr, count_ptr, pid_m * num_n + pid_n,
                                  offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                                  mask_m[:, None] & mask_n[None, :], M * N, offs_n, SPLIT_K,
                                  INTERPRET)
        if last:
            _fp8_epilogue(acc, x_scale, xs_ptr, ws_ptr, bias_ptr, out_ptr, offs_m, offs_n,
                          mask_m, mask_n, stride_om, QUANT, XS_PER_ROW, HAS_BIAS)


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of _fp8_gemm_kernel.

    fuse_quant: x is quantized inside the GEMM (one launch), else by _quant_kernel first;
    never picked (H200, M = 1: 27-213 us against 10-37 for the two launches).
    pdl: launched behind _quant_kernel with programmatic dependent launch. prefetch: bytes
    of each weight row asked into L2 first. promote_k: PROMOTE_K of _fp8_gemm_kernel.
    split_k: programs a tile's K is split over (split_k_fixup sums them; used where K
    divides into split_k * block_k and x comes quantized, else 1).
    swap (M <= block_m): kiln.kernels.fp8_swap, block_n weight rows as the wgmma's M."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fuse_quant: bool = False
    group_m: int = 1
    promote_k: int = 128
    prefetch: int = 0
    pdl: bool = False
    split_k: int = 1
    swap: bool = False

    def tag(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}"
                f"s{self.num_stages}{'F' if self.fuse_quant else ''}"
                f"{f'k{self.split_k}' if self.split_k > 1 else ''}"
                f"{f'g{self.group_m}' if self.group_m > 1 else ''}"
                f"{f'p{self.prefetch}' if self.prefetch else ''}{'L' if self.pdl else ''}"
                f"{'S' if self.swap else ''}")


def gemm_config(M: int, N: int, K: int, swap_ok: bool = False) -> GemmConfig:
    """The Triton launch for an [M, K] x [N, K]^T product (H200, Llama-3.1-8B shapes), used
    up to M = 64 (_use_scaled_mm); above, the fallback for what _scaled_mm cannot take.
    swap_ok: the device takes fp8_swap's launches (fp8_swap.wgmma_device)."""
    if swap_ok and M <= 64 and N % 64 == 0 and K % 128 == 0:  # fp8_swap (27th / 28th)
        # `fp8_gemm.py --grid --swap` (whole tiles only, as measured), us:
        # M = 1 / 16: QKV 8.90 / 8.87 vs 10.31 / 10.56, O 8.12 / 8.09 vs 8.30 / 8.65,
        # gate-up 30.32 / 31.37 vs 30.73 / 32.30, LM head (128256 rows, 6 stages) 121.9 /
        # 127.4 vs 126.1 / 129.3; the down projection (K 14336) keeps the split-K tile
        # below (19.0 vs 19.8). M = 32 (32-token tiles): QKV 9.03 vs 13.11, O 8.50 vs
        # 10.77, down 22.19 vs 30.05, gate-up 32.03 vs 32.58; M = 64: QKV 10.42 vs 13.35,
        # O 10.01 vs 11.16, down 27.57 vs 30.51, gate-up keeps the wide tile (33.80 vs 34.48).
        if M <= 16 and K < 8192:
            return GemmConfig(16, 64, 128, 4, 6 if N >= 65536 else 4 if N >= 16384 else 10,
                              pdl=True, swap=True)
        if 16 < M <= 32:
            return GemmConfig(32, 64, 128, 4, 4 if N >= 16384 else 10, pdl=True, swap=True)
        if 32 < M and N < 16384:
            return GemmConfig(64, 64, 128, 4, 10 if K >= 8192 else 8, pdl=True, swap=True)
    if M <= 16:  # mma.sync tiles of 16 rows, 32 weight rows per program
        # From `fp8_gemm.py --grid` (the GEMM alone on a quantized input, as the fused
        # RMSNorm / SiLU*mul kernels hand it over), M = 1 / 16, us:
        if N >= 16384:  # 3 stages: 30.9 / 32.2 vs 37.1 / 38.4 with a 2 KB L2 prefetch
            return GemmConfig(16, 32, 256, 4, 3, pdl=True)
        if K >= 8192:  # split-K over 2: 19.4 / 20.3 vs 23.5 / 23.6 in one
            return GemmConfig(16, 32, 512, 4, 3, pdl=True, split_k=2)
        return GemmConfig(16, 32, 256, 4, 4, pdl=True)  # 10.1 vs 10.7 us at 4096x4096
    if M <= 64:  # wgmma tiles of 64 rows
        if N >= 16384:  # wide tiles: 4x fewer programs re-read x (34.6 vs 46.9 us)
            return GemmConfig(64, 128, 128, 4, 4, group_m=8, pdl=True)
        if K >= 8192:
            return GemmConfig(64, 32, 256, 4, 4)
        return GemmConfig(64, 32, 256, 4, 4, prefetch=1024, pdl=True)
    if M <= 256:
        return GemmConfig(64, 128, 128, 4, 4, group_m=8, pdl=True)
    return GemmConfig(128, 128, 128, 8, 4, group_m=8, pdl=True)


def kernel_constexprs(cfg: GemmConfig, M: int, K: int, static: bool, has_bias: bool,
                      pdl_ok: bool = True) -> dict:
    """The compile-time arguments of _fp8_gemm_kernel for a launch (also what
    tests/test_kernels_fp8.py compiles for sm_90). pdl_ok: the device takes PDL (sm_90+;
    an sm_89 card has FP8 but no griddepcontrol)."""
    quant = (QUANT_STATIC if static else QUANT_DYNAMIC) if cfg.fuse_quant else QUANT_NONE
    rows = triton.next_power_of_2(M) if cfg.fuse_quant and cfg.block_m == 16 and M <= 16 else 0
    block_k = min(cfg.block_k, max(32, triton.next_power_of_2(K)))
    split_k = cfg.split_k if quant == QUANT_NONE and K % (cfg.split_k * block_k) == 0 else 1
    return dict(SPLIT_K=split_k,
        QUANT=quant, XS_PER_ROW=quant == QUANT_NONE, HAS_BIAS=has_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        EVEN_K=K % block_k == 0,
        AMAX_BLOCK=min(triton.next_power_of_2(K), 8192 // max(rows, 1)),
        PROMOTE_K=min(cfg.promote_k, block_k), ROWS=rows,
        PREFETCH=0 if _INTERPRET else min(cfg.prefetch, K // 128 * 128),
        PDL=cfg.pdl and not cfg.fuse_quant and not _INTERPRET and pdl_ok,
        INTERPRET=_INTERPRET)


def _input(x: torch.Tensor | FP8Act, input_scale: torch.Tensor | None,
           launch_dependents: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(x_q, per-row scale [M, 1], output dtype): x quantized here, or as it came (an
    FP8Act from the fused RMSNorm / SiLU-mul kernel, whose quantization is the same)."""
    if isinstance(x, FP8Act):
        return x.q, x.scale, x.dtype
    x_q, x_scale = _quantize(x, None if input_scale is None else input_scale.reshape(1).float(),
                             launch_dependents=launch_dependents)
    return x_q, x_scale, x.dtype


def triton_fp8_linear(x: torch.Tensor | FP8Act, weight: torch.Tensor,
                      weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None,
                      config: GemmConfig | None = None) -> torch.Tensor:
    """fp8_linear on the Triton kernel (config: the launch, default gemm_config)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = config or gemm_config(M, N, K, fp8_swap.wgmma_device(weight))
    swap = cfg.swap and M <= cfg.block_m
    if isinstance(x, FP8Act) or swap:
        cfg = replace(cfg, fuse_quant=False)
    elif x.stride(-1) != 1:
        x = x.contiguous()
    static = input_scale is not None
    if static:
        input_scale = input_scale.reshape(1).float()
    meta = kernel_constexprs(cfg, M, K, static, bias is not None,
                             pdl_ok=pdl.hopper(x.q if isinstance(x, FP8Act) else x))
    if cfg.fuse_quant:
        a, a_scale = x, input_scale
    else:
        a, a_scale, _ = _input(x, input_scale, launch_dependents=meta["PDL"])
    if swap:
        return fp8_swap.swap_fp8_linear(
            a, a_scale, weight, weight_scale, bias, out, cfg.block_m, cfg.block_n, cfg.block_k,
            cfg.num_warps, cfg.num_stages, cfg.split_k, meta["PDL"], _INTERPRET)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    split = meta["SPLIT_K"]
    part = torch.empty(split, M, N, dtype=torch.float32, device=out.device) \
        if split > 1 else out
    _fp8_gemm_kernel[(tiles, split)](
        a, a_scale if a_scale is not None else weight_scale, weight, weight_scale,
        bias if bias is not None else weight_scale, out, part,
        split_k_counters(out.device, tiles) if split > 1 else weight_scale, M, N, K,
        a.stride(0), weight.stride(0), out.stride(0), **meta,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"launch_pdl": True} if meta["PDL"] else {}))
    return out


def scaled_mm_fp8_linear(x: torch.Tensor | FP8Act, weight: torch.Tensor,
                         weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear on torch._scaled_mm with rowwise scales (x_q from _quant_kernel).
    bf16 and fp16 outputs come straight from it (float32 epilogue, bias in x's dtype);
    it takes no bias with a float32 output, so there the bias is added after."""
    N = weight.shape[0]
    x_q, x_scale, dtype = _input(x, input_scale)
    if fp8_mid.use(x_q.shape[0], N, x_q.shape[1]):  # 65-192 (256) rows: see fp8_mid
        return fp8_mid.tensorwise_fp8_linear(x_q, x_scale, weight, weight_scale, dtype, bias)
    fused_bias = bias is not None and dtype != torch.float32
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, N),
                         bias=bias.to(dtype) if fused_bias else None, out_dtype=dtype)
    if bias is not None and not fused_bias:
        y += bias.float()
    return y


def _use_scaled_mm(M: int, N: int, K: int) -> bool:
    """True where torch._scaled_mm beats the Triton kernel. H200, Llama-3.1-8B shapes, us
    per call with quantization (benchmarks/fp8_gemm.py): at M = 64 Triton takes 12.7-36.0
    and _scaled_mm 15.6-47.2; at M = 128 Triton's best 15.4-45.2 and _scaled_mm
    15.8-41.8 (ahead on 3 of 4 shapes); from M = 256 _scaled_mm is 1.3-1.6x faster.
    _scaled_mm needs N and K divisible by 16."""
    if N % 16 or K % 16:
        return False
    return M > 64


def fp8_linear(x: torch.Tensor | FP8Act, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """x [M, K] 16/32-bit @ weight [N, K] e4m3fn -> [M, N] in x.dtype; see the module doc.
    x may come quantized already (an FP8Act with the same scheme as input_scale says).

    backend: "triton" or "scaled_mm" to force one; None picks the faster for the shape.
    """
    M, K = x.shape
    if backend is None:
        backend = "scaled_mm" if _use_scaled_mm(M, weight.shape[0], K) else "triton"
    if backend == "scaled_mm":
        return scaled_mm_fp8_linear(x, weight, weight_scale, input_scale, bias)
    if backend != "triton":
        raise ValueError(f"unknown fp8_linear backend {backend!r}")
    return triton_fp8_linear(x, weight, weight_scale, input_scale, bias)
