"""Mixture-of-experts MLP: a router picks top-k SwiGLU experts per token (Mixtral,
Qwen2-MoE, Qwen3-MoE), optionally beside a shared expert behind a sigmoid gate (Qwen2-MoE).

Tensor parallel like the dense MLP: every rank holds every expert's slice of the
intermediate dimension (gate/up rows, down columns), and the partial outputs are
all-reduced. Expert weights are plain parameters, not linear layers: a quantization
method that supports experts (FP8: `FP8Method.create_expert_weights`) gives them its
storage; under any other method they stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF
from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_reduce
from kiln.kernels.reference_quant import FP8
from kiln.layers.linear import default_weight_loader
from kiln.layers.mlp import GatedMLP


def _param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _load_router(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if not loaded.is_floating_point() or loaded.dtype == FP8:
        raise ValueError(f"the router is read in high precision, got a {loaded.dtype} weight "
                         "(quantized checkpoints keep the MoE gate unquantized: add it to "
                         "the quantization recipe's ignore list)")
    default_weight_loader(param, loaded)


class Router(nn.Module):
    """logits = x W^T with W [outputs, hidden] replicated on every rank."""

    def __init__(self, hidden_size: int, outputs: int) -> None:
        super().__init__()
        self.weight = _param(outputs, hidden_size)
        self.weight.weight_loader = _load_router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class Experts(nn.Module):
    """w13 [E, 2 * I/tp, H] (gate rows, then up rows) and w2 [E, H, I/tp] of this rank.

    Loaded one expert projection at a time: w13 shard (e, 0) is expert e's gate_proj
    [I, H], (e, 1) its up_proj; w2 shard e its down_proj [H, I]. Quantized experts
    (`create(dtype, scales=True)`) also hold w13_scale [E, 2 * I/tp] and w2_scale [E, H]
    float32 (one per weight row), loaded per projection like the weights, from a per-row
    or a per-tensor scale.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 mapping: Mapping) -> None:
        super().__init__()
        self.mapping = mapping
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.inter = intermediate_size // mapping.tp_size
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        self.create()

    def create(self, dtype: torch.dtype | None = None, scales: bool = False) -> None:
        """(Re)create the parameters, uninitialised: weights of `dtype` (None: the default
        dtype), with per-row float32 scales when `scales`."""
        experts, hidden = self.num_experts, self.hidden_size
        w13_shards = tuple((e, j) for e in range(experts) for j in (0, 1))
        self.w13 = _param(experts, 2 * self.inter, hidden, dtype=dtype)
        self.w13.weight_loader = self._load_w13
        self.w13.shard_ids = w13_shards
        self.w2 = _param(experts, hidden, self.inter, dtype=dtype)
        self.w2.weight_loader = self._load_w2
        self.w2.shard_ids = tuple(range(experts))
        if scales:
            self.w13_scale = _param(experts, 2 * self.inter, dtype=torch.float32)
            self.w13_scale.weight_loader = self._load_w13_scale
            self.w13_scale.shard_ids = w13_shards
            self.w2_scale = _param(experts, hidden, dtype=torch.float32)
            self.w2_scale.weight_loader = self._load_w2_scale
            self.w2_scale.shard_ids = self.w2.shard_ids

    def _check(self, param: nn.Parameter, loaded: torch.Tensor,
               expected: tuple[int, int]) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        if (param.dtype == FP8) != (loaded.dtype == FP8):
            raise ValueError(f"expert weights are {param.dtype} in this engine, the checkpoint "
                             f"holds {loaded.dtype}")

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: tuple[int, int]) -> None:
        expert, half = shard_id
        self._check(param, loaded, (self.inter * self.mapping.tp_size, param.shape[2]))
        part = loaded.narrow(0, self.mapping.tp_rank * self.inter, self.inter)
        param.data[expert].narrow(0, half * self.inter, self.inter).copy_(part)

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        self._check(param, loaded, (param.shape[1], self.inter * self.mapping.tp_size))
        param.data[shard_id].copy_(loaded.narrow(1, self.mapping.tp_rank * self.inter,
                                                 self.inter))

    @staticmethod
    def _scale_rows(loaded: torch.Tensor, rows: int) -> torch.Tensor:
        """A projection's scales as one per row: [rows] / [rows, 1], or one for all."""
        flat = loaded.detach().float().reshape(-1)
        if flat.numel() == 1:
            return flat.expand(rows)
        if flat.numel() != rows:
            raise ValueError(f"expected 1 or {rows} weight scales, got {tuple(loaded.shape)}")
        return flat

    def _load_w13_scale(self, param: nn.Parameter, loaded: torch.Tensor,
                        shard_id: tuple[int, int]) -> None:
        expert, half = shard_id
        rows = self._scale_rows(loaded, self.inter * self.mapping.tp_size)
        param.data[expert].narrow(0, half * self.inter, self.inter).copy_(
            rows.narrow(0, self.mapping.tp_rank * self.inter, self.inter))

    def _load_w2_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        param.data[shard_id].copy_(self._scale_rows(loaded, self.hidden_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        w13, w2 = self.w13, self.w2
        if self.w13_scale is not None and not x.is_cuda:
            # The CPU multiplies float32 copies of the e4m3 weights (exact), made once, as
            # quantized linear layers do (quantization.cpu_float_weight).
            cached = getattr(self, "_float_weights", None)
            if cached is None or cached[0].device != w13.device:
                cached = self._float_weights = (w13.float(), w2.float())
            w13, w2 = cached
        return KF.fused_moe(x, w13, w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale)


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
        out = self.experts(x, weights, ids)
        out = tp_all_reduce(out, self.mapping.tp_size)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
