from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF
from kiln.distributed.comm import tp_all_reduce, tp_all_reduce_add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quant: object = None):
        """Without residual: the norm. With residual: (norm(x + residual), x + residual).
        quant: the FP8Quant of the linear the norm feeds (the norm may then come
        quantized, see KF.rms_norm)."""
        return KF.rms_norm(x, self.weight, self.eps, residual, quant)


class LayerNorm(nn.Module):
    """LayerNorm with bias; with residual, (norm(x + residual), x + residual) like RMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quant: object = None):
        """As RMSNorm's; quant is ignored (the linear quantizes the output itself)."""
        if residual is None:
            return KF.layer_norm(x, self.weight, self.bias, self.eps)
        summed = x + residual
        return KF.layer_norm(summed, self.weight, self.bias, self.eps), summed


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return LayerNorm(dim, eps) if kind == "layernorm" else RMSNorm(dim, eps)


def reduce_add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                    tp_size: int, partial: bool, quant: object = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(x + residual) and x + residual, where x may still be a tensor-parallel partial
    sum (`partial`): the all-reduce then runs first, fused with the add and RMSNorm into
    one kernel where the custom all-reduce takes the message. quant: as the norm's."""
    if partial and tp_size > 1:
        if isinstance(norm, RMSNorm):
            fused = tp_all_reduce_add_rms_norm(x, residual, norm.weight, norm.eps, tp_size)
            if fused is not None:
                return fused
        x = tp_all_reduce(x, tp_size)
    return norm(x, residual, quant)
