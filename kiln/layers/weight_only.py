"""Weight-only integer linear layers (W8A16, W4A16): the method and its quantizers.

Storage (kiln.kernels.reference): `weight` int8 [out, in] or uint8 [out, in // 2] (two
4-bit values a byte), `weight_scale` float32 [out, groups] and, for asymmetric formats,
`weight_offset` float32 [out, groups]; w = q * scale + offset per group of `group_size`
inputs (group_size 0: one group per row, per channel). Activations stay 16/32-bit.

Build-time quantizers (round to nearest):
- int8_wo: symmetric, scale = max|w| / 127 per group (per channel by default).
- int4_wo: asymmetric, q = round((w - min) / scale) in 0..15, scale = (max - min) / 15,
  offset = min per group (the form of GGUF's Q4_1), group size 128 by default.
"""

from __future__ import annotations

import torch

from kiln import functional as KF
from kiln.kernels import cpu_int
from kiln.kernels.reference import INT8_MAX, MIN_AMAX, dequantize_int_weight, pack_int4
from kiln.layers.linear import LinearBase
from kiln.layers.quantization import LinearMethod, cpu_float_weight

INT4_DEFAULT_GROUP = 128


def quantize_int8_symmetric(weight: torch.Tensor, group_size: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 q [N, K], float32 scale [N, K // G]); w ~ q * scale."""
    n, k = weight.shape
    g = group_size or k
    w = weight.float().view(n, k // g, g)
    scale = w.abs().amax(dim=-1).clamp_min(MIN_AMAX) / INT8_MAX
    q = (w / scale[:, :, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(n, k), scale


def quantize_int4_asymmetric(weight: torch.Tensor, group_size: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q 0..15 uint8 [N, K], scale, offset float32 [N, K // G]);
    w ~ q * scale + offset."""
    n, k = weight.shape
    g = group_size or k
    w = weight.float().view(n, k // g, g)
    low = w.amin(dim=-1)
    scale = ((w.amax(dim=-1) - low) / 15).clamp_min(MIN_AMAX)
    q = ((w - low[:, :, None]) / scale[:, :, None]).round().clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scale, low


class IntWeightMethod(LinearMethod):
    """W8A16 / W4A16 with groupwise float32 scales (and offsets); see the module doc."""

    def __init__(self, name: str, bits: int, group_size: int, has_offset: bool) -> None:
        self.name = name
        self.bits = bits
        self.group_size = group_size
        self.has_offset = has_offset
        self.param_names = ("weight", "weight_scale", "weight_offset") if has_offset \
            else ("weight", "weight_scale")

    @classmethod
    def from_spec(cls, spec: str) -> IntWeightMethod:
        """"int4_g32_offset" (bits, group size, whether offsets are stored)."""
        parts = spec.split("_")
        return cls(spec, int(parts[0][3:]), int(parts[1][1:]), "offset" in parts[2:])

    def groups(self, layer: LinearBase) -> int:
        return layer.in_features // (self.group_size or layer.in_features)

    def create_weights(self, layer: LinearBase) -> None:
        if self.group_size and layer.in_features % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the layer's "
                             f"{layer.in_features} inputs")
        if self.bits == 4:
            layer.weight = layer.new_param(layer.out_features, layer.in_features // 2,
                                           dtype=torch.uint8)
        else:
            layer.weight = layer.new_param(layer.out_features, layer.in_features,
                                           dtype=torch.int8)
        groups = self.groups(layer)
        layer.weight_scale = layer.new_param(layer.out_features, groups, dtype=torch.float32)
        if self.has_offset:
            layer.weight_offset = layer.new_param(layer.out_features, groups,
                                                  dtype=torch.float32)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        offset = layer.weight_offset if self.has_offset else None
        if not x.is_cuda:
            rows = x.reshape(-1, x.shape[-1])
            if cpu_int.takes(rows, self.bits, self.group_size or layer.in_features):
                return self._cpu_kernel(layer, rows, bias).view(*x.shape[:-1], -1)
        # Elsewhere the CPU multiplies the dequantized weight.
        weight_float, packed = cpu_float_weight(layer, x, lambda: (
            cpu_int.dequantize if cpu_int.available() and not layer.weight.is_cuda
            else dequantize_int_weight)(layer.weight, layer.weight_scale, offset))
        return KF.int_weight_linear(x, layer.weight, layer.weight_scale, offset, bias,
                                    weight_float, packed)

    def _cpu_kernel(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
        """x [M, K], a decode-sized float32 step on the CPU: kiln.kernels.cpu_int reads the
        integers (its tile layout made at first use and kept, as cpu_float_weight keeps a
        float weight)."""
        tiled = getattr(layer, "_cpu_tiles", None)
        if tiled is None:
            tiled = layer._cpu_tiles = cpu_int.TiledWeight(
                layer.weight, layer.weight_scale,
                layer.weight_offset if self.has_offset else None)
        return tiled(x, bias)

    def apply_glu(self, layer: LinearBase, x: torch.Tensor, act: int) -> torch.Tensor | None:
        """act(gate) * up of a merged [gate | up] int4 layer at one bfloat16 row on a GPU by
        the one-row GEMV's GLU epilogue (act 1: SiLU, 2: tanh GELU), or None where it does
        not take x (kiln.kernels.int_gemv_epilogues.int4_glu)."""
        tma = self._tma_gemv(layer, x)
        if tma is not None:  # the TMA-fed GEMV's own GLU epilogue (default), or unfused
            from kiln.kernels import int_launch

            return tma(x, layer.weight, layer.weight_scale,
                       layer.weight_offset if self.has_offset else None, layer.bias,
                       glu=act) if int_launch.GEMV_TMA_GLU else None
        if not self._one_row(x):
            return None
        from kiln.kernels.int_gemv_epilogues import int4_glu

        return int4_glu(x, layer.weight, layer.weight_scale,
                        layer.weight_offset if self.has_offset else None, layer.bias, act)

    def apply_rope(self, layer: LinearBase, x: torch.Tensor, rope: object
                   ) -> torch.Tensor | None:
        """rotary(q) of a fused int4 QKV layer at one bfloat16 row on a GPU, rotary(k) and
        v written into rope's caches (a kiln.kernels.gemv_swap_rope.RopeArgs), by the
        one-row GEMV's epilogue; None where it does not take x
        (kiln.kernels.int_gemv_epilogues.int4_rope)."""
        if self._tma_gemv(layer, x) is not None:  # its own epilogue (default), or unfused
            from kiln.kernels import int_launch

            if not int_launch.GEMV_TMA_ROPE:
                return None
            from kiln.kernels.int4_gemv_tma import w4_gemv_tma_rope

            return w4_gemv_tma_rope(x, layer.weight, layer.weight_scale,
                                    layer.weight_offset if self.has_offset else None,
                                    layer.bias, rope)
        if not self._one_row(x):
            return None
        from kiln.kernels.int_gemv_epilogues import int4_rope

        return int4_rope(x, layer.weight, layer.weight_scale,
                         layer.weight_offset if self.has_offset else None, layer.bias, rope)

    def _one_row(self, x: torch.Tensor) -> bool:
        """One bfloat16 row of int4 on a GPU (or the interpreter): the epilogues' input."""
        return self.bits == 4 and x.dim() == 2 and x.shape[0] == 1 and \
            x.dtype == torch.bfloat16 and KF._triton(x)

    def _tma_gemv(self, layer: LinearBase, x: torch.Tensor):
        """The TMA-fed GEMV where it takes this one-row product
        (kiln.kernels.int_launch.tma_gemv), else None: the pairs GEMV's epilogues are then
        not taken (the TMA GEMV's own, or the unfused launches)."""
        if not self._one_row(x):
            return None
        from kiln.kernels.int_launch import tma_gemv

        return tma_gemv(x, layer.weight, layer.weight_scale)

    def store(self, layer: LinearBase, q: torch.Tensor, scale: torch.Tensor,
              offset: torch.Tensor | None) -> None:
        """Replace the layer's parameters by q (values [out, in]), scale and offset."""
        for name in layer.method.param_names:
            delattr(layer, name)
        layer._weight_float = layer._weight_packed = layer._cpu_tiles = None
        self.create_weights(layer)
        layer.method = self
        layer.weight.data = pack_int4(q) if self.bits == 4 else q.to(torch.int8)
        layer.weight_scale.data = scale.float().contiguous()
        if self.has_offset:
            layer.weight_offset.data = offset.float().contiguous()

    def quantize_from_float(self, layer: LinearBase, input_amax: torch.Tensor | None) -> None:
        weight = layer.weight.data.float()
        if self.bits == 4:
            q, scale, offset = quantize_int4_asymmetric(weight, self.group_size)
        else:
            (q, scale), offset = quantize_int8_symmetric(weight, self.group_size), None
        self.store(layer, q, scale, offset)
