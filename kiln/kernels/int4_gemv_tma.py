"""The one-row int4 GEMV on Hopper fed by TMA, in Gluon: the default for groups of 32
(GGUF's Q4 layouts) since the 54th session (kiln.kernels.int_launch.GEMV_TMA; written in
the 53rd).

kiln's one-row int4 GEMV (kiln.kernels.int_gemv_pairs) reads its words into registers
and is bound by memory latency at about half the copy bandwidth (the 28th session's
profile): a thread can keep only so many loads in flight. Here each program's weight
rows stream through a ring of STAGES shared-memory slots filled by TMA (a K step of
BLOCK_N rows x BLOCK_K values a slot, with its groups' scales and offsets), so a
program keeps tens of KB in flight whatever its registers.

The arithmetic is int_gemv_pairs': a word's eight values become bfloat16 pairs
2^7 + q - 128 and multiply x's pairs in packed bfloat16 FMAs (kiln.kernels.int_pairs_asm,
the same PTX), the pairs' halves meet in float32 once a word; a thread takes a 32-value
slice of a row a step (4 words; 16 lanes a row), so y = sum over slices of s * sum(q x)
+ o * sum(x) with the slice's group's s and o. x's pairs come by TMA too, one copy a
step; each thread reads its words' pairs from shared memory. K splits meet in the kernel
(kiln.kernels.split_k's protocol, int_wgmma._store_out). Its epilogues
(kiln.kernels.int4_gemv_tma_out): GLU at a merged gate-up and rotary + KV write at a fused
QKV, both by default since the 55th session (KILN_INT4_GEMV_TMA_GLU=0 /
KILN_INT4_GEMV_TMA_ROPE=0: off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kiln.kernels import pdl
from kiln.kernels.gluon_sync import gluon_trigger, gluon_wait
from kiln.kernels.int4_gemv_tma_out import _glu_out, _rope_out
from kiln.kernels.int_pairs_asm import _PAIRS_UNSIGNED, _SUM_ASM
from kiln.kernels.int_wgmma import _ring_barriers, _store_out
from kiln.kernels.split_k import split_k_counters

if TYPE_CHECKING:
    from kiln.kernels.gemv_swap_rope import RopeArgs

# launched with PDL behind the kernel before (its weights' first ring copied before the
# wait), as the pairs GEMV is (58th session, H100, batch 1 in groups of 32: 342.9 tok/s
# against 328.1, three runs each; KILN_INT4_GEMV_TMA_PDL=0 turns it off)
# (the 60th session's `late` (the kernel after let start only once this one's sums are
# done) and `wait` (no weights copied before the wait) measured no better: 63rd session,
# H100, batch 1, down on this GEMV 346-350 tok/s in every mode, against 399-400 with the
# pairs GEMV there; removed)
PDL = os.environ.get("KILN_INT4_GEMV_TMA_PDL", "1") != "0"

_DOT = gl.constexpr(_PAIRS_UNSIGNED.value)  # (word, x's four pairs) -> sum q x, float32
_XSUM = gl.constexpr(_SUM_ASM.value)  # (x's four pairs) -> their eight values' sum


@gluon.jit
def _copy_rows(desc, row0, row1, k, bar, dst, live, HALF: gl.constexpr):
    """A TMA copy of desc's box at [row0, k] into dst; HALF (GLU): two boxes of HALF rows,
    at row0 (gate) into dst's first half and at row1 (up) into its second."""
    if HALF:
        tma.async_copy_global_to_shared(desc, [row0, k], bar, dst.slice(0, HALF), pred=live)
        tma.async_copy_global_to_shared(desc, [row1, k], bar, dst.slice(HALF, HALF),
                                        pred=live)
    else:
        tma.async_copy_global_to_shared(desc, [row0, k], bar, dst, pred=live)


@gluon.jit
def _gemv_step(w_desc, s_desc, o_desc, x_desc, w_ring, s_ring, o_ring, x_ring, bars, step,
               STAGES: gl.constexpr, k_start, k_end, row0, row1, G: gl.constexpr,
               BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr, HALF: gl.constexpr,
               WEIGHTS: gl.constexpr = True, X: gl.constexpr = True):
    """The split's K step `step` into ring slot step % STAGES by TMA (nothing past the
    split's end): the rows' words, their scales and offsets of the step's groups, and x's
    pairs, counted on the slot's barrier (HALF: the rows in two halves, _copy_rows).
    WEIGHTS / X: those copies only (PDL: the weights, and the whole step's bytes expected,
    before the wait; x after it)."""
    k = k_start + step * BLOCK_K
    slot = step % STAGES
    live = k < k_end
    bar = bars.index(slot)
    if WEIGHTS:
        NBYTES: gl.constexpr = (w_desc.block_type.nbytes + s_desc.block_type.nbytes *
                                (2 if HAS_OFFSET else 1)) * (2 if HALF else 1) + \
            x_desc.block_type.nbytes
        mbarrier.expect(bar, NBYTES, pred=live)
        _copy_rows(w_desc, row0, row1, k // 8, bar, w_ring.index(slot), live, HALF)
        _copy_rows(s_desc, row0, row1, k // G, bar, s_ring.index(slot), live, HALF)
        if HAS_OFFSET:
            _copy_rows(o_desc, row0, row1, k // G, bar, o_ring.index(slot), live, HALF)
    if X:
        tma.async_copy_global_to_shared(x_desc, [0, k // 2], bar, x_ring.index(slot),
                                        pred=live)


@gluon.jit
def _w4_gemv_tma_kernel(w_desc, s_desc, o_desc, x_desc, bias_ptr, out_ptr, part_ptr,
                        count_ptr, N, K, K_PER_SPLIT, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                        num_heads, num_kv_heads, block_size, stride_cs, stride_cb,
                        stride_cslot, stride_ch, stride_vs, stride_vh, stride_vd,
                        G: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr,
                        HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                        GLU: gl.constexpr = 0, ROPE_HALF: gl.constexpr = 0,
                        PDL: gl.constexpr = False):
    """out[0, N] = x [1, K] @ dequant(w)^T (+ bias) for the row block program_id(0) and the
    K split program_id(1): w int4 as int32 words [N, K / 8], scales and offsets float32
    [N, K / G], x bfloat16 pairs as int32 [1, K / 2], each a TMA descriptor. GLU (1 SiLU,
    2 tanh GELU; one split): w is [gate | up], a program's rows BLOCK_N / 2 columns of
    each, and out [0, N / 2] = act(gate) * up (_glu_out). ROPE_HALF (head_dim / 2; one
    split): w is the fused QKV, a program's rows BLOCK_N / 2 dims of a head's first half
    and the dims they rotate with, out the rotated q (_rope_out; pos_ptr ..: its
    arguments, kiln.kernels.gemv_swap_rope.RopeArgs.kernel_args). PDL (launched with PDL):
    the ring's first weights, scales and offsets copied before the wait, x after it."""
    WT: gl.constexpr = 4  # a thread's words of a row in a step: a slice of 32 values
    SPG: gl.constexpr = G // 32  # slices a group
    GW: gl.constexpr = BLOCK_K // G  # groups a step
    TR: gl.constexpr = 32 // (GW * SPG)  # rows of a warp (BLOCK_K / 32 slices a row)
    WARPS: gl.constexpr = gl.num_warps()
    L5: gl.constexpr = gl.BlockedLayout([1, 1, 1, WT, 4], [TR, GW, SPG, 1, 1],
                                        [WARPS, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    L4: gl.constexpr = gl.SliceLayout(4, L5)  # [BLOCK_N, GW, SPG, WT]: the words
    LA: gl.constexpr = gl.SliceLayout(3, L4)  # [BLOCK_N, GW, SPG]: a slice's sums
    LS: gl.constexpr = gl.SliceLayout(2, LA)  # [BLOCK_N, GW]: scales, offsets
    LX: gl.constexpr = gl.SliceLayout(0, L4)  # [GW, SPG, WT]: x's pairs of a thread's words
    LW2: gl.constexpr = gl.BlockedLayout([1, WT], [TR, GW * SPG], [WARPS, 1], [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8],
                                       w_desc.layout)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N, GW], s_desc.layout)
    o_ring = gl.allocate_shared_memory(gl.float32, [STAGES if HAS_OFFSET else 1, BLOCK_N, GW],
                                       s_desc.layout)
    x_ring = gl.allocate_shared_memory(gl.int32, [STAGES, 1, BLOCK_K // 2], x_desc.layout)
    bars = _ring_barriers(STAGES)

    k_start = pid_k * K_PER_SPLIT
    k_end = gl.minimum(k_start + K_PER_SPLIT, K)
    HALF: gl.constexpr = BLOCK_N // 2 if GLU or ROPE_HALF else 0
    if ROPE_HALF:  # a head's dims (pid_n % per head) * HALF .., then those + ROPE_HALF
        row0 = pid_n // (ROPE_HALF // HALF) * (2 * ROPE_HALF) + pid_n % (ROPE_HALF // HALF) * HALF
        row1 = row0 + ROPE_HALF
    else:
        row0 = pid_n * (HALF if GLU else BLOCK_N)
        row1 = N // 2 + row0  # (GLU: the up rows)
    for s in gl.static_range(STAGES):  # (a slot is refilled as soon as it is read)
        _gemv_step(w_desc, s_desc, o_desc, x_desc, w_ring, s_ring, o_ring, x_ring, bars, s,
                   STAGES, k_start, k_end, row0, row1, G, BLOCK_K, HAS_OFFSET, HALF,
                   X=not PDL)
    if PDL:  # the ring's weights stream while the kernel before finishes; x after it
        gluon_wait()
        gluon_trigger()
        for s in gl.static_range(STAGES):
            _gemv_step(w_desc, s_desc, o_desc, x_desc, w_ring, s_ring, o_ring, x_ring, bars,
                       s, STAGES, k_start, k_end, row0, row1, G, BLOCK_K, HAS_OFFSET, HALF,
                       WEIGHTS=False)
    acc = gl.zeros([BLOCK_N, GW, SPG], gl.float32, layout=LA)
    i = 0
    for _k in range(k_start, k_end, BLOCK_K):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        words = gl.convert_layout(
            gl.reshape(w_ring.index(slot).load(LW2), [BLOCK_N, GW, SPG, WT]), L4,
            assert_trivial=True)
        # x's pairs of the thread's words, 16 bytes a word, split into pair 0..3 of each
        xw = x_ring.index(slot).reshape([GW, SPG, WT, 4]).load(gl.SliceLayout(0, L5))
        even, odd = gl.split(gl.reshape(xw, [GW, SPG, WT, 2, 2]))  # pairs 0, 2 and 1, 3
        x0, x2 = gl.split(even)
        x1, x3 = gl.split(odd)
        x0 = gl.convert_layout(x0, LX, assert_trivial=True)[None]
        x1 = gl.convert_layout(x1, LX, assert_trivial=True)[None]
        x2 = gl.convert_layout(x2, LX, assert_trivial=True)[None]
        x3 = gl.convert_layout(x3, LX, assert_trivial=True)[None]
        scale = s_ring.index(slot).load(LS)
        shape: gl.constexpr = [BLOCK_N, GW, SPG, WT]
        dots = gl.inline_asm_elementwise(
            _DOT, "=f,r,r,r,r,r", [words, x0.broadcast_to(shape), x1.broadcast_to(shape),
                                   x2.broadcast_to(shape), x3.broadcast_to(shape)],
            dtype=gl.float32, is_pure=True, pack=1)
        acc += scale[:, :, None] * gl.sum(dots, axis=3)
        if HAS_OFFSET:
            xsum = gl.inline_asm_elementwise(_XSUM, "=f,r,r,r,r", [x0, x1, x2, x3],
                                             dtype=gl.float32, is_pure=True, pack=1)
            acc += o_ring.index(slot).load(LS)[:, :, None] * gl.sum(xsum, axis=3)
        # every thread has read the slot (a CTA barrier): it takes the step STAGES ahead
        gl.thread_barrier()
        _gemv_step(w_desc, s_desc, o_desc, x_desc, w_ring, s_ring, o_ring, x_ring, bars,
                   i + STAGES, STAGES, k_start, k_end, row0, row1, G, BLOCK_K, HAS_OFFSET,
                   HALF)
        i += 1
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    y = gl.sum(gl.sum(acc, axis=2), axis=1)
    if GLU:
        _glu_out(y, bias_ptr, out_ptr, pid_n, N // 2, BLOCK_N, HAS_BIAS, GLU, WARPS)
    elif ROPE_HALF:
        _rope_out(y, bias_ptr, out_ptr, pid_n, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                  num_heads, num_kv_heads, block_size, stride_cs, stride_cb, stride_cslot,
                  stride_ch, stride_vs, stride_vh, stride_vd, BLOCK_N, ROPE_HALF, HAS_BIAS,
                  WARPS)
    else:
        _store_out(y[:, None], bias_ptr, out_ptr, part_ptr, count_ptr, 1, N, N, pid_n, pid_k,
                   0, BLOCK_N, 1, HAS_BIAS, SPLIT_K, WARPS)


@dataclass(frozen=True)
class GemvTmaConfig:
    """A launch: weight rows a program, K values a step, K splits, ring stages, warps."""
    block_n: int = 64
    block_k: int = 512
    split_k: int = 1
    stages: int = 4
    num_warps: int = 4


def gemv_tma_config(N: int, K: int, G: int, sms: int = 132) -> GemvTmaConfig:
    """K split until blocks of 64 rows fill about one wave of the SMs (each program keeps
    its ring in flight); groups of 32 in blocks of 32 rows with those splits (54th
    session's sweep, an H200, a layer's four linears: 61.6 us against 66.1 in 64-row
    blocks); since the 56th every group size (with its 32-value slices, an H100, groups of
    128: 64.7 us against 68.9, each linear faster; 55th session)."""
    cfg = GemvTmaConfig(block_k=512)
    blocks = triton.cdiv(N, cfg.block_n)
    split = 1
    while blocks * split * 2 <= sms and K // (cfg.block_k * split * 2) >= 2:
        split *= 2
    return GemvTmaConfig(32, cfg.block_k, split, cfg.stages, cfg.num_warps)


def gemv_tma_eligible(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      block_k: int = 512) -> bool:
    """One bfloat16 row on Hopper, int4 words, groups of 32-128 (4 or more a K step of
    block_k: the scale box's 16 bytes), K in whole steps, TMA's alignments."""
    M, K = x.shape
    G = K // scale.shape[1]
    return M == 1 and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and \
        x.dtype == torch.bfloat16 and weight.dtype == torch.uint8 and G in (32, 64, 128) and \
        K % block_k == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and \
        x.data_ptr() % 16 == 0 and \
        scale.dtype == torch.float32 and scale.stride(1) == 1 and scale.stride(0) % 4 == 0 and \
        weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0


def w4_gemv_tma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor | None, bias: torch.Tensor | None,
                config: GemvTmaConfig | None = None, glu: int = 0,
                rope: RopeArgs | None = None) -> torch.Tensor:
    """x [1, K] bfloat16 @ dequant(int4 weight [N, K / 2] uint8, float32 scales and
    offsets [N, K / G])^T (+ bias) -> [1, N] bfloat16; glu 1 / 2 (a [gate | up] weight):
    act(gate) * up [1, N / 2] (SiLU / tanh GELU, rounded as kiln.kernels.silu_mul's);
    rope (a fused QKV weight): rotary(q) [1, num_heads * head_dim], rotary(k) and v into
    rope's caches (rope_takes). Both with K in one split."""
    _, K = x.shape
    N = weight.shape[0]
    G = K // scale.shape[1]
    cfg = config or gemv_tma_config(N, K, G)
    GW = cfg.block_k // G
    steps = K // cfg.block_k
    halves = bool(glu) or rope is not None  # a program's rows as two TMA boxes, one split
    k_per_split = K if halves else \
        triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    rows = cfg.block_n // 2 if halves else cfg.block_n  # a TMA box's
    head_dim = rope.cos_sin.shape[1] if rope is not None else 0
    out = torch.empty(1, N // 2 if glu else rope.num_heads * head_dim if rope is not None
                      else N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), split)
    part, counters = (torch.empty(split, N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, grid[0])) if split > 1 else (out, out)
    # TMA boxes of at most 256 values a dimension (x's pairs: BLOCK_K / 2), the scales'
    # at least 16 bytes wide; no swizzle (the threads read rows of words, not wgmma)
    assert cfg.block_k <= 512 and GW >= 4 and cfg.block_k % G == 0, cfg
    assert not glu or N % 2 == 0 and cfg.block_n % 2 == 0, (N, cfg)
    assert rope is None or rope_takes(N, rope, cfg.block_n), (N, cfg)
    words = weight.view(torch.int32)
    flat = gl.NVMMASharedLayout(0, 32, 2)
    w_desc = TensorDescriptor(words, [N, K // 8], [words.stride(0), 1],
                              [rows, cfg.block_k // 8], flat)
    o = offset if offset is not None else scale
    s_desc, o_desc = (TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows, GW], flat)
                      for t in (scale, o))
    pairs = x.view(torch.int32)
    x_desc = TensorDescriptor(pairs, [1, K // 2], [pairs.stride(0), 1], [1, cfg.block_k // 2],
                              flat)
    use_pdl = PDL and pdl.INT_GEMV and pdl.hopper(x)
    extra = rope.kernel_args(head_dim) if rope is not None else dict(
        pos_ptr=scale, cs_ptr=scale, kc_ptr=scale, vc_ptr=scale, slot_ptr=scale,
        **dict.fromkeys(("num_heads", "num_kv_heads", "block_size", "stride_cs", "stride_cb",
                         "stride_cslot", "stride_ch", "stride_vs", "stride_vh", "stride_vd"),
                        0))
    _w4_gemv_tma_kernel[grid](w_desc, s_desc, o_desc, x_desc, bias if bias is not None else
                              scale, out, part, counters, N, K, k_per_split, **extra, G=G,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
                              SPLIT_K=split, STAGES=cfg.stages, GLU=glu,
                              ROPE_HALF=head_dim // 2, PDL=use_pdl, num_warps=cfg.num_warps,
                              **pdl.launch_args(use_pdl))
    return out


def rope_takes(N: int, rope: RopeArgs, block_n: int) -> bool:
    """Whether the rotary epilogue takes a fused QKV weight of N rows in programs of
    block_n rows: the heads' rows (N = (num_heads + 2 num_kv_heads) head_dim), each
    program within one head (half a head a multiple of block_n / 2)."""
    head_dim = rope.cos_sin.shape[1]
    return N == (rope.num_heads + 2 * rope.num_kv_heads) * head_dim and \
        head_dim % 2 == 0 and (head_dim // 2) % (block_n // 2) == 0


def w4_gemv_tma_rope(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     offset: torch.Tensor | None, bias: torch.Tensor | None, rope: RopeArgs
                     ) -> torch.Tensor | None:
    """w4_gemv_tma with the rotary epilogue in its default launch, or None where the
    epilogue does not take it (rope_takes)."""
    cfg = gemv_tma_config(weight.shape[0], x.shape[1], x.shape[1] // scale.shape[1])
    if not rope_takes(weight.shape[0], rope, cfg.block_n):
        return None
    return w4_gemv_tma(x, weight, scale, offset, bias, cfg, rope=rope)
