from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF
from kiln.distributed import Mapping
from kiln.layers import swap_input
from kiln.layers.linear import ColumnLinear, MergedColumnLinear, RowLinear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one GEMM; act is SiLU
    (SwiGLU) or the tanh GELU (GeGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 mapping: Mapping | None = None, act: str = "silu") -> None:
        super().__init__()
        self.act_and_mul = KF.silu_and_mul if act in ("silu", "swish") else \
            KF.gelu_tanh_and_mul
        self.glu_act = 1 if act in ("silu", "swish") else 2  # gemv_swap's ACT_* code
        self.gate_up_proj = MergedColumnLinear(hidden_size, [intermediate_size] * 2, bias,
                                               mapping)
        self.down_proj = RowLinear(intermediate_size, hidden_size, bias, mapping)

    def output_projection(self) -> RowLinear:
        return self.down_proj

    def input_quant(self) -> object:
        return self.gate_up_proj.input_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode rows on Hopper (KILN_SWAP_GLU): act(gate) * up in the gate-up GEMV's epilogue
        h = swap_input.glu_linear(self.gate_up_proj, x, self.glu_act, self.down_proj)
        if h is None:
            h = self.act_and_mul(self.gate_up_proj(x), self.down_proj.input_quant())
        return self.down_proj(h)


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))): the ungated MLP of GPT-style models (HF names kept)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 mapping: Mapping | None = None, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.c_fc = ColumnLinear(hidden_size, intermediate_size, bias, mapping)
        self.c_proj = RowLinear(intermediate_size, hidden_size, bias, mapping)
        self.approximate = "none" if act == "gelu" else "tanh"

    def output_projection(self) -> RowLinear:
        return self.c_proj

    def input_quant(self) -> object:
        return self.c_fc.input_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(KF.gelu(self.c_fc(x), self.approximate))
