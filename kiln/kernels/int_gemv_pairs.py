"""The one-row int4 GEMV with its products in pairs of bfloat16 (IntGemmConfig.pairs):
batch-1 decode of W4A16 engines whose activations are bfloat16.

kiln's float GEMV (kiln.kernels.int_gemv._gemv1_kernel) turns each weight into a
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

Under TRITON_INTERPRET the same arithmetic is emulated with integer and float32
operations (bfloat16 rounding to nearest even on the bits), so CPU tests check the
indexing and the rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.int_gemv import _gemv1_load, _gemv1_store

# Eight int4 values ($1: the word, value i at bits 4i) against x's eight bfloat16 values as
# four pairs ($2..$5, pair j holding x[2j], x[2j + 1]) -> the float32 sum of the products
# of (q - BASE) and x ($0). Byte j of the word and byte j of the word shifted by 4 go to the
# low and high halves (prmt), masked to their low nibble and or'd with 2^7's bits (lop3):
# the pair (2^7 + q[2j], 2^7 + q[2j + 1]) in the order of x's pair.
_PAIRS_ASM = """{
.reg .b32 w4, m0, m1, m2, m3, one, base, acc;
.reg .f32 lo, hi;
mov.b32 one, 0x3F803F80;
mov.b32 base, BASE;
mov.b32 acc, 0x80008000;
shr.u32 w4, $1, 4;
prmt.b32 m0, $1, w4, 0x4400;
prmt.b32 m1, $1, w4, 0x5511;
prmt.b32 m2, $1, w4, 0x6622;
prmt.b32 m3, $1, w4, 0x7733;
lop3.b32 m0, m0, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m1, m1, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m2, m2, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m3, m3, 0x000F000F, 0x43004300, 0xea;
fma.rn.bf16x2 m0, m0, one, base;
fma.rn.bf16x2 m1, m1, one, base;
fma.rn.bf16x2 m2, m2, one, base;
fma.rn.bf16x2 m3, m3, one, base;
fma.rn.bf16x2 acc, m0, $2, acc;
fma.rn.bf16x2 acc, m1, $3, acc;
fma.rn.bf16x2 acc, m2, $4, acc;
fma.rn.bf16x2 acc, m3, $5, acc;
shl.b32 w4, acc, 16;
and.b32 acc, acc, 0xFFFF0000;
mov.b32 lo, w4;
mov.b32 hi, acc;
add.f32 $0, lo, hi;
}"""
_PAIRS_SIGNED = tl.constexpr(_PAIRS_ASM.replace("BASE", "0xC308C308"))  # -136: q - 8
_PAIRS_UNSIGNED = tl.constexpr(_PAIRS_ASM.replace("BASE", "0xC300C300"))  # -128: q

# The sum of x's eight values ($1..$4 as above) in bfloat16 pairs, then float32.
_SUM_ASM = tl.constexpr("""{
.reg .b32 one, a, b;
.reg .f32 lo, hi;
mov.b32 one, 0x3F803F80;
fma.rn.bf16x2 a, $1, one, $2;
fma.rn.bf16x2 b, $3, one, $4;
fma.rn.bf16x2 a, a, one, b;
shl.b32 b, a, 16;
and.b32 a, a, 0xFFFF0000;
mov.b32 lo, b;
mov.b32 hi, a;
add.f32 $0, lo, hi;
}""")


@triton.jit
def _round_bf16(f):
    """float32 rounded to the nearest bfloat16 (ties to even), as float32 (the emulation)."""
    b = f.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _halves(pair):
    """A bfloat16 pair (int32) as two float32: (low half, high half)."""
    return (pair << 16).to(tl.float32, bitcast=True), \
        (pair & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _pair_dot(words, x0, x1, x2, x3, SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    """sum_i (q_i - 8 SIGNED) x_i over each word's eight values, float32 (see _PAIRS_ASM)."""
    if INTERPRET:
        acc_lo = tl.zeros(words.shape, dtype=tl.float32)
        acc_hi = tl.zeros(words.shape, dtype=tl.float32)
        xs = (x0, x1, x2, x3)
        for j in tl.static_range(4):
            q_lo = ((words >> (8 * j)) & 0xF).to(tl.float32) - 8.0 * SIGNED
            q_hi = ((words >> (8 * j + 4)) & 0xF).to(tl.float32) - 8.0 * SIGNED
            x_lo, x_hi = _halves(xs[j])
            acc_lo = _round_bf16(q_lo * x_lo + acc_lo)
            acc_hi = _round_bf16(q_hi * x_hi + acc_hi)
        p = acc_lo + acc_hi
    elif SIGNED:  # (one return: a return inside a compile-time branch does not end it)
        p = tl.inline_asm_elementwise(_PAIRS_SIGNED, "=f,r,r,r,r,r", [words, x0, x1, x2, x3],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        p = tl.inline_asm_elementwise(_PAIRS_UNSIGNED, "=f,r,r,r,r,r",
                                      [words, x0, x1, x2, x3], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return p


@triton.jit
def _pair_sum(x0, x1, x2, x3, INTERPRET: tl.constexpr):
    """sum_i x_i over a word's eight values (see _SUM_ASM), float32."""
    if INTERPRET:
        a_lo, a_hi = _halves(x0)
        b_lo, b_hi = _halves(x1)
        c_lo, c_hi = _halves(x2)
        d_lo, d_hi = _halves(x3)
        lo = _round_bf16(_round_bf16(a_lo + b_lo) + _round_bf16(c_lo + d_lo))
        hi = _round_bf16(_round_bf16(a_hi + b_hi) + _round_bf16(c_hi + d_hi))
        s = lo + hi
    else:
        s = tl.inline_asm_elementwise(_SUM_ASM, "=f,r,r,r,r", [x0, x1, x2, x3],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return s


@triton.jit
def _pairs_load(x_ptr, w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w0, k_end, G,
                stride_wn, WPG: tl.constexpr, GROUPS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                EVEN_K: tl.constexpr):
    """The K step at word w0: the weight's words, their groups' scales (offsets) and x's
    four pairs of each word ([1, GROUPS, WPG, 4], pairs 4 (w0 + word) .. + 3: one vector
    load)."""
    words, scale, offset = _gemv1_load(w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word,
                                       w0, k_end, G, stride_wn, 8, WPG, GROUPS, HAS_OFFSET,
                                       EVEN_K)
    offs = ((w0 + word) * 4)[:, :, :, None] + tl.arange(0, 4)[None, None, None, :]
    if EVEN_K:
        xv = tl.load(x_ptr + offs)
    else:
        xv = tl.load(x_ptr + offs, mask=offs < k_end // 2, other=0)
    return words, scale, offset, xv


@triton.jit
def _gemv1_pairs_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                        N, K, W_PER_SPLIT, stride_wn, stride_sn, G: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GROUPS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
                        PREFETCH: tl.constexpr = False, LOOP_STAGES: tl.constexpr = 1):
    """out[n block] (+)= x[k split] . w[n block, k split] for one bfloat16 row x (x_ptr:
    x viewed as int32, a bfloat16 pair each). Tiles, K splits and the weight's words as
    in kiln.kernels.int_gemv._gemv1_kernel (int4, PER = 8 values a word); each word's
    products summed in bfloat16 pairs (_pair_dot), scaled once a word in float32.
    PREFETCH: the next K step's loads issued before this step's math (slower in the
    eighteenth session's sweep but at down). LOOP_STAGES > 1: the K loop
    software-pipelined by Triton (cp.async LOOP_STAGES - 1 steps ahead; untimed)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = BLOCK_K // 8 // GROUPS  # words per group in a step
    STEP: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < N)[:, None, None]
    rows = offs_n.to(tl.int64)[:, None, None]
    s_rows = rows * stride_sn
    g = tl.arange(0, GROUPS)[None, :, None]
    word = g * WPG + tl.arange(0, WPG)[None, None, :]  # [1, GROUPS, WPG] in the step
    acc = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
    w_start = pid_k * W_PER_SPLIT
    w_end = tl.minimum(w_start + W_PER_SPLIT, K // 8)
    k_end = w_end * 8
    if PREFETCH:
        words, scale, offset, xv = _pairs_load(x_ptr, w_ptr, s_ptr, o_ptr, rows, s_rows,
                                               mask_n, g, word, w_start, k_end, G, stride_wn,
                                               WPG, GROUPS, HAS_OFFSET, EVEN_K)
    for w0 in tl.range(w_start, w_end, STEP, num_stages=LOOP_STAGES):
        if PREFETCH:  # the next step's loads issued before this step's math
            # EVEN_K: the last step reloads itself (cached) instead of masking every load
            w_next = tl.minimum(w0 + STEP, w_end - STEP) if EVEN_K else w0 + STEP
            n_words, n_scale, n_offset, n_xv = _pairs_load(
                x_ptr, w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w_next, k_end, G,
                stride_wn, WPG, GROUPS, HAS_OFFSET, EVEN_K)
        else:
            words, scale, offset, xv = _pairs_load(
                x_ptr, w_ptr, s_ptr, o_ptr, rows, s_rows, mask_n, g, word, w0, k_end, G,
                stride_wn, WPG, GROUPS, HAS_OFFSET, EVEN_K)
        e, o = tl.split(tl.reshape(xv, (1, GROUPS, WPG, 2, 2)))
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        acc += _pair_dot(words, x0, x1, x2, x3, HAS_OFFSET, INTERPRET) * scale
        if HAS_OFFSET:
            acc += _pair_sum(x0, x1, x2, x3, INTERPRET) * (offset + 8.0 * scale)
        if PREFETCH:
            words, scale, offset, xv = n_words, n_scale, n_offset, n_xv
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    _gemv1_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_k, N, BLOCK_N,
                 HAS_BIAS, ATOMIC, SPLIT_K, INTERPRET)


def pairs_eligible(x: torch.Tensor, bits: int, G: int, block_k: int) -> bool:
    """Where the pairs GEMV applies: int4, one bfloat16 row, K steps of whole groups or
    inside one (the float GEMV's word tiles)."""
    return bits == 4 and x.dtype == torch.bfloat16 and x.shape[0] == 1 and \
        block_k % 8 == 0 and (G % block_k == 0 or (block_k % G == 0 and G % 8 == 0))


def pairs_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, block_n: int,
               block_k: int, groups: int, k_per_split: int, fixup: bool, num_warps: int,
               num_stages: int, interpret: bool, split_counters, prefetch: bool = False,
               loop_stages: int = 1) -> torch.Tensor:
    """x [1, K] bfloat16 @ dequant(int4 weight)^T -> [1, N] bfloat16 (_gemv1_pairs_kernel)."""
    K = x.shape[1]
    N = weight.shape[0]
    G = K // scale.shape[1]
    splits = triton.cdiv(K, k_per_split)
    blocks = triton.cdiv(N, block_n)
    atomic = splits > 1 and not fixup
    out = torch.zeros(N, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(N, dtype=x.dtype, device=x.device)
    part, counters = (torch.empty(splits, N, dtype=torch.float32, device=x.device),
                      split_counters(x.device, blocks)) if splits > 1 and fixup else (out, out)
    _gemv1_pairs_kernel[(blocks, splits)](
        x.contiguous().view(torch.int32), weight.view(torch.int32), scale,
        offset if offset is not None else scale,
        bias if bias is not None else scale, out, part, counters, N, K, k_per_split // 8,
        weight.stride(0) // 4, scale.stride(0), G=G, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, GROUPS=groups,
        ATOMIC=atomic, EVEN_K=K % k_per_split == 0 and k_per_split % block_k == 0,
        SPLIT_K=splits if fixup else 1, INTERPRET=interpret, PREFETCH=prefetch,
        LOOP_STAGES=loop_stages,
        num_warps=num_warps,
        num_stages=num_stages)
    return (out.to(x.dtype) if atomic else out).view(1, N)
