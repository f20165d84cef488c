"""How a 1-byte KV cache's tiles reach the attention products (kiln.kernels.paged).

e4m3 tiles are converted to float16 (by the hardware, or with integer ops: paged.e4m3_tile,
load_kv_words) and q with them (kv_query). int8 tiles are converted to q's dtype: for a
bfloat16 model the compiler does it with integer ops and a bfloat16 add, ~2 instructions
a value (sm_90 SASS of the decode kernel's main loop, 128-key tile, 2 warps: 2,039
instructions against 1,290 for e4m3, whose conversion is one cvt a pair).

By default (KILN_INT8_KV_F16=0 turns it off; read at import) an int8 cache's products run
in float16 as e4m3's do, the tiles converted by int8_f16: 1,682 instructions a tile (37th
session, H200: decode B=296 x 1500 0.276 ms against 0.300; SmoothQuant + int8 KV 1000 /
1000 x 300 13,128 / 13,158 out tok/s against 12,726 / 12,720). The values are the same
integers, the scores the same (q bfloat16 -> float16 is exact in float16's normal range,
see kv_query); the softmax weights p reach p @ v rounded to float16 instead of bfloat16
(finer).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INT8_KV_F16 = tl.constexpr(os.environ.get("KILN_INT8_KV_F16", "1") != "0")
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_MAGIC = tl.constexpr(1152.0)  # float16 0x6480: 1024 + the bias 128


@triton.jit
def kv_query(q, k_cache_ptr):
    """q as the attention products take it: float16 for an e4m3 cache (and an int8 one,
    KILN_INT8_KV_F16's default) when q is 16-bit (the tiles are converted to float16), else
    as is (a float32 model keeps exact products, the tiles converted float16 -> float32
    exactly).

    Caveat: bfloat16 -> float16 is exact for 2^-14 <= |q| <= 65504; smaller |q| round to
    a multiple of 2^-24 (absolute error <= 2^-25, nothing next to the scores), but
    |q| > 65504 would become inf. Queries of real models (post-RoPE, before the softmax
    scale) stay orders of magnitude below that.
    """
    cache = k_cache_ptr.dtype.element_ty
    if (cache == tl.float8e4nv or (INT8_KV_F16 and cache == tl.int8)) and \
            q.dtype.primitive_bitwidth == 16:
        q = q.to(tl.float16)
    return q


@triton.jit
def int8_f16(x):
    """An int8 tile as float16, exactly, four values a 32-bit register: each byte biased
    to unsigned (xor 0x80: v + 128), placed under the byte 0x64 (float16 bits 0x64uu =
    1024 + u, by prmt), then 1152 subtracted two at a time (sub.f16x2)."""
    if _INTERPRET:
        return x.to(tl.float16)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, m; xor.b32 t, $2, 0x80808080; mov.b32 m, 0x64806480; "
        "prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; "
        "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def kv_operand(x, dtype: tl.constexpr):
    """A K or V tile as an attention product's operand in dtype (an int8 one by int8_f16
    when the products run in float16, KILN_INT8_KV_F16's default)."""
    if INT8_KV_F16 and x.dtype == tl.int8 and dtype == tl.float16:
        return int8_f16(x)
    return x.to(dtype)


@triton.jit
def int8_word_pairs(u):
    """uint32 words of four int8 values -> the float16 bits of 1024 + (value + 128) for
    bytes 0 and 2 (low and high halves; bytes 1 and 3 from u >> 8): less _MAGIC, the
    values (int8_halves)."""
    return (u & 0x00FF00FF) ^ 0x64806480


@triton.jit
def int8_halves(bits, HIGH: tl.constexpr):
    """The float16 in the low or high half of int8_word_pairs' bits: the value + _MAGIC."""
    if HIGH:
        bits = bits >> 16
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def unbias(x):
    """int8_halves' values (joined into a tile) less _MAGIC: the int8 values, float16."""
    return x - _MAGIC
