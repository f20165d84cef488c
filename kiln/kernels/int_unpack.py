"""int4 values unpacked from their bytes into floats with bit operations, no conversion
instructions: to float32 through the mantissa of 2^23 (the GEMVs' and float tiles'
route), or straight into 16-bit floats BASE + q by inline PTX (the magic tiles of
kiln.kernels.int_gemm, IntGemmConfig.magic)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_nibbles(packed):
    """Bytes of two 4-bit values (int32) -> (low, high) nibbles as float32, without the
    quarter-rate conversion instructions: a value u < 2^23 in the mantissa of 2^23 reads
    2^23 + u exactly."""
    low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    high = ((packed >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return low, high


# Two int4 values a byte -> 16-bit floats BASE + q by bit operations alone (BASE's ulp is
# 1, so q in its low mantissa bits reads BASE + q exactly): four bytes a 32-bit register,
# each pair of bytes spread to the two halves of a word (prmt), masked and or'd with
# BASE's bits (lop3), the high nibbles after one shift: 8 instructions for 8 values.
_MAGIC_ASM = """{
.reg .b32 t0, t1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, BITS, 0xea;
lop3.b32 $1, t1, 0x000F000F, BITS, 0xea;
shr.u32 t0, t0, 4;
shr.u32 t1, t1, 4;
lop3.b32 $2, t0, 0x000F000F, BITS, 0xea;
lop3.b32 $3, t1, 0x000F000F, BITS, 0xea;
}"""
_MAGIC_BF16 = tl.constexpr(_MAGIC_ASM.replace("BITS", "0x43004300"))  # 128.0
_MAGIC_FP16 = tl.constexpr(_MAGIC_ASM.replace("BITS", "0x64006400"))  # 1024.0


@triton.jit
def _magic_nibbles(packed, FP16: tl.constexpr, INTERPRET: tl.constexpr):
    """uint8 bytes of two int4 values -> (low, high) nibbles plus 128 as bfloat16 (FP16:
    plus 1024 as float16), exact: 1 instruction a value on sm_80+ (the float32 route,
    _unpack_nibbles then a conversion, takes about 3)."""
    if INTERPRET:
        low, high = _unpack_nibbles(packed.to(tl.int32))
        if FP16:
            low, high = (low + 1024.0).to(tl.float16), (high + 1024.0).to(tl.float16)
        else:
            low, high = (low + 128.0).to(tl.bfloat16), (high + 128.0).to(tl.bfloat16)
    elif FP16:  # (one return: a return inside a compile-time branch does not end it)
        low, high = tl.inline_asm_elementwise(_MAGIC_FP16, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.float16, tl.float16), is_pure=True,
                                              pack=4)
    else:
        low, high = tl.inline_asm_elementwise(_MAGIC_BF16, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                              pack=4)
    return low, high
