"""W4A16 / W8A16 linear layers: integer weights dequantized in groups inside the K loop.

    y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),  w[n, k] = q[n, k] * s[n, g] + o[n, g]

with g = k // G (see kiln.kernels.reference for the storage: int8 [N, K], or two 4-bit
values a byte in uint8 [N, K // 2], even k in the low nibble; float32 scales and
optional offsets [N, K // G]). Each tile of w is dequantized in float32 (as the reference
does), cast to x's dtype, and multiplied with float32 accumulation, so the result is the
float GEMM of the dequantized weight up to the order of the sums. (The one-row GEMV and
the factored tiles, int8's default, apply scale and offset to sums of q x instead: the
same product without rounding w to x's dtype.)

Picked by the number of rows M (the launch: kiln.kernels.int_launch):
* M == 1: int4 in groups of 32 on Hopper, kiln.kernels.int4_gemv_tma (TMA-fed); int4
  with bfloat16 x, kiln.kernels.int_gemv_pairs; else kiln.kernels.int_gemv1 (32-bit words,
  integer-only unpacking, see there); opt-in
  (IntGemmConfig.digits, measured 2x slower), kiln.kernels.int_gemv_digits: integer dp4a
  products with x as three signed-byte digit planes.
* 2 <= M <= GEMV_ROWS (4): int4 with bfloat16 x, the pairs GEMV for all rows at once
  (kiln.kernels.int_gemv_pairs; the default at 2 rows, and at 3-4 where N <= 8192). Opt-in
  (KILN_INT_GEMVN): _gemv_kernel, split-K, each program's weight slab multiplied with all
  M rows on the CUDA cores, or the one-row kernel's reading for all rows at once
  (kiln.kernels.int_gemv_rows). Measured on an H200 at 4 rows (fifteenth session) both
  lose to 16-row tl.dot tiles: the plain GEMV by 6.7x (1,136 vs 170 us a layer: its
  products spill), the factored one by 1.1-1.4x.
* 5-255 rows, int4 on Hopper: kiln.kernels.int_wgmma (Gluon; at 33-64 and 129-255 rows
  gate_up and down only). 65-255 rows otherwise on a GPU: as from DEQUANT_ROWS, but int8
  per channel on x's digit planes, and grouped int8 where the 128 x 128 tiles fill the SMs
  (int_launch.dequant_first).
* 2 <= M < DEQUANT_ROWS (256; decode batches): _gemm_kernel, [BLOCK_M, BLOCK_N] tiles, each K
  step dequantizes a [BLOCK_N, BLOCK_K] tile of w and feeds it to tl.dot (int8 up to 64
  rows: K split when the tiles are few). int8 per channel from 17 rows, and at large N
  from 2: kiln.kernels.int_gemm_digits, the stored integers into int8 tl.dot with x as
  digit planes (IntGemmConfig.digits).
* larger M (prefill): dequantize_weight (_dequant_kernel) into a 16-bit scratch weight,
  then cuBLAS.
All are CUDA-graph safe: launches depend only on shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.int_gemm_digits import digits_tiles, digits_tiles_eligible
from kiln.kernels.int_gemv import (
    _dequant_tile,
    _dequant_words,
    _exponent_base,
    _gemv_kernel,
    _int_tile,
)
from kiln.kernels.int_gemv1 import _gemv1_kernel, gemv1  # noqa: F401  (compile checks)
from kiln.kernels.int_gemv_digits import digits_eligible, digits_gemv
from kiln.kernels.int_gemv_pairs import pairs_eligible, pairs_gemv, pairs_launch, word_aligned
from kiln.kernels.int_gemv_rows import launch_gemv_rows
from kiln.kernels.int_launch import (  # noqa: F401
    DEQUANT_ROWS,
    EVEN_GROUPS,
    GEMV_ROWS,
    GROUPED,
    IntGemmConfig,
    dequant_first,
    int_gemm_config,
    split_length,
    tma_gemv,
    wgmma_module,
    wgmma_takes,
)
from kiln.kernels.int_unpack import _magic_nibbles, _unpack_nibbles
from kiln.kernels.split_k import finish_tile, split_k_counters, tile_coords

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, K, G, stride_wn, stride_sn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                    HAS_OFFSET: tl.constexpr, GROUP_TILE: tl.constexpr):
    """out[n block, k block] = dequant(w) in out's dtype (out [N, K] contiguous): the tile
    the GEMM kernels multiply, rounded the same way."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    w = _dequant_tile(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn, mask_n,
                      BLOCK_K, BITS, HAS_OFFSET, GROUP_TILE)
    offs_k = k + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k < K)[None, :])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with float32 sums (acc None: none; IEEE: float32 inputs in full
    float32, not TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _along(v, ROWS: tl.constexpr):
    """A vector as a column of a 2-D tile (ROWS: along its rows, v[:, None]) or as a row
    (one return: a return inside a compile-time branch does not end the function)."""
    if ROWS:
        t = v[:, None]
    else:
        t = v[None, :]
    return t


@triton.jit
def _nibble_dots(acc, x_rows, w_ptr, s_ptr, o_ptr, offs_n, mask_m, mask_n, k, K, G,
                 stride_wn, stride_sn, BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 IEEE: tl.constexpr):
    """acc + x[:, k:k + BLOCK_K] @ w[offs_n, k:k + BLOCK_K]^T for int4 w whose K step lies
    in one group, as two products: even k (low nibbles) and odd k (high nibbles)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_p = k // 2 + tl.arange(0, HALF)
    mask_p = offs_p < K // 2
    packed = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_p[None, :],
                     mask=mask_n[:, None] & mask_p[None, :], other=0).to(tl.int32)
    s_offs = offs_n.to(tl.int64) * stride_sn + k // G
    scale = tl.load(s_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
    low, high = _unpack_nibbles(packed)
    low = low * scale
    high = high * scale
    if HAS_OFFSET:
        offset = tl.load(o_ptr + s_offs, mask=mask_n, other=0.0)[:, None]
        low = low + offset
        high = high + offset
    offs_k = k + tl.arange(0, BLOCK_K)
    x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                other=0.0)
    x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], HALF, 2)))
    low = low.to(x_even.dtype)
    high = high.to(x_even.dtype)
    return _dot(x_odd, tl.trans(high), _dot(x_even, tl.trans(low), acc, IEEE), IEEE)


@triton.jit
def _factored_dot(acc, x_rows, w_ptr, s_ptr, o_ptr, offs_n, mask_m, mask_n, k, K, G,
                  stride_wn, stride_sn, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr = False,
                  MAGIC: tl.constexpr = 0, INTERPRET: tl.constexpr = False,
                  SUM_DOT: tl.constexpr = False):
    """acc + x[:, k:k + BLOCK_K] @ w[offs_n, k:k + BLOCK_K]^T for a K step in one group:
    (x @ q^T) s + sum(x) o, q the stored integers (exact in x's dtype). SWAP: acc is the
    transposed [BLOCK_N, BLOCK_M] tile, q the left operand (see _gemm_kernel). MAGIC (int4;
    1: x bfloat16, 2: float16): q is read as BASE + q by bit operations (_magic_nibbles,
    BASE 128 or 1024), and the BASE sum(x) s its products carry comes off with the offset
    term. SUM_DOT: the sums of x over the step as a product with a tile of ones (tensor
    cores, the result in the accumulator's layout) instead of a reduction in registers."""
    offs_k = k + tl.arange(0, BLOCK_K)
    x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                other=0.0)
    if MAGIC:
        offs_p = k // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_p[None, :],
                         mask=mask_n[:, None] & (offs_p < K // 2)[None, :], other=0)
        low, high = _magic_nibbles(packed, MAGIC == 2, INTERPRET)
        q = tl.reshape(tl.join(low, high), (low.shape[0], BLOCK_K))  # even k low
    else:
        q = _int_tile(w_ptr, offs_n, k, K, stride_wn, mask_n, BLOCK_K, BITS).to(x.dtype)
    if SWAP:
        part = _dot(q, tl.trans(x), None, IEEE)
    else:
        part = _dot(x, tl.trans(q), None, IEEE)
    if SUM_DOT:  # the sums of x on the tensor cores, already broadcast along n
        ones = tl.full(q.shape, 1.0, x.dtype)
        if SWAP:
            x_sums = _dot(ones, tl.trans(x), None, IEEE)
        else:
            x_sums = _dot(x, tl.trans(ones), None, IEEE)
    elif HAS_OFFSET or MAGIC:
        x_sum = tl.sum(x.to(tl.float32), axis=1)
    s_offs = offs_n.to(tl.int64) * stride_sn + k // G
    scale = tl.load(s_ptr + s_offs, mask=mask_n, other=0.0)
    acc += part * _along(scale, SWAP)
    if HAS_OFFSET or MAGIC:
        offset = tl.zeros(scale.shape, dtype=tl.float32)
        if HAS_OFFSET:
            offset = tl.load(o_ptr + s_offs, mask=mask_n, other=0.0)
        if MAGIC:
            offset -= (1024.0 if MAGIC == 2 else 128.0) * scale
        if SUM_DOT:
            acc += _along(offset, SWAP) * x_sums
        elif SWAP:
            acc += offset[:, None] * x_sum[None, :]
        else:
            acc += x_sum[:, None] * offset[None, :]
    return acc


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                 M, N, K, G, stride_xm, stride_wn, stride_sn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GROUP_TILE: tl.constexpr, IEEE: tl.constexpr,
                 SPLIT_K: tl.constexpr = 1, INTERPRET: tl.constexpr = False,
                 NIBBLE_DOTS: tl.constexpr = False, WORDS: tl.constexpr = False,
                 EVEN: tl.constexpr = False, FACTORED: tl.constexpr = False,
                 SWAP: tl.constexpr = False, MAGIC: tl.constexpr = 0,
                 SUM_DOT: tl.constexpr = False, GROUPS: tl.constexpr = 1):
    """out[m block, n block] = x[m block] @ dequant(w[n block])^T (+ bias), tl.dot tiles.
    IEEE: float32 inputs multiplied in full float32 (no TF32), as the reference does.
    SPLIT_K > 1: program_id(1) takes the SPLIT_K-th part of K it names (K a multiple of
    SPLIT_K * BLOCK_K), and split_k_fixup adds the parts (decode batches: a small N makes
    too few tiles to keep every SM streaming the weight).
    NIBBLE_DOTS (int4, GROUP_TILE): the low nibbles (even k) and the high ones (odd k)
    stay two [BLOCK_N, BLOCK_K / 2] tiles, each multiplied with the x columns of its k (x
    split in registers, the smaller tile at decode's few rows), instead of the nibbles
    being interleaved into one weight tile first.
    WORDS (int4, GROUP_TILE; w_ptr the storage as int32, stride_wn in words): each value
    read in place from its word (_dequant_words). EVEN (WORDS, or the float tiles in the
    groups of int_launch.EVEN_GROUPS): N and K whole tiles, no masks on the weight (WORDS:
    sm_90 SASS of the K loop at 64 x 64 x 64, Triton 3.6, 8.3 vs 10.9 instructions a weight).
    FACTORED (GROUP_TILE): the integers q multiplied as they are (exact in x's dtype), the
    scale and offset applied to each K step's [BLOCK_M, BLOCK_N] product instead of to
    every weight: s (x . q) + o sum(x), the one-row GEMV's factoring.
    SWAP (not with NIBBLE_DOTS): the tile computed transposed, out^T = w x^T, so the weight
    tile (dequantized or factored q, made in registers) is tl.dot's left operand, which
    Hopper's wgmma reads from registers, and the few rows of x its right one (wgmma's N:
    8-256, so 16-row tiles use wgmma too); otherwise the weight tile is written to shared
    memory first. BLOCK_N a multiple of 64 for wgmma.
    GROUPS > 1 (the float tiles): each K step is GROUPS whole groups, their scales a
    [BLOCK_N, GROUPS] tile (_dequant_tile), so groups of 16 or 32 (GGUF) keep long steps."""
    tile, offs_m, offs_n, mask_m, mask_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = K // SPLIT_K if SPLIT_K > 1 else K
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        if NIBBLE_DOTS:
            acc = _nibble_dots(acc, x_rows, w_ptr, s_ptr, o_ptr, offs_n, mask_m, mask_n, k, K,
                               G, stride_wn, stride_sn, BLOCK_K, HAS_OFFSET, IEEE)
        elif FACTORED:
            acc = _factored_dot(acc, x_rows, w_ptr, s_ptr, o_ptr, offs_n, mask_m, mask_n, k,
                                K, G, stride_wn, stride_sn, BLOCK_K, BITS, HAS_OFFSET, IEEE,
                                SWAP, MAGIC, INTERPRET, SUM_DOT)
        else:
            offs_k = k + tl.arange(0, BLOCK_K)
            if EVEN:
                x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            else:
                x = tl.load(x_rows + offs_k[None, :],
                            mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            if WORDS:
                w = _dequant_words(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn,
                                   mask_n, _exponent_base(K), BLOCK_K, HAS_OFFSET, EVEN)
            else:
                w = _dequant_tile(w_ptr, s_ptr, o_ptr, offs_n, k, K, G, stride_wn, stride_sn,
                                  mask_n, BLOCK_K, BITS, HAS_OFFSET, GROUP_TILE, GROUPS,
                                  EVEN)
            w = w.to(x_ptr.dtype.element_ty)
            if SWAP:
                acc = _dot(w, tl.trans(x), acc, IEEE)
            else:
                acc = _dot(x, tl.trans(w), acc, IEEE)
    if SWAP:
        acc = tl.trans(acc)
    finish_tile(acc, out_ptr, bias_ptr, part_ptr, count_ptr, tile, offs_m, offs_n, mask_m,
                mask_n, M, N, stride_om, HAS_BIAS, SPLIT_K, INTERPRET)


def group_step(G: int, block_k: int) -> int:
    """The K step of a tile kernel: a power-of-two group (>= 16) smaller than block_k
    becomes the step, so each step has one scale per row, not [BLOCK_N, BLOCK_K] scale
    and offset tiles (in every pipeline stage: past Hopper's shared memory in float32)."""
    return G if G % block_k and G >= 16 and G & (G - 1) == 0 else block_k


def step_groups(G: int, block_k: int) -> int:
    """Whole groups in a K step of block_k (a power of two), 1 unless G is smaller."""
    return block_k // G if G < block_k and block_k % G == 0 and G >= 16 else 1


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight [N, K] in dtype (w = q * scale + offset in float32, then
    rounded to dtype, as the GEMM kernels round their tiles)."""
    N = weight.shape[0]
    K = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    G = K // scale.shape[1]
    block_k = group_step(G, 64)
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    _dequant_kernel[(triton.cdiv(N, 64), triton.cdiv(K, block_k))](
        weight, scale, offset if offset is not None else scale, out, N, K, G,
        weight.stride(0), scale.stride(0), BLOCK_N=64, BLOCK_K=block_k,
        BITS=4 if weight.dtype == torch.uint8 else 8, HAS_OFFSET=offset is not None,
        GROUP_TILE=G % block_k == 0, num_warps=4)
    return out


def int_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      config: IntGemmConfig | None = None) -> torch.Tensor:
    """x [M, K] (16/32-bit) @ dequant(weight)^T -> [M, N] in x's dtype; see the module doc.
    From DEQUANT_ROWS rows (no config given): dequantize_weight, then a 16-bit GEMM."""
    M, K = x.shape
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    G = K // scale.shape[1]
    if M == 0 or N == 0:
        return torch.empty(M, N, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if config is None and M == 1 and bits == 4 and (gemv := tma_gemv(x, weight, scale)):
        return gemv(x, weight, scale, offset, bias)  # TMA-fed (Hopper, groups of 32)
    if config is None and bits == 4 and x.is_cuda and wgmma_takes(M, N, K):
        wgmma = wgmma_module()  # Hopper's warpgroup MMA (Gluon)
        if wgmma is not None and wgmma.wgmma_eligible(x, weight, scale):
            return wgmma.w4_wgmma(x, weight, scale, offset, bias)
    if config is None and (M >= DEQUANT_ROWS or
                           x.is_cuda and dequant_first(M, N, K, G, bits, x)):
        return torch.nn.functional.linear(x, dequantize_weight(weight, scale, offset, x.dtype),
                                          None if bias is None else bias.to(x.dtype))
    words = word_aligned(weight)
    cfg = config or int_gemm_config(  # the 2-4-row pairs default takes K steps of 128
        M, N, K, x.device, bits, G, x.dtype,
        words and pairs_eligible(x, bits, G, min(128, max(32, triton.next_power_of_2(K)))))
    block_k = min(cfg.block_k, max(32, triton.next_power_of_2(K)))
    tile_groups = step_groups(G, block_k) if cfg.block_m and not cfg.digits and GROUPED \
        else 1
    if cfg.block_m and tile_groups == 1:
        block_k = group_step(G, block_k)
        while cfg.digits and block_k > 32 and (K % block_k or G % block_k):
            block_k //= 2  # digit tiles take whole K steps (e.g. K 576: steps of 64)
    group_tile = G % block_k == 0
    common = dict(BITS=bits, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
                  GROUP_TILE=group_tile, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    o = offset if offset is not None else scale
    b = bias if bias is not None else scale
    per = 32 // bits
    # a K step in one group, or over whole groups of whole words
    groups = 1 if G % block_k == 0 else block_k // G \
        if block_k % G == 0 and G % per == 0 else 0
    # the GEMVs that read the weight as 32-bit words, each K step whole groups of them
    word_gemv = cfg.block_m == 0 and words and block_k % 8 == 0 and groups
    if cfg.digits and cfg.block_m == 0 and M == 1 and words and digits_eligible(K, G, bits):
        return digits_gemv(x, weight, scale, offset, bias, cfg.block_n,
                           max(1, block_k // (4 * per)), cfg.split_k, cfg.num_warps,
                           cfg.num_stages, cfg.num_stages if cfg.pipeline else 1)
    launch = pairs_launch(x, scale, cfg, bits, words)
    if launch is not None:
        return pairs_gemv(x, weight, scale, offset, bias, *launch)
    if word_gemv and M == 1:
        return gemv1(x, weight, scale, offset, bias, cfg, bits, block_k, groups)
    if word_gemv and cfg.factored:
        return launch_gemv_rows(x, weight, scale, offset, bias, cfg.block_n, block_k, groups,
                                cfg.num_warps, cfg.num_stages, G,
                                split_length(K, cfg.split_k, block_k))
    if cfg.block_m == 0:
        k_per_split = split_length(K, cfg.split_k, block_k)
        splits = triton.cdiv(K, k_per_split)
        atomic = splits > 1
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else \
            torch.empty(M, N, dtype=x.dtype, device=x.device)
        _gemv_kernel[(triton.cdiv(N, cfg.block_n), splits)](
            x, weight, scale, o, b, out, M, N, K, G, k_per_split,
            x.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
            ROWS=max(1, triton.next_power_of_2(M)), ATOMIC=atomic, **common)
        return out.to(x.dtype) if atomic else out
    if cfg.digits and digits_tiles_eligible(K, G, block_k, bits):
        return digits_tiles(x, weight, scale, offset, bias, cfg.block_m, cfg.block_n, block_k,
                            cfg.split_k, cfg.num_warps, cfg.num_stages, cfg.group_m)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    split = cfg.split_k if K % (cfg.split_k * block_k) == 0 else 1
    part, counters = (torch.empty(split, M, N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, tiles)) if split > 1 else (out, out)
    # int4 as 32-bit words, values read in place (IntGemmConfig.words)
    in_words = cfg.words and bits == 4 and words and group_tile and block_k >= 32
    nibbles = cfg.nibble_dots and bits == 4 and group_tile and block_k >= 32 and not in_words
    mask_free = EVEN_GROUPS is None or G in EVEN_GROUPS  # the float tiles' group (EVEN)
    # int4 unpacked by bit operations into 16-bit floats (IntGemmConfig.magic)
    magic = (2 if x.dtype == torch.float16 else 1) if cfg.magic and bits == 4 and \
        group_tile and not in_words and not nibbles and x.dtype != torch.float32 else 0
    _gemm_kernel[(tiles, split)](
        x, weight.view(torch.int32) if in_words else weight, scale, o, b, out, part,
        counters, M, N, K, G, x.stride(0), weight.stride(0) // (4 if in_words else 1),
        scale.stride(0), out.stride(0), BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
        IEEE=x.dtype == torch.float32, SPLIT_K=split, INTERPRET=_INTERPRET,
        NIBBLE_DOTS=nibbles, WORDS=in_words,
        EVEN=(in_words or mask_free and not nibbles and not (cfg.factored or magic)) and
        N % cfg.block_n == 0 and K % (split * block_k) == 0,
        FACTORED=(cfg.factored or magic > 0) and group_tile and not in_words and not nibbles,
        SWAP=cfg.swap and not nibbles, MAGIC=magic, SUM_DOT=cfg.sum_dot,
        GROUPS=tile_groups, **common)
    return out
