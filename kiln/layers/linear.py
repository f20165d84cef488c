"""Linear layers that know their tensor-parallel slice.

A linear layer owns its shape and how a full HF tensor maps onto its rank's slice; its
`method` (kiln.layers.quantization) owns the parameters and the GEMM. So a quantized
format is a method, and no layer or model branches on formats.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies the
rank's slice of a full HF tensor into the (possibly fused) parameter, so loading and
sharding a checkpoint is one loop in the builder. Two loaders cover every parameter a
method creates: `load_matrix` for [out, in] matrices and `load_rows` for per-output-row
vectors (bias, per-channel scales). Fused layers tag their parameters with `shard_ids`.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_gather_last_dim, tp_all_reduce


def _param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearBase(nn.Module):
    """y = x W^T + b over this rank's slice; subclasses say how a full tensor is sliced.

    in_features / out_features are this rank's sizes. `rows_sharded`: whether output rows
    are split across ranks (column parallel) or every rank holds all of them (row parallel).
    """

    shard_ids: tuple[object, ...] | None = None
    rows_sharded = True

    @property
    def packs_on_cpu(self) -> bool:
        """A plain float weight: KF.prepack_cpu_linears may give it a oneDNN packing."""
        return getattr(getattr(self, "method", None), "name", None) == "none"

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 mapping: Mapping | None) -> None:
        super().__init__()
        from kiln.layers.quantization import UNQUANTIZED

        self.mapping = mapping or Mapping()
        self.in_features = in_features
        self.out_features = out_features
        self.method = UNQUANTIZED
        self.method.create_weights(self)
        self.bias = self.new_param(out_features, loader=self.load_rows) if bias else None

    def new_param(self, *shape: int, dtype: torch.dtype | None = None, loader=None
                  ) -> nn.Parameter:
        """A parameter of this layer with its weight loader and the layer's shard ids."""
        param = _param(*shape, dtype=dtype)
        param.weight_loader = loader or self.load_matrix
        if self.shard_ids is not None:
            param.shard_ids = self.shard_ids
        return param

    def set_method(self, method: object) -> None:
        """Replace how the weight is held (the parameters are re-created, uninitialised)."""
        for name in self.method.param_names:
            delattr(self, name)
        self.method = method
        method.create_weights(self)

    def apply_method(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.method.apply(self, x, bias)

    def input_quant(self) -> object:
        """What the kernel before this layer may quantize its output to (an FP8Quant for a
        W8A8 FP8 layer), saving the layer's own quantization pass; None: nothing."""
        return self.method.input_quant(self)

    # ---- loading: full HF tensor -> this rank's slice -----------------------------------
    def row_range(self, shard_id: object) -> tuple[int, int, int]:
        """(offset in this rank's rows, rows, offset in the full tensor) of a shard."""
        if not self.rows_sharded:
            return 0, self.out_features, 0
        rows = self.out_features
        return 0, rows, self.mapping.tp_rank * rows

    def full_rows(self, shard_id: object) -> int:
        """Rows of the full (unsharded) HF tensor of this shard."""
        _, rows, _ = self.row_range(shard_id)
        return rows * self.mapping.tp_size if self.rows_sharded else rows

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor,
                  shard_id: object = None) -> None:
        """Per-output-row data (bias, per-channel scales); a single value is broadcast."""
        if loaded.numel() == 1:
            loaded = loaded.reshape(1).expand(self.full_rows(shard_id))
        self._load_2d(param, loaded.reshape(-1, 1), shard_id, 1)

    def load_matrix(self, param: nn.Parameter, loaded: torch.Tensor,
                    shard_id: object = None) -> None:
        self._load_2d(param, loaded, shard_id, param.shape[-1])

    def _load_2d(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object,
                 cols: int) -> None:
        offset, rows, source_row = self.row_range(shard_id)
        split_cols = not self.rows_sharded and cols > 1  # row parallel: columns split
        expected = (self.full_rows(shard_id), cols * (self.mapping.tp_size if split_cols else 1))
        _check_shape(loaded, expected)
        part = loaded.narrow(0, source_row, rows)
        if split_cols:
            part = part.narrow(1, self.mapping.tp_rank * cols, cols)
        target = param.data.view(param.shape[0], -1) if param.dim() > 0 else param.data.view(1, 1)
        target.narrow(0, offset, rows).copy_(part)


class ColumnLinear(LinearBase):
    """y = x W^T + b with W split by output rows across TP ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 mapping: Mapping | None = None, gather_output: bool = False) -> None:
        tp = (mapping or Mapping()).tp_size
        super().__init__(in_features, out_features // tp, bias, mapping)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_method(x, self.bias)
        return tp_all_gather_last_dim(y, self.mapping.tp_size) if self.gather_output else y


class MergedColumnLinear(ColumnLinear):
    """Several column-parallel projections of the same input fused into one GEMM."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 mapping: Mapping | None = None) -> None:
        tp = (mapping or Mapping()).tp_size
        self.shard_sizes = [s // tp for s in out_sizes]
        self.shard_ids = self.shard_ids or tuple(range(len(out_sizes)))
        super().__init__(in_features, sum(out_sizes), bias, mapping)

    def shard_index(self, shard_id: object) -> int:
        return int(shard_id)  # type: ignore[call-overload]

    def row_range(self, shard_id: object) -> tuple[int, int, int]:
        i = self.shard_index(shard_id)
        size = self.shard_sizes[i]
        return sum(self.shard_sizes[:i]), size, self.mapping.tp_rank * size


class QKVLinear(MergedColumnLinear):
    """Q, K and V projections fused; shard ids 'q', 'k', 'v'. With fewer KV heads than TP
    ranks (multi-query Falcon, or TP 8 of 4 KV heads) each KV head is replicated on
    tp / kv_heads consecutive ranks, the ranks whose query heads it serves."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False, mapping: Mapping | None = None) -> None:
        tp = (mapping or Mapping()).tp_size
        self.kv_replicas = tp // num_kv_heads if num_kv_heads < tp else 1
        local_kv = max(1, num_kv_heads // tp) * head_dim
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim,
                           num_kv_heads * head_dim]
        super().__init__(hidden_size, [num_heads * head_dim, local_kv * tp, local_kv * tp],
                         bias, mapping)

    def shard_index(self, shard_id: object) -> int:
        return "qkv".index(str(shard_id))

    def row_range(self, shard_id: object) -> tuple[int, int, int]:
        offset, size, source = super().row_range(shard_id)
        if self.shard_index(shard_id) and self.kv_replicas > 1:
            source = self.mapping.tp_rank // self.kv_replicas * size
        return offset, size, source

    def full_rows(self, shard_id: object) -> int:
        return self.full_sizes[self.shard_index(shard_id)]


class RowLinear(LinearBase):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced."""

    rows_sharded = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 mapping: Mapping | None = None) -> None:
        tp = (mapping or Mapping()).tp_size
        super().__init__(in_features // tp, out_features, bias, mapping)
        # True: forward returns this rank's partial sum and the caller reduces it, fused
        # with what follows (kiln.layers.norm.reduce_add_norm). Only without a bias.
        self.defer_reduce = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_method(x, None)
        if self.defer_reduce:
            return y
        y = tp_all_reduce(y, self.mapping.tp_size)
        return y if self.bias is None else y + self.bias


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(loaded.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: object = None) -> None:
    """For replicated parameters (norms): the whole tensor on every rank."""
    _check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)
