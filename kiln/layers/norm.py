from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: the norm. With residual: (norm(x + residual), x + residual)."""
        return KF.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm with bias; with residual, (norm(x + residual), x + residual) like RMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return KF.layer_norm(x, self.weight, self.bias, self.eps)
        summed = x + residual
        return KF.layer_norm(summed, self.weight, self.bias, self.eps), summed


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return LayerNorm(dim, eps) if kind == "layernorm" else RMSNorm(dim, eps)
