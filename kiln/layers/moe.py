"""Mixture-of-experts MLP: a router picks top-k SwiGLU experts per token (Mixtral,
Qwen2-MoE, Qwen3-MoE), optionally beside a shared expert behind a sigmoid gate (Qwen2-MoE).

Tensor parallel like the dense MLP: every rank holds every expert's slice of the
intermediate dimension (gate/up rows, down columns), and the partial outputs are
all-reduced. Expert weights are plain parameters, not linear layers: they stay in the
model dtype under --quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF
from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_reduce
from kiln.layers.linear import default_weight_loader
from kiln.layers.mlp import GatedMLP


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Router(nn.Module):
    """logits = x W^T with W [outputs, hidden] replicated on every rank."""

    def __init__(self, hidden_size: int, outputs: int) -> None:
        super().__init__()
        self.weight = _param(outputs, hidden_size)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class Experts(nn.Module):
    """w13 [E, 2 * I/tp, H] (gate rows, then up rows) and w2 [E, H, I/tp] of this rank.

    Loaded one expert projection at a time: w13 shard (e, 0) is expert e's gate_proj
    [I, H], (e, 1) its up_proj; w2 shard e its down_proj [H, I].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 mapping: Mapping) -> None:
        super().__init__()
        self.mapping = mapping
        self.inter = intermediate_size // mapping.tp_size
        self.w13 = _param(num_experts, 2 * self.inter, hidden_size)
        self.w13.weight_loader = self._load_w13
        self.w13.shard_ids = tuple((e, j) for e in range(num_experts) for j in (0, 1))
        self.w2 = _param(num_experts, hidden_size, self.inter)
        self.w2.weight_loader = self._load_w2
        self.w2.shard_ids = tuple(range(num_experts))

    def _check(self, loaded: torch.Tensor, expected: tuple[int, int]) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: tuple[int, int]) -> None:
        expert, half = shard_id
        self._check(loaded, (self.inter * self.mapping.tp_size, param.shape[2]))
        part = loaded.narrow(0, self.mapping.tp_rank * self.inter, self.inter)
        param.data[expert].narrow(0, half * self.inter, self.inter).copy_(part)

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        self._check(loaded, (param.shape[1], self.inter * self.mapping.tp_size))
        param.data[shard_id].copy_(loaded.narrow(1, self.mapping.tp_rank * self.inter,
                                                 self.inter))


class SparseMoE(nn.Module):
    """sum over the top-k experts of router weight * SwiGLU expert (+ shared expert)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 intermediate_size: int, renormalize: bool, mapping: Mapping | None = None,
                 shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.mapping = mapping or Mapping()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, self.mapping)
        self.shared_expert = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, False,
                                          self.mapping)
            self.shared_expert_gate = Router(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = KF.moe_route(self.gate(x), self.top_k, self.renormalize)
        out = KF.fused_moe(x, self.experts.w13, self.experts.w2, weights, ids)
        out = tp_all_reduce(out, self.mapping.tp_size)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
