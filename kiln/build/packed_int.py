"""Integer weight checkpoints repacked into kiln's storage at build time.

compressed-tensors `pack-quantized` (llm-compressor's W4A16 / W8A16, e.g. GPTQModifier):
per linear layer `weight_packed` int32 [out, in * bits / 32] (values q in [-2^(b-1),
2^(b-1)) stored as q + 2^(b-1), element e of a word in bits e*b .. e*b + b - 1),
`weight_scale` [out, groups], `weight_shape` [2], and for asymmetric schemes
`weight_zero_point` packed the same way along the output dimension ([out * b / 32,
groups]); w = (q - zero) * scale. In kiln's terms (kiln.kernels.reference): the stored
unsigned values u = q + 2^(b-1) with scale and offset = -(zero + 2^(b-1)) * scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kiln.build.prequantized import Prequantized
from kiln.errors import CheckpointError
from kiln.kernels.reference import pack_int4

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [rows, words] -> int32 [rows, count] unsigned values, element e of a word in
    its bits e*bits onwards."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :count]


@dataclass(frozen=True)
class PackQuantized(Prequantized):
    """A compressed-tensors pack-quantized checkpoint (quant: kiln's int4_wo / int8_wo)."""

    bits: int = 4
    symmetric: bool = True

    def tensors(self, stream: Iterator[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        need = {"weight_packed", "weight_scale", "weight_shape"} | (
            set() if self.symmetric else {"weight_zero_point"})
        for name, tensor in stream:
            prefix, _, suffix = name.rpartition(".")
            if suffix not in PARTS:
                yield name, tensor
                continue
            parts = pending.setdefault(prefix, {})
            parts[suffix] = tensor
            if need <= set(parts):
                yield from self._convert(prefix, pending.pop(prefix))
        if pending:
            prefix, parts = next(iter(pending.items()))
            raise CheckpointError(f"{prefix} lacks {', '.join(sorted(need - set(parts)))} "
                                  "of its compressed-tensors pack-quantized weight")

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        rows, cols = (int(v) for v in parts["weight_shape"].reshape(-1)[:2])
        u = unpack_int32(parts["weight_packed"], self.bits, cols)
        scale = parts["weight_scale"].float().reshape(rows, -1)
        mid = 1 << (self.bits - 1)
        if self.symmetric:
            zero = torch.full_like(scale, float(mid))
        else:
            packed_zero = parts["weight_zero_point"].reshape(-1, scale.shape[1])
            zero = unpack_int32(packed_zero.T.contiguous(), self.bits, rows).T.float()
        if self.bits == 4:
            yield f"{prefix}.weight", pack_int4(u)
            yield f"{prefix}.weight_scale", scale.contiguous()
            yield f"{prefix}.weight_offset", (-zero * scale).contiguous()
        else:  # symmetric int8: signed values, no offset
            yield f"{prefix}.weight", (u - mid).to(torch.int8)
            yield f"{prefix}.weight_scale", scale.contiguous()


def pack_quantized_scheme(weights: dict, inputs: dict | None, name: str
                          ) -> tuple[int, int, bool]:
    """(bits, group size (0: per channel), symmetric) of a pack-quantized weight scheme
    kiln can hold; CheckpointError naming what it cannot."""
    if inputs:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): kiln reads "
                              "pack-quantized weights with 16-bit activations (W4A16, W8A16)")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    symmetric = bool(weights.get("symmetric", True))
    if weights.get("type") != "int" or bits not in (4, 8) or strategy not in ("group",
                                                                               "channel"):
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): kiln reads 4- and "
                              "8-bit integer weights in groups or per channel")
    if bits == 8 and not symmetric:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): asymmetric 8-bit "
                              "weights")
    if weights.get("actorder") not in (None, "static", False):
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): actorder "
                              f"{weights.get('actorder')!r} permutes groups; kiln reads "
                              "actorder static or none")
    group = int(weights.get("group_size") or 0) if strategy == "group" else 0
    return bits, group, symmetric
