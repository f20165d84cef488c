"""Where the context splits of decode attention (kiln.kernels.attention_decode) meet.

A split s of a (sequence, KV head) writes its normalised partial output o_s and
lse_s = m_s + log2(l_s) (base 2); the final output is

    o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),  M = max_s lse_s

over the splits that covered part of the context. Either a second launch does it
(_reduce_kernel, a program per (sequence, query head); KILN_DECODE_FUSED_REDUCE=0), or by
default the decode kernel itself (combine_splits): every split counts itself in at a counter
of its (sequence, KV head) after its partials are visible device-wide, and the one that
arrives last combines all of them, in split order, and zeroes the counter again (the
protocol of kiln.kernels.split_k's GEMMs, whose counters it shares). That saves a launch a
layer where decode splits the context (batch 1 to ~32), at the price of the last split's
reading the others' partials.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from kiln.kernels.paged import context_start

# The decode kernel combines its splits (0: the reduce launch). H200, 29th session, batch 1,
# 128 / 256, alternating: bf16 157.5 / 157.5 vs 156.9 / 156.9 tok/s (with the swapped GEMV
# then), FP8 + FP8 KV 335.9 vs 334.1; its GPU tests and the engine tests passed with it on.
FUSED_REDUCE = os.environ.get("KILN_DECODE_FUSED_REDUCE", "1") != "0"


@triton.jit
def _split_len(ctx_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Context tokens per split: the keys shared evenly, rounded up to whole tiles."""
    per_split = (ctx_len + NUM_SPLITS - 1) // NUM_SPLITS
    return tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N


@triton.jit
def _active_splits(seq_len, window, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   WINDOW: tl.constexpr):
    """How many splits (the first ones) got part of the context."""
    ctx_len = seq_len - context_start(seq_len, window, WINDOW)
    split_len = _split_len(ctx_len, NUM_SPLITS, BLOCK_N)
    return (ctx_len + split_len - 1) // split_len


@triton.jit
def _reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, stride_ot, stride_oh, window,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr,
):
    """The module doc's o for one (sequence, query head); partials laid out [seq, head,
    split, d] and [seq, head, split]."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_active = _active_splits(tl.load(seq_lens_ptr + seq), window, NUM_SPLITS, BLOCK_N,
                                WINDOW)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    active = offs_s < num_active
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split: all weights 0
    weight = tl.where(active, tl.exp2(lse - lse_max), 0.0)
    parts = tl.load(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                    mask=active[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.maximum(tl.sum(weight, axis=0), 1e-30)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def combine_splits(out_ptr, out_off, io_mask, part_out_ptr, part_lse_ptr, part, count_ptr,
                   seq, kv_head, num_active, offs_g, offs_d, GROUP: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """Called by every split of a (sequence, KV head), after its partials are stored (an
    empty split stores none): counts it in; the last to arrive writes the module doc's o
    for the GROUP query heads (part: their [seq, head, split] index of split 0)."""
    if not INTERPRET:  # each thread's partials visible device-wide before the count
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [offs_d],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    tile = seq * tl.num_programs(1) + kv_head
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_SPLITS - 1:
        mask_g = offs_g < GROUP
        lse_max = tl.full(offs_g.shape, float("-inf"), tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            active = (offs_g * 0 + s) < num_active  # a vector: the interpreter's masks
            lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + part + s,
                                                  mask=mask_g & active, other=float("-inf"),
                                                  cache_modifier=".cg"))
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        num = tl.zeros([offs_g.shape[0], BLOCK_D], tl.float32)
        den = tl.zeros(offs_g.shape, tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            active = (offs_g * 0 + s) < num_active
            lse = tl.load(part_lse_ptr + part + s, mask=mask_g & active,
                          other=float("-inf"), cache_modifier=".cg")
            weight = tl.where(active, tl.exp2(lse - lse_max), 0.0)
            o_s = tl.load(part_out_ptr + (part + s)[:, None] * BLOCK_D + offs_d[None, :],
                          mask=io_mask & active[:, None], other=0.0, cache_modifier=".cg")
            num += o_s * weight[:, None]
            den += weight
        out = num / tl.maximum(den, 1e-30)[:, None]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)
        tl.store(count_ptr + tile, 0)
