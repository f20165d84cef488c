"""Integer weight checkpoints repacked into kiln's storage at build time.

AutoAWQ GEMM (`quant_method: awq`, `version: gemm`): `qweight` int32 [in, out / 8], word
c of a row holding outputs 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i] in bits 4i; `qzeros` int32
[groups, out / 8] packed the same way; `scales` fp16 [groups, out]; w = (q - zero) * scale.
GPTQ (`quant_method: gptq`, AutoGPTQ / GPTQModel format v1): `qweight` int32 [in / 8,
out], word r of a column holding inputs 8r + i in bits 4i; `qzeros` int32 [groups,
out / 8], outputs 8c + i in bits 4i, storing zero - 1; `scales` [groups, out]; `g_idx`
[in] the group of each input; w = (q - zero) * scale. kiln holds groups of consecutive
inputs, so desc_act checkpoints (g_idx out of order) are refused: from the config, and
from any g_idx that is not arange(in) // group_size (rows cannot be regrouped exactly).
group_size -1 (one group a row) is kiln's per-channel storage (group size 0); there
desc_act changes nothing stored (the one group holds every input), so it is read.

compressed-tensors `pack-quantized` (llm-compressor's W4A16 / W8A16, e.g. GPTQModifier):
per linear layer `weight_packed` int32 [out, in * bits / 32] (values q in [-2^(b-1),
2^(b-1)) stored as q + 2^(b-1), element e of a word in bits e*b .. e*b + b - 1),
`weight_scale` [out, groups], `weight_shape` [2], and for asymmetric schemes
`weight_zero_point` packed the same way along the output dimension ([out * b / 32,
groups]); w = (q - zero) * scale. In kiln's terms (kiln.kernels.reference): the stored
unsigned values u = q + 2^(b-1) with scale and offset = -(zero + 2^(b-1)) * scale.
actorder "weight" (alias "static") only orders GPTQ's rounding: the stored layout is the
same as without it; "group" (groups out of input order) is refused.

Every packed tensor is int32 and every scale a float: a tensor of another dtype (a
float qweight, int scales) is refused by name rather than decoded into garbage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kiln.build.prequantized import Prequantized, describe, ignored, name_list
from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.kernels.reference import pack_int4
from kiln.layers.quantization import QuantConfig

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
PACKED = ("weight_packed", "weight_zero_point", "qweight", "qzeros")  # int32 words
SCALES = ("weight_scale", "scales")  # floats
G_IDX = ("g_idx", "weight_g_idx")  # each input's group: checked in order, then dropped


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
    parts: tuple[str, ...] = PARTS
    fmt: str = "compressed-tensors pack-quantized"
    order_hint: str = "quantize with actorder 'weight' or none"

    def needed(self) -> set[str]:
        return {"weight_packed", "weight_scale", "weight_shape"} | (
            set() if self.symmetric else {"weight_zero_point"})

    def tensors(self, stream: Iterator[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        need = self.needed()
        for name, tensor in stream:
            prefix, _, suffix = name.rpartition(".")
            if suffix in G_IDX:
                self._check_group_order(name, tensor)
                continue
            if suffix not in self.parts:
                yield name, tensor
                continue
            parts = pending.setdefault(prefix, {})
            parts[suffix] = tensor
            if need <= set(parts):
                parts = pending.pop(prefix)
                self._check_dtypes(prefix, parts)
                yield from self._convert(prefix, parts)
        if pending:
            prefix, parts = next(iter(pending.items()))
            raise CheckpointError(f"{prefix} lacks {', '.join(sorted(need - set(parts)))} "
                                  f"of its {self.fmt} weight")

    def _check_dtypes(self, prefix: str, parts: dict[str, torch.Tensor]) -> None:
        """Packed words int32, scales floating point: anything else would be cast
        silently into meaningless weights."""
        for suffix, tensor in parts.items():
            if suffix in PACKED and tensor.dtype != torch.int32:
                expected = "int32 (packed integer values)"
            elif suffix in SCALES and not tensor.dtype.is_floating_point:
                expected = "floating point (float16, bfloat16 or float32)"
            else:
                continue
            raise CheckpointError(f"checkpoint tensor {prefix}.{suffix} is "
                                  f"{str(tensor.dtype).removeprefix('torch.')}, where the "
                                  f"{self.fmt} format stores {expected}; the file is damaged "
                                  "or was converted wrongly: re-download or re-export it")

    def _check_group_order(self, name: str, g_idx: torch.Tensor) -> None:
        """g_idx must put inputs in groups of consecutive inputs (arange(in) // size)."""
        g = g_idx.reshape(-1).long()
        size = int((g == 0).sum())
        if size and torch.equal(g, torch.arange(len(g)) // size):
            return
        raise CheckpointError(f"unsupported {self.fmt} checkpoint: {name} puts inputs in "
                              "groups out of order (act-order, desc_act), and kiln holds "
                              f"groups of consecutive inputs; {self.order_hint}")

    def _check_int4(self, prefix: str, parts: dict[str, torch.Tensor], zero: torch.Tensor,
                    inputs: int, outputs: int) -> None:
        """AWQ / GPTQ: scales and unpacked zeros [groups, outputs], groups as configured."""
        scale, qweight, qzeros = parts["scales"], parts["qweight"], parts["qzeros"]
        if scale.dim() != 2 or scale.shape[1] != outputs or zero.shape != scale.shape:
            raise CheckpointError(f"{prefix}: scales {tuple(scale.shape)} and qzeros "
                                  f"{tuple(qzeros.shape)} do not fit qweight "
                                  f"{tuple(qweight.shape)} ([groups, {outputs}] each)")
        self._check_groups(prefix, inputs, scale.shape[0])

    def _check_groups(self, prefix: str, inputs: int, groups: int) -> None:
        """The scales' group count against the config's group size (0: per channel)."""
        if groups < 1 or inputs % groups:
            raise CheckpointError(f"{prefix}: {groups} groups of scales for {inputs} inputs")
        configured = self.quant.group_size or inputs
        if inputs // groups != configured:
            said = self.quant.group_size or "per channel"
            raise CheckpointError(
                f"{prefix}: the scales imply group size {inputs // groups} ({inputs} inputs "
                f"/ {groups} scales a row), quantization_config says {said}; is the config "
                "from another export of this model?")

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        rows, cols = (int(v) for v in parts["weight_shape"].reshape(-1)[:2])
        u = unpack_int32(parts["weight_packed"], self.bits, cols)
        scale = parts["weight_scale"].float().reshape(rows, -1)
        self._check_groups(prefix, cols, scale.shape[1])
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


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output within a word, by nibble


@dataclass(frozen=True)
class AutoAWQ(PackQuantized):
    parts: tuple[str, ...] = ("qweight", "qzeros", "scales")
    fmt: str = "AutoAWQ GEMM"

    def needed(self) -> set[str]:
        return set(self.parts)

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        inputs, outputs = qweight.shape[0], qweight.shape[1] * 8
        order = torch.tensor(AWQ_ORDER)
        q = _awq_unpack(qweight, order)  # [in, out]
        zero = _awq_unpack(qzeros, order).float()  # [groups, out]
        scale = scales.float()
        self._check_int4(prefix, parts, zero, inputs, outputs)
        yield from _int4_parts(prefix, q.T, scale.T, zero.T)


def _awq_unpack(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[rows, words] -> [rows, words * 8]: nibble i of word c is column 8c + order[i]."""
    nibbles = unpack_int32(packed, 4, packed.shape[1] * 8).view(packed.shape[0], -1, 8)
    out = torch.empty_like(nibbles)
    out[:, :, order] = nibbles
    return out.flatten(1)


@dataclass(frozen=True)
class GPTQPacked(PackQuantized):
    parts: tuple[str, ...] = ("qweight", "qzeros", "scales")
    fmt: str = "GPTQ"
    order_hint: str = "quantize with desc_act=False"

    def needed(self) -> set[str]:
        return {"qweight", "qzeros", "scales"}

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        inputs, outputs = qweight.shape[0] * 8, qweight.shape[1]
        q = unpack_int32(qweight.T.contiguous(), 4, inputs)  # [out, in]
        zero = unpack_int32(qzeros, 4, outputs).float() + 1  # [groups, out]
        scale = scales.float()
        self._check_int4(prefix, parts, zero, inputs, outputs)
        yield from _int4_parts(prefix, q, scale.T, zero.T)


def _int4_parts(prefix: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """q [out, in] 0..15, scale and zero [out, groups]: kiln's int4 storage."""
    yield f"{prefix}.weight", pack_int4(q)
    yield f"{prefix}.weight_scale", scale.contiguous()
    yield f"{prefix}.weight_offset", (-zero * scale).contiguous()


def awq_gptq(method: str, qc: dict, cfg: ModelConfig, names: list[str]) -> Prequantized:
    """An AutoAWQ GEMM or GPTQ v1 checkpoint's scheme (its quantization_config and, where
    known, tensor names), or CheckpointError naming what kiln cannot hold."""
    name = f"{method}: {describe(qc)}"
    bits = _int_field(qc, ("bits", "w_bit"))
    group = _int_field(qc, ("group_size", "q_group_size"))
    if bits != 4 or group is None or group == 0 or group < -1:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}); kiln reads 4-bit "
                              "weights in groups (group_size > 0) or per channel (-1)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or not qc.get("zero_point", True):
            raise CheckpointError(f"unsupported AutoAWQ packing version={version!r} "
                                  f"zero_point={qc.get('zero_point', True)}; kiln reads GEMM "
                                  "packing with zero points")
    else:
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise CheckpointError(f"unsupported GPTQ checkpoint_format {fmt!r}; kiln reads "
                                  "'gptq' (v1: zero points stored minus one)")
        if qc.get("desc_act") and group != -1:  # one group a row: the order changes nothing
            raise CheckpointError(f"unsupported GPTQ checkpoint ({name}): desc_act puts inputs "
                                  "in groups out of order, and kiln holds groups of "
                                  "consecutive inputs; quantize with desc_act=False")
    ignore = _unquantized(cfg, method, names, qc.get("modules_to_not_convert"))
    quant = QuantConfig("int4_wo", ignore=ignore, group_size=max(group, 0))
    return AutoAWQ(quant, None, "awq") if method == "awq" else GPTQPacked(quant, None, "gptq")


def _int_field(qc: dict, keys: tuple[str, ...]) -> int | None:
    """An integer field of quantization_config (its first key present; a numeric string
    counts), None when absent."""
    key = next((k for k in keys if qc.get(k) is not None), None)
    if key is None:
        return None
    value = qc[key]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"quantization_config {key} is {value!r}; expected an integer")
    return value


def _unquantized(cfg: ModelConfig, method: str, names: list[str], not_converted: object
                 ) -> tuple[str, ...]:
    """kiln layers an AWQ / GPTQ checkpoint stores in float (AutoAWQ's
    modules_to_not_convert, or any projection saved with `.weight` and no `.qweight`):
    from the tensor names where the reader has them, else from modules_to_not_convert
    (names matched as substrings, as AutoAWQ and transformers match them)."""
    if names:
        have = set(names)
        if not any(n.endswith(".qweight") for n in have):
            raise CheckpointError(f"quantization_config says {method}, but the checkpoint "
                                  "holds no packed weights (.qweight): is config.json from "
                                  "another export of this model?")
        floats = {n.removesuffix(".weight") for n in names
                  if n.endswith(".weight") and n.removesuffix("weight") + "qweight" not in have}
        fused = tuple(f for f in sorted(floats)  # stored fused (Phi-3): kiln's own names
                      if f.endswith((".self_attn.qkv_proj", ".mlp.gate_up_proj")))
        return ignored(cfg, sorted(floats), lambda name, p: name == p) + fused
    return ignored(cfg, name_list(not_converted, "modules_to_not_convert"),
                   lambda name, p: p in name)


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
    if weights.get("actorder") not in (None, "weight", "static", False):  # static: alias
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): actorder "
                              f"{weights.get('actorder')!r} permutes groups; kiln reads "
                              "actorder weight (static) or none")
    group = int(weights.get("group_size") or 0) if strategy == "group" else 0
    if strategy == "group" and group <= 0:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): group strategy "
                              "without a group_size")
    return bits, group, symmetric
