"""GGUF quantized blocks kept quantized: decoded into kiln's integer-weight storage.

Every block type below dequantizes in llama.cpp as w = q * s + m per group of 32 (16 for
Q6_K) weights, with s and m float32 values computed from the block's fp16 fields (and
6- or 8-bit sub-block scales) by one exact float32 product each, so kiln's storage
(values q, float32 scale and offset per group, see kiln.kernels.reference) holds them
exactly and `q * scale + offset` in float32 gives llama.cpp's dequantized values bit for
bit (the product q * scale is exact, so one rounding remains, in both):

  type   bytes/block  weights  q          scale          offset
  Q4_0   18           32       0..15      d              -8 d
  Q4_1   20           32       0..15      d              m
  Q5_0   22           32       -16..15    d              -
  Q5_1   24           32       0..31      d              m
  Q8_0   34           32       -127..127  d              -
  Q4_K   144          256      0..15      d * sc[j]      -dmin * mn[j]   (8 x 32)
  Q5_K   176          256      0..31      d * sc[j]      -dmin * mn[j]   (8 x 32)
  Q6_K   210          256      -32..31    d * sc[j]      -               (16 x 16)

4-bit values go into 4-bit storage, the others into int8. Other types (F16/F32 linears,
Q2_K, Q3_K, IQ*) are dequantized as before.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from kiln.kernels.reference import pack_int4
from kiln.layers.weight_only import IntWeightMethod

Q = gguf.GGMLQuantizationType

# type -> (bits of storage, group size, has an offset)
KEPT_TYPES: dict[Q, tuple[int, int, bool]] = {
    Q.Q4_0: (4, 32, True), Q.Q4_1: (4, 32, True), Q.Q4_K: (4, 32, True),
    Q.Q5_0: (8, 32, False), Q.Q5_1: (8, 32, True), Q.Q5_K: (8, 32, True),
    Q.Q8_0: (8, 32, False), Q.Q6_K: (8, 16, False),
}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [rows, blocks]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: low nibbles are values 0..15, high nibbles 16..31."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """bit i of the little-endian bytes qh [..., count / 8] for i < count, as 0/1."""
    bits = (qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten(-2)[..., :count]


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums."""
    s = scales.to(torch.int32)
    low = s[..., 0:4]
    mid = s[..., 4:8]
    high = s[..., 8:12]
    sc = torch.cat((low & 63, (high & 0xF) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _decode(qtype: Q, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """b: uint8 [rows, blocks, bytes] -> (q int16 [rows, blocks, weights], scale and
    offset float32 [rows, blocks, groups per block])."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        d = _f16(b, 0)[..., None]
        has_min = qtype in (Q.Q4_1, Q.Q5_1)
        start = 4 if has_min else 2
        if qtype in (Q.Q5_0, Q.Q5_1):
            qh, start = _high_bits(b[..., start:start + 4], 32), start + 4
        q = _nibbles_32(b[..., start:start + 16]).to(torch.int16)
        if qtype in (Q.Q5_0, Q.Q5_1):
            q = q | (qh.to(torch.int16) << 4)
        if qtype == Q.Q4_0:
            return q, d, -8 * d
        if qtype == Q.Q5_0:
            return q - 16, d, None
        return q, d, _f16(b, 2)[..., None]
    if qtype == Q.Q8_0:
        q = b[..., 2:34].contiguous().view(torch.int8).to(torch.int16)
        return q, _f16(b, 0)[..., None], None
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
        sc, mn = _k_scales(b[..., 4:16])
        if qtype == Q.Q4_K:
            qs, qh = b[..., 16:144], None
        else:
            qh, qs = b[..., 16:48], b[..., 48:176]
        # 4 chunks of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones
        chunks = qs.unflatten(-1, (4, 32))
        q = torch.stack((chunks & 0xF, chunks >> 4), dim=-2).flatten(-3).to(torch.int16)
        if qh is not None:  # bit j of byte l is the fifth bit of value l of sub-block j
            bits = (qh[..., None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
            q = q | (bits.flatten(-2).to(torch.int16) << 4)
        return q, d * sc, -(dmin * mn)
    if qtype == Q.Q6_K:
        ql, qh = b[..., 0:128], b[..., 128:192]
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = _f16(b, 208)[..., None]
        halves = []
        for h in range(2):  # 128 values each, from 64 bytes of ql and 32 of qh
            low, high = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
            parts = [(low[..., 0:32] & 0xF), (low[..., 32:64] & 0xF), low[..., 0:32] >> 4,
                     low[..., 32:64] >> 4]
            halves += [p.to(torch.int16) | (((high >> (2 * i)) & 3).to(torch.int16) << 4)
                       for i, p in enumerate(parts)]
        return torch.cat(halves, dim=-1) - 32, d * sc, None
    raise ValueError(f"GGUF type {qtype.name} is not kept quantized")


def decode_blocks(qtype: Q, data: np.ndarray, rows: int, cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's raw blocks (uint8, rows x bytes) -> (q int16 [rows, cols], scale,
    offset float32 [rows, cols / G]); dequantize_int_weight of these equals llama.cpp."""
    weights, size = gguf.GGML_QUANT_SIZES[qtype]
    b = torch.from_numpy(np.array(data, dtype=np.uint8)).view(rows, cols // weights, size)
    q, scale, offset = _decode(qtype, b)
    return (q.reshape(rows, cols), scale.reshape(rows, -1).contiguous(),
            None if offset is None else offset.reshape(rows, -1).contiguous())


def layer_spec(types: list[Q]) -> str:
    """The storage of a kiln linear layer whose HF parts have these GGUF types: one that
    holds every part exactly, or "none" (dequantized) when a part is not kept."""
    if not types or any(t not in KEPT_TYPES for t in types):
        return "none"
    kinds = [KEPT_TYPES[t] for t in types]
    bits = 4 if all(k[0] == 4 for k in kinds) else 8
    group = min(k[1] for k in kinds)
    return f"int{bits}_g{group}" + ("_offset" if any(k[2] for k in kinds) else "")


def to_storage(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, spec: str
               ) -> dict[str, torch.Tensor]:
    """Decoded values in the layout of `spec` (finer groups repeat a scale; a missing
    offset is zero; 4-bit values are packed)."""
    bits, group, has_offset = parse_spec(spec)
    repeat = q.shape[1] // scale.shape[1] // group
    scale = scale.repeat_interleave(repeat, dim=1)
    out = {"weight": pack_int4(q) if bits == 4 else q.to(torch.int8), "weight_scale": scale}
    if has_offset:
        out["weight_offset"] = torch.zeros_like(scale) if offset is None else \
            offset.repeat_interleave(repeat, dim=1)
    return out


def parse_spec(spec: str) -> tuple[int, int, bool]:
    """"int4_g32_offset" -> (4, 32, True)."""
    method = IntWeightMethod.from_spec(spec)
    return method.bits, method.group_size, method.has_offset
