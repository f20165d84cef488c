"""The one-row GEMV of the integer-weight linear layers (batch-1 decode; kiln.kernels.int_gemm
picks it where the INT4 pairs GEMV does not apply: INT8 weights, float16 / float32 x). Its
pieces (_word_tile, _gemv1_load, _factored_step, _gemv1_store) are shared with the other word
GEMVs in kiln.kernels.int_gemv."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.int_gemv import (
    _factored_step,
    _gemv1_load,
    _gemv1_store,
    _word_tile,
    _x_at,
)
from kiln.kernels.int_launch import IntGemmConfig, split_length
from kiln.kernels.pdl import pdl_start
from kiln.kernels.split_k import split_k_buffers

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gemv1_step(acc, words, scale, offset, x_ptr, w0, word, k_end, BITS: tl.constexpr,
                PER: tl.constexpr, MASK: tl.constexpr, BIAS: tl.constexpr,
                HAS_OFFSET: tl.constexpr, EVEN_K: tl.constexpr, FACTORED: tl.constexpr,
                XVEC: tl.constexpr):
    """acc + the products of the K step at word w0 (its words, scales, offsets loaded)."""
    kw = w0 * PER + PER * word  # the first k of each word
    if FACTORED:
        acc = _factored_step(acc, words, scale, offset, x_ptr, kw, k_end, BITS, PER,
                             HAS_OFFSET, EVEN_K, XVEC)
    else:
        for i in tl.static_range(PER):
            u = (words >> (BITS * i)) & MASK
            if BITS == 8:
                u = u ^ 0x80
            q = (u | 0x4B000000).to(tl.float32, bitcast=True) - BIAS
            w = q * scale
            if HAS_OFFSET:
                w = w + offset
            acc += w * _x_at(x_ptr, kw, i, k_end, EVEN_K)
    return acc


@triton.jit
def _gemv1_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, N, K,
                  G: tl.constexpr, W_PER_SPLIT, stride_wn, stride_sn,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
                  ATOMIC: tl.constexpr, EVEN_K: tl.constexpr = False,
                  PREFETCH: tl.constexpr = False, FACTORED: tl.constexpr = False,
                  XVEC: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
                  INTERPRET: tl.constexpr = False, LOOP_STAGES: tl.constexpr = 1,
                  PDL: tl.constexpr = False, PRELOAD: tl.constexpr = False):
    """out[n block] (+)= x[k split] . w[n block, k split] for one row x (batch-1 decode).

    The weight is read as 32-bit words (w_ptr is the storage viewed as int32, stride_wn in
    words): word j of a row holds k = PER j .. PER j + PER - 1 (PER = 8 nibbles or 4
    bytes, the lowest bits first). Each value becomes a float with integer ops only, as
    the mantissa of 2^23: float(bits(2^23) | u) - 2^23 = u exactly (int8 goes through
    u = q + 128); so the loop is shifts, masks and FMAs, no quarter-rate int -> float
    conversions, and the weight is not rounded to x's dtype (the dequantized value in
    float32, as the tests bound it). A K step spans GROUPS whole quantization groups (1
    when it lies in one): tiles are [BLOCK_N, GROUPS, words per group], so each row loads
    one scale (and offset) per group and step. Products accumulate elementwise in float32
    registers over the whole K loop and are summed once at the end.
    PREFETCH: the next step's words are loaded before this step's are used, so each
    program has two steps of loads in flight (the kernel waits on memory latency, not on
    bandwidth, with one).
    FACTORED: _factored_step, fewer instructions a weight (sm_90 SASS of the K loop at the
    8B shape, Triton 3.6: int4 g128 64 x 128 5.9 vs 7.7, 512 x 32 4.9 vs 6.9, 32 x 256 7.6
    vs 8.9; int8 32 x 256 5.4 vs 6.8); XVEC: x read as one vector a word (32 x 256: 6.5,
    elsewhere within 0.2 of FACTORED alone; x passes through shared memory).
    Splits of K (program_id 1) meet either by float32 atomics into a zeroed buffer
    (ATOMIC: the caller zeroes it and casts the sum, two more launches) or, SPLIT_K > 1,
    through split_k_fixup: the last split of a block sums the partials and stores the
    result in out's dtype (one launch).
    LOOP_STAGES > 1: the K loop software-pipelined by Triton, each step's words (scales,
    offsets) copied asynchronously (cp.async) LOOP_STAGES - 1 steps ahead into shared
    memory; 1: loads into registers as the step needs them (the same SASS as a plain
    range; Triton pipelines loads on its own only where they feed tl.dot).
    PDL (launched with PDL; INT8 unless KILN_INT8_PDL=0): waits for the
    kernel before (which wrote x), then lets the next start; PRELOAD (with it): the first
    K step's words, scales and offsets loaded before the wait, as the INT4 pairs GEMV does
    (kiln.kernels.pdl); PREFETCH loads them there anyway."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BIAS: tl.constexpr = 8388608.0 + (128.0 if BITS == 8 else 0.0)
    WPG: tl.constexpr = BLOCK_K // PER // GROUPS  # words per group in a step
    STEP: tl.constexpr = BLOCK_K // PER
    mask_n, rows, s_rows, g, word = _word_tile(pid_n, N, stride_sn, BLOCK_N, GROUPS, WPG)
    acc = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    # The loop runs over words (W_PER_SPLIT words a split, specialized as a multiple of
    # 16): the compiler then knows where rows' words are 16-byte aligned.
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // PER)
    k_end = w_end * PER
    # the first step's loads come before the PDL wait (no kernel before writes them)
    first = w_start
    if PREFETCH:
        words, scale, offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word,
                                           w_start, k_end, G, stride_wn, PER, WPG, GROUPS,
                                           HAS_OFFSET, EVEN_K)
        pdl_start(PDL)
    elif PRELOAD:  # the first step done here, the loop from the second
        p_words, p_scale, p_offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g,
                                                 word, w_start, k_end, G, stride_wn, PER, WPG,
                                                 GROUPS, HAS_OFFSET, EVEN_K)
        pdl_start(PDL)
        acc = _gemv1_step(acc, p_words, p_scale, p_offset, x_ptr, w_start, word, k_end, BITS,
                          PER, MASK, BIAS, HAS_OFFSET, EVEN_K, FACTORED, XVEC)
        first = w_start + STEP
    else:
        pdl_start(PDL)
    for w0 in tl.range(first, w_end, STEP, num_stages=LOOP_STAGES):
        if PREFETCH:
            # EVEN_K: the last step reloads itself (cached) instead of masking every load
            w_next = tl.minimum(w0 + STEP, w_end - STEP) if EVEN_K else w0 + STEP
            n_words, n_scale, n_offset = _gemv1_load(
                w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w_next, k_end, G,
                stride_wn, PER, WPG, GROUPS, HAS_OFFSET, EVEN_K)
        else:
            words, scale, offset = _gemv1_load(
                w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w0, k_end, G,
                stride_wn, PER, WPG, GROUPS, HAS_OFFSET, EVEN_K)
        acc = _gemv1_step(acc, words, scale, offset, x_ptr, w0, word, k_end, BITS, PER, MASK,
                          BIAS, HAS_OFFSET, EVEN_K, FACTORED, XVEC)
        if PREFETCH:
            words, scale, offset = n_words, n_scale, n_offset
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    _gemv1_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, N, BLOCK_N,
                 HAS_BIAS, ATOMIC, SPLIT_K, INTERPRET)


def gemv1(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
          offset: torch.Tensor | None, bias: torch.Tensor | None, cfg: IntGemmConfig,
          bits: int, block_k: int, groups: int) -> torch.Tensor:
    """x [1, K] @ dequant(weight)^T (+ bias) -> [1, N] in x's dtype by _gemv1_kernel in
    cfg's launch (block_k and groups as kiln.kernels.int_gemm.int_weight_linear resolved
    them). INT8 weights launched with PDL where kiln.kernels.pdl.INT8_GEMV says so (not
    with atomics: their buffer is zeroed by a launch before)."""
    K = x.shape[1]
    N = weight.shape[0]
    k_per_split = split_length(K, cfg.split_k, block_k)
    splits = triton.cdiv(K, k_per_split)
    blocks = triton.cdiv(N, cfg.block_n)
    out, part, counters, atomic = split_k_buffers(1, N, splits, blocks, cfg.fixup, x.dtype,
                                                  x.device)
    use_pdl = pdl.INT8_GEMV and bits == 8 and not atomic and pdl.hopper(x)
    _gemv1_kernel[(blocks, splits)](
        x, weight.view(torch.int32), scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, part, counters, N, K, K // scale.shape[1],
        k_per_split // (32 // bits), weight.stride(0) // 4, scale.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, BITS=bits, HAS_OFFSET=offset is not None,
        HAS_BIAS=bias is not None, GROUPS=groups, ATOMIC=atomic,
        EVEN_K=K % k_per_split == 0 and k_per_split % block_k == 0, PREFETCH=cfg.prefetch,
        FACTORED=cfg.factored, XVEC=cfg.xvec, SPLIT_K=splits if cfg.fixup else 1,
        INTERPRET=_INTERPRET, LOOP_STAGES=cfg.num_stages if cfg.pipeline else 1, PDL=use_pdl,
        PRELOAD=pdl.INT8_GEMV and bits == 8, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl.launch_args(use_pdl))
    return out.to(x.dtype) if atomic else out
