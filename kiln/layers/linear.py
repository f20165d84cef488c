"""Linear layers that know their tensor-parallel slice.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies the
rank's slice of a full HF tensor into the (possibly fused) parameter, so loading and
sharding a checkpoint is one loop in the builder.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_gather_last_dim, tp_all_reduce


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnLinear(nn.Module):
    """y = x W^T + b with W split by output rows across TP ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 mapping: Mapping | None = None, gather_output: bool = False) -> None:
        super().__init__()
        self.mapping = mapping or Mapping()
        self.gather_output = gather_output
        self.out_per_rank = out_features // self.mapping.tp_size
        self.weight = _param(self.out_per_rank, in_features)
        self.weight.weight_loader = self._load
        self.bias = _param(self.out_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        _check_shape(loaded, (rows * self.mapping.tp_size, *param.shape[1:]))
        param.data.copy_(loaded.narrow(0, self.mapping.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        return tp_all_gather_last_dim(y, self.mapping.tp_size) if self.gather_output else y


class MergedColumnLinear(ColumnLinear):
    """Several column-parallel projections of the same input fused into one GEMM."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 mapping: Mapping | None = None) -> None:
        super().__init__(in_features, sum(out_sizes), bias, mapping)
        tp = self.mapping.tp_size
        self.shard_sizes = [s // tp for s in out_sizes]

    def _shard_range(self, shard_id: int) -> tuple[int, int]:
        return sum(self.shard_sizes[:shard_id]), self.shard_sizes[shard_id]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        offset, size = self._shard_range(shard_id)  # type: ignore[arg-type]
        _check_shape(loaded, (size * self.mapping.tp_size, *param.shape[1:]))
        part = loaded.narrow(0, self.mapping.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(part)


class QKVLinear(MergedColumnLinear):
    """Q, K and V projections fused; shard ids 'q', 'k', 'v'."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, mapping: Mapping | None = None) -> None:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, mapping)

    def _shard_range(self, shard_id: object) -> tuple[int, int]:
        return super()._shard_range("qkv".index(str(shard_id)))


class RowLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 mapping: Mapping | None = None) -> None:
        super().__init__()
        self.mapping = mapping or Mapping()
        self.weight = _param(out_features, in_features // self.mapping.tp_size)
        self.weight.weight_loader = self._load
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = _load_full

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        cols = param.shape[1]
        _check_shape(loaded, (param.shape[0], cols * self.mapping.tp_size))
        param.data.copy_(loaded.narrow(1, self.mapping.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(nn.functional.linear(x, self.weight), self.mapping.tp_size)
        return y if self.bias is None else y + self.bias


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")


def _load_full(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    _check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: object = None) -> None:
    """For replicated parameters (norms): the whole tensor on every rank."""
    _load_full(param, loaded)
