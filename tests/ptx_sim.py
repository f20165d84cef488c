"""A small interpreter for the PTX that kiln's inline-asm kernels use (the bfloat16-pair
arithmetic of kiln.kernels.int_pairs_asm), so that CPU tests run the very text the GPU
assembles: registers are 32-bit, `$N` operands are bound to the call's inputs and
outputs, and each instruction follows the PTX ISA:

- mov.b32, shr.u32, shl.b32, and.b32: bit operations on 32-bit values;
- prmt.b32 d, a, b, c (default mode): byte i of d is byte (c >> 4i) & 7 of the eight
  bytes {b, a} (a's first), or that byte's sign replicated where bit 3 of the selector
  nibble is set;
- lop3.b32 d, a, b, c, lut: each bit of d is bit (4a + 2b + c) of lut;
- fma.rn.bf16x2 d, a, b, c: per 16-bit half, a * b + c computed exactly and rounded once
  to bfloat16, to nearest even;
- add.f32: float32 addition, to nearest even.
"""

from __future__ import annotations

import math
import struct

import numpy as np

MASK = 0xFFFFFFFF


def _bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _bf16_round(v: float) -> int:
    """v (exact, a Python float) rounded to bfloat16 bits, to nearest even."""
    if v == 0:
        return 0x8000 if math.copysign(1.0, v) < 0 else 0
    mant, exp = math.frexp(abs(v))  # v = mant 2^exp, 0.5 <= mant < 1
    q = round(mant * 256)  # 8 significant bits, ties to even (Python's round)
    value = q * 2.0 ** (exp - 8)
    bits = struct.unpack("<I", struct.pack("<f", value))[0] >> 16
    return bits | (0x8000 if v < 0 else 0)


def _f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits & MASK), dtype=np.float32)[0]


def _bits(f: np.float32) -> int:
    return struct.unpack("<I", np.float32(f).tobytes())[0]


def _prmt(a: int, b: int, c: int) -> int:
    src = a.to_bytes(4, "little") + b.to_bytes(4, "little")
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for half in (0, 16):
        x, y, z = ((v >> half) & 0xFFFF for v in (a, b, c))
        exact = _bf16_value(x) * _bf16_value(y) + _bf16_value(z)  # exact: 8 x 8 bits + 8
        out |= _bf16_round(exact) << half
    return out


def run(asm: str, inputs: list[int], outputs: int) -> list[int]:
    """Run one inline-asm block: `$0 .. $(outputs - 1)` are its outputs, the next
    operands its inputs (32-bit values); returns the outputs' bits."""
    regs: dict[str, int] = {f"${outputs + i}": v & MASK for i, v in enumerate(inputs)}

    def value(token: str) -> int:
        return regs[token] if token in regs else int(token, 0) & MASK

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [t.strip() for t in rest.split(",")]
        v = [value(t) for t in args]
        if op == "mov.b32":
            regs[dst] = v[0]
        elif op == "shr.u32":
            regs[dst] = v[0] >> v[1]
        elif op == "shl.b32":
            regs[dst] = (v[0] << v[1]) & MASK
        elif op == "and.b32":
            regs[dst] = v[0] & v[1]
        elif op == "prmt.b32":
            regs[dst] = _prmt(*v)
        elif op == "lop3.b32":
            regs[dst] = _lop3(*v)
        elif op == "fma.rn.bf16x2":
            regs[dst] = _fma_bf16x2(*v)
        elif op == "add.f32":
            regs[dst] = _bits(_f32(v[0]) + _f32(v[1]))
        else:
            raise NotImplementedError(f"PTX {op!r} ({line})")
    return [regs[f"${i}"] for i in range(outputs)]
