"""The bfloat16-pair arithmetic of kiln.kernels.int_gemv_pairs: int4 words unpacked into
bfloat16 pairs and multiplied with x's pairs by inline PTX (packed `fma.rn.bf16x2`), and
the same roundings emulated with integer and float32 operations under TRITON_INTERPRET
(so that CPU tests check them)."""

from __future__ import annotations

import triton
import triton.language as tl

# Eight int4 values (W: the word, value i at bits 4i) -> four bfloat16 pairs m0..m3 of
# q - 8 (or q): byte j of the word and byte j of the word shifted by 4 go to the low and
# high halves (prmt), masked to their low nibble and or'd with 2^7's bits (lop3), which
# reads 2^7 + q exactly; one packed FMA takes BASE off. Pair j holds values 2j, 2j + 1:
# the order of x's pairs.
_UNPACK = """shr.u32 w4, W, 4;
prmt.b32 m0, W, w4, 0x4400;
prmt.b32 m1, W, w4, 0x5511;
prmt.b32 m2, W, w4, 0x6622;
prmt.b32 m3, W, w4, 0x7733;
lop3.b32 m0, m0, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m1, m1, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m2, m2, 0x000F000F, 0x43004300, 0xea;
lop3.b32 m3, m3, 0x000F000F, 0x43004300, 0xea;
mov.b32 one, 0x3F803F80;
mov.b32 base, BASE;
fma.rn.bf16x2 m0, m0, one, base;
fma.rn.bf16x2 m1, m1, one, base;
fma.rn.bf16x2 m2, m2, one, base;
fma.rn.bf16x2 m3, m3, one, base;
"""
# The four pairs Q0..Q3 against x's eight bfloat16 values as four pairs X0..X3 (pair j:
# x[2j], x[2j + 1]): products and their running sum in bfloat16 pairs, the two halves
# added in float32 (OUT).
_DOT = """mov.b32 acc, 0x80008000;
fma.rn.bf16x2 acc, Q0, X0, acc;
fma.rn.bf16x2 acc, Q1, X1, acc;
fma.rn.bf16x2 acc, Q2, X2, acc;
fma.rn.bf16x2 acc, Q3, X3, acc;
shl.b32 lo_b, acc, 16;
and.b32 acc, acc, 0xFFFF0000;
mov.b32 lo, lo_b;
mov.b32 hi, acc;
add.f32 OUT, lo, hi;
"""
_REGS = ".reg .b32 w4, m0, m1, m2, m3, one, base, acc, lo_b;\n.reg .f32 lo, hi;\n"


def _asm(body: str, **names: str) -> str:
    for name, value in names.items():
        body = body.replace(name, value)
    return "{\n" + _REGS + body + "}"


_XS = dict(X0="$2", X1="$3", X2="$4", X3="$5")
_MS = dict(Q0="m0", Q1="m1", Q2="m2", Q3="m3")
# one row: $0 = the word's dot product, $1 the word, $2..$5 x's pairs
_SIGNED, _UNSIGNED = "0xC308C308", "0xC300C300"  # bfloat16 pairs -136 (q - 8), -128 (q)
_PAIRS_SIGNED, _PAIRS_UNSIGNED = (
    tl.constexpr(_asm(_UNPACK + _DOT, W="$1", BASE=base, OUT="$0", **_MS, **_XS))
    for base in (_SIGNED, _UNSIGNED))
# several rows: the word's pairs once ($0..$3 from the word $4), then a dot a row
_UNPACK_SIGNED, _UNPACK_UNSIGNED = (
    tl.constexpr(_asm(_UNPACK + "mov.b32 $0, m0;\nmov.b32 $1, m1;\nmov.b32 $2, m2;\n"
                      "mov.b32 $3, m3;\n", W="$4", BASE=base))
    for base in (_SIGNED, _UNSIGNED))
_DOT_Q = tl.constexpr(_asm(_DOT, Q0="$1", Q1="$2", Q2="$3", Q3="$4", X0="$5", X1="$6",
                           X2="$7", X3="$8", OUT="$0"))

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
    """sum_i (q_i - 8 SIGNED) x_i over each word's eight values, float32 (_UNPACK then
    _DOT in one asm block; emulated as _pair_unpack then _pair_dot_q)."""
    if INTERPRET:
        q0, q1, q2, q3 = _pair_unpack(words, SIGNED, INTERPRET)
        p = _pair_dot_q(q0, q1, q2, q3, x0, x1, x2, x3, INTERPRET)
    elif SIGNED:  # (one return: a return inside a compile-time branch does not end it)
        p = tl.inline_asm_elementwise(_PAIRS_SIGNED, "=f,r,r,r,r,r", [words, x0, x1, x2, x3],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        p = tl.inline_asm_elementwise(_PAIRS_UNSIGNED, "=f,r,r,r,r,r",
                                      [words, x0, x1, x2, x3], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return p


@triton.jit
def _pair_unpack(words, SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    """A word's eight values as four bfloat16 pairs (int32) of q - 8 SIGNED."""
    if INTERPRET:
        pairs = []
        for j in tl.static_range(4):
            q_lo = ((words >> (8 * j)) & 0xF).to(tl.float32) - 8.0 * SIGNED
            q_hi = ((words >> (8 * j + 4)) & 0xF).to(tl.float32) - 8.0 * SIGNED
            lo = (q_lo.to(tl.int32, bitcast=True) >> 16) & 0xFFFF  # exact in bfloat16
            pairs.append(lo | (q_hi.to(tl.int32, bitcast=True) & -65536))
        q0, q1, q2, q3 = pairs[0], pairs[1], pairs[2], pairs[3]
    elif SIGNED:
        q0, q1, q2, q3 = tl.inline_asm_elementwise(
            _UNPACK_SIGNED, "=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 4, is_pure=True,
            pack=1)
    else:
        q0, q1, q2, q3 = tl.inline_asm_elementwise(
            _UNPACK_UNSIGNED, "=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 4, is_pure=True,
            pack=1)
    return q0, q1, q2, q3


@triton.jit
def _pair_dot_q(q0, q1, q2, q3, x0, x1, x2, x3, INTERPRET: tl.constexpr):
    """sum_i q_i x_i over a word's four pairs of q (from _pair_unpack) and of x, float32."""
    if INTERPRET:
        acc_lo = tl.zeros(q0.shape, dtype=tl.float32)
        acc_hi = tl.zeros(q0.shape, dtype=tl.float32)
        qs = (q0, q1, q2, q3)
        xs = (x0, x1, x2, x3)
        for j in tl.static_range(4):
            q_lo, q_hi = _halves(qs[j])
            x_lo, x_hi = _halves(xs[j])
            acc_lo = _round_bf16(q_lo * x_lo + acc_lo)
            acc_hi = _round_bf16(q_hi * x_hi + acc_hi)
        p = acc_lo + acc_hi
    else:
        p = tl.inline_asm_elementwise(_DOT_Q, "=f,r,r,r,r,r,r,r,r",
                                      [q0, q1, q2, q3, x0, x1, x2, x3], dtype=tl.float32,
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
