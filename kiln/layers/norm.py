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
