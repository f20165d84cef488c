"""The int4 GEMV with its products in pairs of bfloat16 (IntGemmConfig.pairs): batch-1
decode of W4A16 engines whose activations are bfloat16 (the default since the eighteenth
session), and an opt-in version for 2-4 rows (_gemv_pairs_rows_kernel: each word
unpacked once, then multiplied with every row; KILN_INT_GEMVN's seventh field).

kiln's float GEMV (kiln.kernels.int_gemv1._gemv1_kernel) turns each weight into a
float32 and multiplies it in float32: ~5.9 SASS instructions a weight, and Nsight
Compute shows it bound by instruction issue, not by HBM (seventeenth session). Here a
32-bit word of eight int4 values becomes four bfloat16 pairs by bit operations (a shift,
then a byte permute and a masked or a pair: 2^7 + q in each half, exact), q - 8 (or q)
by one packed FMA a pair, and the word's dot product with x's eight values by four
packed FMAs (`fma.rn.bf16x2`, x read as pairs straight from memory), summed into float32
once a word: ~2.5 instructions a weight plus the word's scale (and offset) in float32.

Numerics: each product and the running sum of a word's four pairs round to bfloat16
(q - 8 is at most 8 in size, so a product keeps ~8 of its 12 bits); sums across words are
float32. The error of the result is of the same size as rounding the dequantized weight
to bfloat16 (the weight a bf16 engine or transformers holds): relative 2.3e-3 against
1.6e-3 at K 4096 (random weights and x, float64 reference), where the float GEMV's
is ~1e-6. The offset (w = s q + o) goes through the word's sum of x, in bfloat16 pairs
too: sum_i (s q_i + o) x_i = s sum_i (q_i - 8) x_i + (o + 8 s) sum_i x_i.

The arithmetic (inline PTX, and its emulation under TRITON_INTERPRET with integer and
float32 operations, so that CPU tests check the indexing and the rounding) is in
kiln.kernels.int_pairs_asm.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.int_gemv import _gemv1_load, _gemv1_store, _word_tile
from kiln.kernels.int_gemv_epilogues import epilogue_rows, epilogue_store, rows_tile
from kiln.kernels.int_launch import IntGemmConfig, split_length
from kiln.kernels.int_pairs_asm import _pair_dot, _pair_dot_q, _pair_sum, _pair_unpack
from kiln.kernels.pdl import pdl_start
from kiln.kernels.split_k import split_k_buffers

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if TYPE_CHECKING:
    from kiln.kernels.gemv_swap_rope import RopeArgs


@triton.jit
def _x_pairs(x_ptr, w0, word, end, MASKED: tl.constexpr):
    """x's four bfloat16 pairs of each word of the K step at word w0 (pairs 4 (w0 + word)
    .. + 3 of the int32 view: one vector load; MASKED: zeros from pair `end` on), as four
    int32 tensors [1, GROUPS, WPG] in value order."""
    offs = ((w0 + word) * 4)[:, :, :, None] + tl.arange(0, 4)[None, None, None, :]
    if MASKED:
        xv = tl.load(x_ptr + offs, mask=offs < end, other=0)
    else:
        xv = tl.load(x_ptr + offs)
    e, o = tl.split(tl.reshape(xv, (xv.shape[0], xv.shape[1], xv.shape[2], 2, 2)))
    x0, x2 = tl.split(e)
    x1, x3 = tl.split(o)
    return x0, x1, x2, x3


@triton.jit
def _pairs_step(acc, words, scale, offset, x_ptr, w0, word, k_end, MASKED: tl.constexpr,
                HAS_OFFSET: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a K step's products: the words (at word w0) with x's pairs, scaled (+ offset
    through the pairs' sums)."""
    x0, x1, x2, x3 = _x_pairs(x_ptr, w0, word, k_end // 2, MASKED)
    acc += _pair_dot(words, x0, x1, x2, x3, HAS_OFFSET, INTERPRET) * scale
    if HAS_OFFSET:
        acc += _pair_sum(x0, x1, x2, x3, INTERPRET) * (offset + 8.0 * scale)
    return acc


@triton.jit
def _gemv1_pairs_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                        N, K, W_PER_SPLIT, stride_wn, stride_sn, G: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GROUPS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
                        LOOP_STAGES: tl.constexpr = 1, PDL: tl.constexpr = False,
                        GLU: tl.constexpr = 0,
                        pos_ptr=None, cs_ptr=None, kc_ptr=None, vc_ptr=None, slot_ptr=None,
                        num_heads=0, num_kv_heads=0, block_size=1, stride_cs=0,
                        stride_cb=0, stride_cslot=0, stride_ch=0, stride_vs=0, stride_vh=0,
                        stride_vd=0, ROPE_HALF: tl.constexpr = 0,
                        PRELOAD: tl.constexpr = False):
    """out[n block] (+)= x[k split] . w[n block, k split] for one bfloat16 row x (x_ptr:
    x viewed as int32, a bfloat16 pair each). Tiles, K splits and the weight's words as
    in kiln.kernels.int_gemv1._gemv1_kernel (int4, PER = 8 values a word); each word's
    products summed in bfloat16 pairs (_pair_dot), scaled once a word in float32.
    LOOP_STAGES > 1: the K loop software-pipelined by Triton (cp.async LOOP_STAGES - 1
    steps ahead; the 31st session's sweep: faster at o and down with 8 splits). (The next
    step's loads issued first, as _gemv1_kernel's PREFETCH, lost at every shape but down,
    where it tied: eighteenth session.)
    PDL (launched with PDL; KILN_INT_PDL=0: not): waits for the kernel before, then lets
    the one after start. PRELOAD (KILN_INT_PRELOAD, on by default): the first K step's
    words, scales and offsets (which no kernel before writes) are loaded before the wait,
    so they stream while the kernel before finishes; x is read after it (INT4 batch 1 on
    an H100, 49th session: 385.5-387.1 tok/s against 376.4-378.9 without; the first two
    steps before the wait: 349.1 / 350.6).
    Epilogues (kiln.kernels.int_gemv_epilogues; not with ATOMIC): GLU (1: SiLU, 2: tanh
    GELU), w is [gate | up] (N rows) and out [N / 2] = act(gate) * up; ROPE_HALF (head_dim
    / 2), w is the fused QKV weight and out q's [num_heads * head_dim], rotary(k) and v
    written into the caches."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = BLOCK_K // 8 // GROUPS  # words per group in a step
    STEP: tl.constexpr = BLOCK_K // 8
    if GLU != 0 or ROPE_HALF > 0:
        offs_e, valid_e = epilogue_rows(pid_n, N, BLOCK_N, GLU, ROPE_HALF)
        mask_n, rows, s_rows, g, word = rows_tile(offs_e, valid_e, stride_sn, GROUPS, WPG)
    else:
        mask_n, rows, s_rows, g, word = _word_tile(pid_n, N, stride_sn, BLOCK_N, GROUPS, WPG)
    acc = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // 8)
    k_end = w_end * 8
    first = w_start
    if PRELOAD:  # the first step's weight loads before the wait (no split is empty)
        words, scale, offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word,
                                           w_start, k_end, G, stride_wn, 8, WPG, GROUPS,
                                           HAS_OFFSET, EVEN_K)
        pdl_start(PDL)
        acc = _pairs_step(acc, words, scale, offset, x_ptr, w_start, word, k_end, not EVEN_K,
                          HAS_OFFSET, INTERPRET)
        first = w_start + STEP
    else:
        pdl_start(PDL)
    for w0 in tl.range(first, w_end, STEP, num_stages=LOOP_STAGES):
        words, scale, offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word,
                                           w0, k_end, G, stride_wn, 8, WPG, GROUPS,
                                           HAS_OFFSET, EVEN_K)
        acc = _pairs_step(acc, words, scale, offset, x_ptr, w0, word, k_end, not EVEN_K,
                          HAS_OFFSET, INTERPRET)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if GLU != 0 or ROPE_HALF > 0:
        epilogue_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, N, BLOCK_N, HAS_BIAS,
                       SPLIT_K, INTERPRET, GLU, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                       num_heads, num_kv_heads, block_size, stride_cs, stride_cb,
                       stride_cslot, stride_ch, stride_vs, stride_vh, stride_vd, ROPE_HALF)
    else:
        _gemv1_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, N, BLOCK_N,
                     HAS_BIAS, ATOMIC, SPLIT_K, INTERPRET)


@triton.jit
def _row_step(acc, q0, q1, q2, q3, scale, offset, x_ptr, r, M, stride_xm, w0, word, k_end,
              HAS_OFFSET: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + row r's products with a K step's unpacked words (zeros past M rows)."""
    end = tl.where(r < M, k_end // 2, 0)  # the row's pairs (none past M)
    x0, x1, x2, x3 = _x_pairs(x_ptr + r * stride_xm, w0, word, end, True)
    acc += _pair_dot_q(q0, q1, q2, q3, x0, x1, x2, x3, INTERPRET) * scale
    if HAS_OFFSET:
        acc += _pair_sum(x0, x1, x2, x3, INTERPRET) * offset
    return acc


@triton.jit
def _row_out(acc, r, M, bias_ptr, out_ptr, stride_om, pid_n, pid_k, N,
             BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Row r's block of sums out: added into out's float32 buffer (ATOMIC: the first
    split adds the bias) or stored in out's dtype (one split)."""
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < tl.where(r < M, N, 0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, 1.0, 0.0) * bias
        y += bias
    if ATOMIC:
        tl.atomic_add(out_ptr + r * stride_om + offs, y, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptr + r * stride_om + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gemv_pairs_rows_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K,
                            W_PER_SPLIT, stride_xm, stride_wn, stride_sn, stride_om,
                            G: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
                            ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                            INTERPRET: tl.constexpr):
    """out[:M, n block] (+)= x[:M, k split] @ w[n block, k split]^T for 2 <= M <= ROWS <= 4
    bfloat16 rows (x_ptr: x viewed as int32, stride_xm in pairs): each K step's words
    unpacked into bfloat16 pairs once (_pair_unpack), then multiplied with every row
    (_pair_dot_q), as _gemv1_pairs_kernel does for one row. K splits meet by float32
    atomics (ATOMIC) or there is one."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = BLOCK_K // 8 // GROUPS
    STEP: tl.constexpr = BLOCK_K // 8
    mask_n, rows, s_rows, g, word = _word_tile(pid_n, N, stride_sn, BLOCK_N, GROUPS, WPG)
    acc0 = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // 8)
    k_end = w_end * 8
    for w0 in range(w_start, w_end, STEP):
        words, scale, offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word,
                                           w0, k_end, G, stride_wn, 8, WPG, GROUPS,
                                           HAS_OFFSET, EVEN_K)
        q0, q1, q2, q3 = _pair_unpack(words, HAS_OFFSET, INTERPRET)
        offset = offset + 8.0 * scale  # (with offsets the pairs hold q - 8)
        acc0 = _row_step(acc0, q0, q1, q2, q3, scale, offset, x_ptr, 0, M, stride_xm, w0,
                         word, k_end, HAS_OFFSET, INTERPRET)
        acc1 = _row_step(acc1, q0, q1, q2, q3, scale, offset, x_ptr, 1, M, stride_xm, w0,
                         word, k_end, HAS_OFFSET, INTERPRET)
        if ROWS > 2:
            acc2 = _row_step(acc2, q0, q1, q2, q3, scale, offset, x_ptr, 2, M, stride_xm, w0,
                             word, k_end, HAS_OFFSET, INTERPRET)
        if ROWS > 3:
            acc3 = _row_step(acc3, q0, q1, q2, q3, scale, offset, x_ptr, 3, M, stride_xm, w0,
                             word, k_end, HAS_OFFSET, INTERPRET)
    _row_out(acc0, 0, M, bias_ptr, out_ptr, stride_om, pid_n, pid_k, N, BLOCK_N, HAS_BIAS,
             ATOMIC)
    _row_out(acc1, 1, M, bias_ptr, out_ptr, stride_om, pid_n, pid_k, N, BLOCK_N, HAS_BIAS,
             ATOMIC)
    if ROWS > 2:
        _row_out(acc2, 2, M, bias_ptr, out_ptr, stride_om, pid_n, pid_k, N, BLOCK_N,
                 HAS_BIAS, ATOMIC)
    if ROWS > 3:
        _row_out(acc3, 3, M, bias_ptr, out_ptr, stride_om, pid_n, pid_k, N, BLOCK_N,
                 HAS_BIAS, ATOMIC)


PAIRS_ROWS = 4  # the most rows the pairs GEMV takes (_gemv_pairs_rows_kernel)


def pairs_eligible(x: torch.Tensor, bits: int, G: int, block_k: int) -> bool:
    """Where the pairs GEMV applies: int4, 1 to PAIRS_ROWS bfloat16 rows (at an even
    offset and stride: read as pairs), K steps of whole groups or inside one (the float
    GEMV's word tiles)."""
    return bits == 4 and x.dtype == torch.bfloat16 and 1 <= x.shape[0] <= PAIRS_ROWS and \
        (x.shape[0] == 1 or x.stride(0) % 2 == 0) and x.storage_offset() % 2 == 0 and \
        block_k % 8 == 0 and \
        (G % block_k == 0 or (block_k % G == 0 and G % 8 == 0))


def word_aligned(weight: torch.Tensor) -> bool:
    """Whether the packed weight reads as 32-bit words (the word GEMVs')."""
    return weight.shape[1] % 4 == 0 and weight.stride(0) % 4 == 0 and \
        weight.storage_offset() % 4 == 0


def pairs_launch(x: torch.Tensor, scale: torch.Tensor, cfg: IntGemmConfig, bits: int,
                 words: bool) -> tuple | None:
    """pairs_gemv's arguments after (x, weight, scale, offset, bias) for the GEMV launch cfg
    (block_n, block_k, groups, inputs a split, fixup, warps, stages, interpret, loop
    stages), or None where it is not the pairs GEMV: cfg asks for another, or x and the
    weight (words: word_aligned) do not take it (pairs_eligible; K steps of whole groups
    of whole words)."""
    K = x.shape[1]
    G = K // scale.shape[1]
    block_k = min(cfg.block_k, max(32, triton.next_power_of_2(K)))
    groups = 1 if G % block_k == 0 else block_k // G if block_k % G == 0 and G % 8 == 0 else 0
    if not (cfg.pairs and cfg.block_m == 0 and words and block_k % 8 == 0 and groups
            and pairs_eligible(x, bits, G, block_k)):
        return None
    return (cfg.block_n, block_k, groups, split_length(K, cfg.split_k, block_k), cfg.fixup,
            cfg.num_warps, cfg.num_stages, _INTERPRET, cfg.num_stages if cfg.pipeline else 1)


def pairs_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, block_n: int,
               block_k: int, groups: int, k_per_split: int, fixup: bool, num_warps: int,
               num_stages: int, interpret: bool, loop_stages: int = 1,
               pdl_launch: bool | None = None, glu: int = 0,
               rope: RopeArgs | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 (M <= PAIRS_ROWS) @ dequant(int4 weight)^T -> [M, N] bfloat16
    (_gemv1_pairs_kernel for one row, _gemv_pairs_rows_kernel for more: K splits by
    atomics there; fixup and loop_stages are one row's only). pdl_launch (default
    kiln.kernels.pdl.INT_GEMV, on sm_90): one row without a zeroed workspace launched with
    PDL. glu (1: SiLU, 2: tanh GELU; one row, splits summed in the kernel or one): weight
    is [gate | up] and the result [1, N / 2] = act(x @ gate^T) * (x @ up^T), the bits of
    this GEMV followed by kiln's SiLU*mul kernel. rope (one row, as glu): weight is the
    fused QKV one; returns rotary(q) [1, num_heads * head_dim], rotary(k) and v written
    into the caches, the bits of this GEMV followed by kiln.kernels.rotary_kv."""
    M, K = x.shape
    N = weight.shape[0]
    splits = triton.cdiv(K, k_per_split)
    blocks = triton.cdiv(N // 2, block_n // 2) if glu else triton.cdiv(N, block_n)
    out, part, counters, atomic = split_k_buffers(M, N, splits, blocks, fixup and M == 1,
                                                  x.dtype, x.device)
    extra = {}
    if glu or rope is not None:
        assert M == 1 and not atomic and not (glu and rope), \
            "an epilogue takes one row, its K splits summed in the kernel"
        assert not glu or (N % 2 == 0 and block_n % 2 == 0)
        cols = N // 2 if glu else rope.num_heads * rope.cos_sin.shape[1]
        out = torch.empty(1, cols, dtype=x.dtype, device=x.device)
        if rope is not None:
            extra = dict(rope.kernel_args(rope.cos_sin.shape[1]),
                         ROPE_HALF=rope.cos_sin.shape[1] // 2)
    args = (x.view(torch.int32), weight.view(torch.int32), scale,
            offset if offset is not None else scale, bias if bias is not None else scale, out)
    meta = dict(G=K // scale.shape[1], BLOCK_N=block_n, BLOCK_K=block_k,
                HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, GROUPS=groups,
                ATOMIC=atomic, EVEN_K=K % k_per_split == 0 and k_per_split % block_k == 0,
                INTERPRET=interpret, num_warps=num_warps, num_stages=num_stages)
    if M > 1:
        _gemv_pairs_rows_kernel[(blocks, splits)](
            *args, M, N, K, k_per_split // 8, x.stride(0) // 2, weight.stride(0) // 4,
            scale.stride(0), out.stride(0), ROWS=max(2, triton.next_power_of_2(M)), **meta)
    else:
        use_pdl = (pdl.INT_GEMV if pdl_launch is None else pdl_launch) and not atomic and \
            pdl.hopper(x)
        _gemv1_pairs_kernel[(blocks, splits)](
            *args, part, counters, N, K, k_per_split // 8, weight.stride(0) // 4,
            scale.stride(0), SPLIT_K=splits if fixup else 1, LOOP_STAGES=loop_stages,
            PDL=use_pdl, GLU=glu, PRELOAD=pdl.INT_PRELOAD, **meta, **extra,
            **pdl.launch_args(use_pdl))
    return out.to(x.dtype) if atomic else out

