"""W4A16 decode batches on Hopper's warpgroup MMA, written in Gluon (Triton's
lower-level language: explicit layouts, shared memory and asynchronous wgmma).

kiln's Triton tiles for int4 weights at 5-64 rows (kiln.kernels.int_gemm) feed
`tl.dot` a weight tile made in registers inside the K loop, and Triton then waits for
each step's tensor-core product before the next step starts (the 33rd session's SASS:
`WARPGROUP.DEPBAR` after every step), so a Llama-3.1-8B layer took 185-190 us at 64 rows
against bf16 cuBLAS's 125. Here the loop is laid out by hand, computed transposed
(out^T [N, M] = W [N, K] @ x^T [K, M]: the weight's rows are the MMA's 64-row side, the
batch its narrow side, 8 to 128 columns):

* each K step's packed words, x's tile and four groups of scales (and offsets) a row
  are loaded by TMA into a ring of STAGES slots, counted on a barrier a slot (not by
  cp.async, whose loads the proxy fence below waited for: docs/kernels.md);
* the words are dequantized in registers (q from its nibble by bit operations, then
  w = q * s + o by one float32 FMA, rounded to bfloat16; _DEQUANT_FAST by default) and
  stored to one of two shared-memory tiles, which a proxy fence hands to the tensor
  cores;
* the step's wgmma is issued asynchronously and waited for only one step later, so the
  tensor cores multiply step i while the threads dequantize step i + 1.

K splits (for the few column blocks of qkv, o and down) meet in the kernel: the last
split of a block adds the others' float32 partial sums in split order
(kiln.kernels.split_k's protocol). Hopper (sm_90) only; there is no interpreter for
Gluon, so CPU tests run the dequantization PTX through a small evaluator, compile the
kernel for sm_90 and check the launch rules, and GPU tests check its results against
the reference. The default at 5-255 rows (int4 64 x 512 / 256 on an H100: 1.09x the
Triton tiles end to end, 1.01x bf16, 52nd session; prompts of 65-255 rows, 55th);
KILN_INT_WGMMA picks other rows (kiln.kernels.int_launch.wgmma_rows).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kiln.kernels import pdl
from kiln.kernels.gluon_sync import arrive, gluon_start
from kiln.kernels.split_k import split_k_counters

# KILN_INT_WGMMA_PDL=1: launched with PDL, the first weights before the wait (untimed)
PDL = os.environ.get("KILN_INT_WGMMA_PDL") == "1"

# Eight int4 values of a 32-bit word (value i at bits 4i) -> four bfloat16 pairs (int32)
# of w = q * S + O: the nibble or'd into the mantissa of 2^23 (lop3) and 2^23 taken off
# (exact), one float32 FMA, the pair rounded to bfloat16 by one cvt. $4 is the word (the
# other three word registers repeat it), $8 the scale, $12 the offset.
_DEQUANT = gl.constexpr("{\n.reg .b32 t, a, b;\n" + "".join(
    (f"shr.u32 t, $4, {8 * j};\n" if j else "mov.b32 t, $4;\n") +
    "lop3.b32 a, t, 0xF, 0x4B000000, 0xea;\n"
    "shr.u32 t, t, 4;\n"
    "lop3.b32 b, t, 0xF, 0x4B000000, 0xea;\n"
    "sub.f32 a, a, 0f4B000000;\n"
    "sub.f32 b, b, 0f4B000000;\n"
    "fma.rn.f32 a, a, $8, $12;\n"
    "fma.rn.f32 b, b, $8, $12;\n"
    f"cvt.rn.bf16x2.f32 ${j}, b, a;\n" for j in range(4)) + "}")
_DEQUANT_ARGS = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 4 + ["f"] * 8))


# The same with three instructions a weight instead of four: each pair's two nibbles are
# shifted to bits 12 and 16 (one shift a pair) and or'd into 2^23 (lop3), so the float is
# 2^23 + q 2^12 (or 2^16); one FMA with S12 = s 2^-12 and C12 = o - 2^11 s (S16, C16
# alike) gives q s + o, 2^23 taken off through C. C's rounding (half an ulp of 2^11 s,
# ~2^-13 s) is far below bfloat16's (2^-9 of |w|, ~2^-7 s for a typical |w| of 8 s).
# $4 the word, $8 S12, $12 C12, $16 S16, $20 C16.
_DEQUANT_FAST = gl.constexpr("{\n.reg .b32 t, a, b;\n" + "".join(
    f"{op} t, $4, {sh};\n"
    "lop3.b32 a, t, 0xF000, 0x4B000000, 0xea;\n"
    "lop3.b32 b, t, 0xF0000, 0x4B000000, 0xea;\n"
    "fma.rn.f32 a, a, $8, $12;\n"
    "fma.rn.f32 b, b, $16, $20;\n"
    f"cvt.rn.bf16x2.f32 ${j}, b, a;\n"
    for j, (op, sh) in enumerate([("shl.b32", 12), ("shl.b32", 4), ("shr.u32", 4),
                                  ("shr.u32", 12)])) + "}")
_DEQUANT_FAST_ARGS = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 4 + ["f"] * 16))


@gluon.jit
def _dequant_fast(words, scale, offset):
    """_dequant's result by _DEQUANT_FAST (scale and offset as there)."""
    shape: gl.constexpr = [words.shape[0], words.shape[1], words.shape[2], 4]
    args = [words.broadcast_to(shape), (scale * (1.0 / 4096.0)).broadcast_to(shape),
            (offset - 2048.0 * scale).broadcast_to(shape),
            (scale * (1.0 / 65536.0)).broadcast_to(shape),
            (offset - 128.0 * scale).broadcast_to(shape)]
    return gl.inline_asm_elementwise(_DEQUANT_FAST, _DEQUANT_FAST_ARGS, args,
                                     dtype=gl.int32, is_pure=True, pack=4)


@gluon.jit
def _dequant(words, scale, offset):
    """int32 [R, GW, WT, 4] (bfloat16 pairs, value order) from int32 words [R, GW, WT, 1]
    and float32 scales and offsets [R, GW, 1, 1], broadcast in the thread that holds them."""
    shape: gl.constexpr = [words.shape[0], words.shape[1], words.shape[2], 4]
    return gl.inline_asm_elementwise(
        _DEQUANT, _DEQUANT_ARGS,
        [words.broadcast_to(shape), scale.broadcast_to(shape), offset.broadcast_to(shape)],
        dtype=gl.int32, is_pure=True, pack=4)


@gluon.jit
def _store_out(acc, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, stride_om, pid_n, pid_k,
               pid_m, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, HAS_BIAS: gl.constexpr,
               SPLIT_K: gl.constexpr, WARPS: gl.constexpr):
    """out[m, n] = acc[n, m] (+ bias) in out's dtype; with K splits, the last split of the
    tile adds the others' partial sums first (kiln.kernels.split_k's protocol)."""
    # past 64 rows, 8 columns a thread (one vector store, one address for 8 values)
    LO: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, WARPS], [0, 1]) if BLOCK_M > 64 \
        else gl.BlockedLayout([1, 1], [32, 1], [WARPS, 1], [0, 1])
    y = gl.convert_layout(acc, LO)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LO))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LO))
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    last = True
    if SPLIT_K > 1:  # kiln.kernels.split_k's protocol: partials, a fence, the count
        elems = M * N
        offs = offs_m.to(gl.int64)[None, :] * N + offs_n[:, None]
        gl.store(part_ptr + pid_k * elems + offs, y, mask=mask)
        tile = pid_m * gl.num_programs(0) + pid_n
        last = arrive(count_ptr, tile, offs_n) == SPLIT_K - 1
        if last:
            y = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=LO)
            for sp in range(SPLIT_K):  # (in split order: the sum does not depend on arrival)
                y += gl.load(part_ptr + sp * elems + offs, mask=mask, other=0.0,
                             cache_modifier=".cg")
            gl.store(count_ptr + tile, 0)
    if last:
        if HAS_BIAS:
            y += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
        out = out_ptr + offs_m.to(gl.int64)[None, :] * stride_om + offs_n[:, None]
        gl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _tma_step(w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, bars, step,
              STAGES: gl.constexpr, k_start, k_end, row0, m0, G: gl.constexpr,
              BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr, WEIGHTS: gl.constexpr = True,
              X: gl.constexpr = True):
    """The split's K step `step` into ring slot step % STAGES by TMA, counted on the
    slot's barrier (nothing past the split's end): its words, x's tile, and the scales
    (and offsets) of the 4 groups from the step's first rounded down to a multiple of 4
    (16 bytes a row, TMA's least; a box at a column not a multiple of 16 bytes was an
    illegal instruction on an H100, 52nd session). WEIGHTS / X: those copies only (PDL)."""
    k = k_start + step * BLOCK_K
    slot = step % STAGES
    live = k < k_end
    bar = bars.index(slot)
    if WEIGHTS:
        NBYTES: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes + \
            s_desc.block_type.nbytes * (2 if HAS_OFFSET else 1)
        mbarrier.expect(bar, NBYTES, pred=live)
        tma.async_copy_global_to_shared(w_desc, [row0, k // 8], bar, w_ring.index(slot),
                                        pred=live)
        col = k // G // 4 * 4
        tma.async_copy_global_to_shared(s_desc, [row0, col], bar, s_ring.index(slot),
                                        pred=live)
        if HAS_OFFSET:
            tma.async_copy_global_to_shared(o_desc, [row0, col], bar, o_ring.index(slot),
                                            pred=live)
    if X:
        tma.async_copy_global_to_shared(x_desc, [m0, k], bar, x_ring.index(slot), pred=live)


@gluon.jit
def _step_groups(ring, slot, k, GW: gl.constexpr, WT: gl.constexpr, G: gl.constexpr,
                 LS: gl.constexpr):
    """[BLOCK_N, GW] of a ring's 4 groups a row (from group k // G rounded down to a
    multiple of 4: _tma_step): the group of each thread slice (slice gw covers values
    k + gw * 8 WT ..: group k // G + gw * 8 WT // G)."""
    SPAN: gl.constexpr = GW * WT * 8 // G  # the step's groups (0: a step inside one)
    tile = ring.index(slot).load(LS)  # [BLOCK_N, 4]: slice gw holds column gw
    if SPAN == GW:  # (groups of 32: the step's first group is a multiple of 4)
        vals = tile
    else:  # slice gw takes column first + gw * SPAN // GW: each such column summed over
        first = k // G % 4  # the slices
        gw = gl.arange(0, GW, layout=gl.SliceLayout(0, LS))
        vals = gl.zeros(tile.shape, gl.float32, layout=LS)
        for c in gl.static_range(max(SPAN, 1)):
            col = gl.sum(gl.where((gw == first + c)[None, :], tile, 0.0), axis=1)
            vals = gl.where((gw * SPAN // GW == c)[None, :], col[:, None], vals)
    return vals


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """A ring's barriers, one a slot, initialized and fenced before any copy."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()
    gl.thread_barrier()
    return bars


@gluon.jit
def _w4_wgmma_kernel(x_desc, w_desc, s_desc, o_desc, bias_ptr, out_ptr, part_ptr, count_ptr,
                     M, N, K, K_PER_SPLIT, stride_om, G: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr,
                     HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                     FAST: gl.constexpr, PDL: gl.constexpr = False):
    """out[M, N] = x [M, K] @ dequant(w)^T (+ bias) for the column block program_id(0),
    the K split program_id(1) and the row block program_id(2) (see the module doc): x
    bfloat16, w int4 as int32 words [N, K / 8], scales and offsets float32 [N, K / G],
    each a TMA descriptor; 4 warps (one warpgroup) for each 64 rows of BLOCK_N. PDL: the
    first steps' words, scales and offsets copied before the wait, x after it."""
    WORDS: gl.constexpr = BLOCK_K // 8
    WT: gl.constexpr = 4
    GW: gl.constexpr = WORDS // WT
    WARPS: gl.constexpr = gl.num_warps()
    L4: gl.constexpr = gl.BlockedLayout([1, 1, WT, 4], [32 // GW, GW, 1, 1],
                                        [WARPS, 1, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)
    LS: gl.constexpr = gl.SliceLayout(2, LW)
    LW2: gl.constexpr = gl.BlockedLayout([1, WT], [32 // GW, GW], [WARPS, 1], [1, 0])
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    A_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                gl.bfloat16)
    A_PAIRS: gl.constexpr = gl.NVMMASharedLayout(A_SMEM.swizzle_byte_width, 32, 2)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    a_smem = gl.allocate_shared_memory(gl.int32, [2, BLOCK_N, BLOCK_K // 2], A_PAIRS)
    x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], w_desc.layout)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N, 4], s_desc.layout)
    o_ring = gl.allocate_shared_memory(gl.float32, [STAGES if HAS_OFFSET else 1, BLOCK_N, 4],
                                       s_desc.layout)
    bars = _ring_barriers(STAGES)

    k_start = pid_k * K_PER_SPLIT
    k_end = gl.minimum(k_start + K_PER_SPLIT, K)
    # (every split has a step: no path around the loop, whose zeroed accumulator would
    # make ptxas serialize the wgmma pipeline)
    gl.assume(k_end > k_start)
    row0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    for s in gl.static_range(STAGES - 1):
        _tma_step(w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, bars, s,
                  STAGES, k_start, k_end, row0, m0, G, BLOCK_K, HAS_OFFSET, X=not PDL)
    if PDL:  # the ring's weights stream while the kernel before finishes; x after it
        gluon_start()
        for s in gl.static_range(STAGES - 1):
            _tma_step(w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, bars,
                      s, STAGES, k_start, k_end, row0, m0, G, BLOCK_K, HAS_OFFSET,
                      WEIGHTS=False)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC)
    i = 0
    for k in range(k_start, k_end, BLOCK_K):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        words = gl.convert_layout(gl.reshape(w_ring.index(slot).load(LW2), [BLOCK_N, GW, WT]),
                                  LW, assert_trivial=True)
        scale = _step_groups(s_ring, slot, k, GW, WT, G, LS)
        if HAS_OFFSET:
            offset = _step_groups(o_ring, slot, k, GW, WT, G, LS)
        else:
            offset = gl.zeros([BLOCK_N, GW], gl.float32, layout=LS)
        if FAST:
            pairs = _dequant_fast(words[:, :, :, None], scale[:, :, None, None],
                                  offset[:, :, None, None])
        else:
            pairs = _dequant(words[:, :, :, None], scale[:, :, None, None],
                             offset[:, :, None, None])
        buf = i % 2
        a_smem.index(buf).store(gl.reshape(pairs, [BLOCK_N, BLOCK_K // 2]))
        fence_async_shared()
        gl.thread_barrier()
        a = a_smem.index(buf)._reinterpret(gl.bfloat16, [BLOCK_N, BLOCK_K], A_SMEM)
        acc = warpgroup_mma(a, x_ring.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # the step before's MMA is done and its words were read by every thread (the
        # barrier of this step): its slot takes the step STAGES - 1 ahead
        _tma_step(w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, bars,
                  i + STAGES - 1, STAGES, k_start, k_end, row0, m0, G, BLOCK_K, HAS_OFFSET)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    _store_out(acc, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, stride_om, pid_n, pid_k,
               pid_m, BLOCK_N, BLOCK_M, HAS_BIAS, SPLIT_K, WARPS)


@dataclass(frozen=True)
class WgmmaConfig:
    """A launch: weight rows a program (64 a warpgroup: 4 warps each), K step, K splits,
    ring stages, and the dequantization (fast: _DEQUANT_FAST, else _DEQUANT)."""
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    stages: int = 3
    fast: bool = True
    block_m: int = 0  # x rows a program; 0: by M (block_rows)


def wgmma_config(M: int, N: int, K: int, sms: int = 132) -> WgmmaConfig:
    """The launch for [M, K] x [N, K]^T: 128 weight rows a program (64 past 32 rows: the
    52nd session's sweep, gate_up 64.1 us against 75.5 at 64 rows on an H100), K split
    until the column blocks fill about two waves of the SMs, one at 9-32 rows (53rd
    session, H100, 16 rows: o 14.3 us with half the two waves' split against 33.1, down
    35.4 against 48.4; 12 rows 14.3 and 35.3 against 22.1 and 37.6). KILN_INT_WGMMA_CFG=
    "block_n,block_k,split_k,stages,fast[,block_m]" overrides (benchmarks; split_k 0: the
    rule's). Past 64 rows 128 rows a program, 4 stages (55th session, H100, a layer's four
    linears at 128 rows, groups of 128: 215.2 us against 222.1 in 3 stages, 291.7 with 128
    weight rows a program and 2 stages, 282.2 in 64-row blocks). Past 64 rows one wave
    (58th session, H100, groups of 128: a layer at 128 rows 178.6 us against 259.6 with two,
    65 rows 238.5 against 299.1; down, the one linear of 129-255 rows the kernel takes
    beside gate_up (split 1 either way), 103.8 against 123.3 at 192 rows, 89.7 against
    109.6 at 255)."""
    cfg = WgmmaConfig(block_n=64 if M > 32 else 128, split_k=0, stages=4 if M > 64 else 3)
    override = os.environ.get("KILN_INT_WGMMA_CFG")
    if override:
        bn, bk, split, stages, fast, bm = (int(v) for v in (override + ",0").split(",")[:6])
        cfg = WgmmaConfig(bn, bk, split, stages, bool(fast), bm)
    if cfg.split_k:
        return cfg
    blocks = triton.cdiv(N, cfg.block_n)
    waves = 1 if 8 < M <= 32 or M > 64 else 2
    split = 1
    while blocks * split * 2 <= waves * sms and K // (cfg.block_k * split * 2) >= 4:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def block_rows(M: int) -> int:
    """x rows a program where WgmmaConfig.block_m is 0: M padded to 8-64, past 64 128."""
    return 8 if M <= 8 else 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128


def wgmma_eligible(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   block_k: int = 128) -> bool:
    """Whether w4_wgmma takes this product: Hopper, bfloat16 x with rows 16-byte
    aligned, int4 weight as 32-bit words, groups of whole 32-value thread slices (G a
    multiple of 32), K in whole steps, scale rows 16-byte aligned (TMA: K / G a multiple
    of 4)."""
    K = x.shape[1]
    G = K // scale.shape[1]
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and \
        block_k == 128 and \
        x.dtype == torch.bfloat16 and weight.dtype == torch.uint8 and \
        K % block_k == 0 and G % 32 == 0 and (G % block_k == 0 or block_k % G == 0) and \
        scale.shape[1] % 4 == 0 and scale.stride(0) % 4 == 0 and scale.stride(1) == 1 and \
        x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and \
        weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0


def w4_wgmma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             offset: torch.Tensor | None, bias: torch.Tensor | None,
             config: WgmmaConfig | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 @ dequant(int4 weight [N, K / 2] uint8, float32 scales and
    offsets [N, K / G])^T (+ bias) -> [M, N] bfloat16 (see the module doc)."""
    M, K = x.shape
    N = weight.shape[0]
    cfg = config or wgmma_config(M, N, K)
    G = K // scale.shape[1]
    block_m = cfg.block_m or block_rows(M)
    steps = K // cfg.block_k
    k_per_split = triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, block_m))
    part, counters = (torch.empty(split, M * N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, grid[0] * grid[2])) if split > 1 else \
        (out, out)
    meta = dict(G=G, BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=cfg.block_k,
                HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                STAGES=cfg.stages, FAST=cfg.fast, num_warps=cfg.block_n // 16)
    o = offset if offset is not None else scale
    b = bias if bias is not None else scale
    words = weight.view(torch.int32)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_m, cfg.block_k],
                              gl.NVMMASharedLayout.get_default_for([block_m, cfg.block_k],
                                                                   gl.bfloat16))
    w_shape = [cfg.block_n, cfg.block_k // 8]
    w_desc = TensorDescriptor(words, [N, K // 8], [words.stride(0), 1], w_shape,
                              gl.NVMMASharedLayout.get_default_for(w_shape, gl.int32))
    s_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_n, 4], gl.float32)
    s_desc, o_desc = (TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [cfg.block_n, 4],
                                       s_layout) for t in (scale, o))
    use_pdl = PDL and pdl.INT_GEMV and pdl.hopper(x)
    _w4_wgmma_kernel[grid](x_desc, w_desc, s_desc, o_desc, b, out, part, counters, M, N, K,
                           k_per_split, out.stride(0), PDL=use_pdl, **meta,
                           **pdl.launch_args(use_pdl))
    return out

