"""AWQ (Lin et al., 2023): activation-aware scaling before INT4 rounding.

Weights that meet large activations matter most. For each linear input whose scale can
move into what produces it (kiln.build.smoothquant.scaled_inputs: the norm before q/k/v
and before the first MLP projection, the up projection before down), AWQ multiplies the
weight's input channels by s_j = mean|x_j| ** alpha (normalized to a geometric mean of
1), rounds W * s to INT4 (the int4_wo rounding), and divides the input by s, which
enlarges the salient channels relative to their group's rounding step. alpha is
searched over a grid per input, measuring || x W^T - (x / s) Q(W s)^T || on calibration
rows; alpha 0 (no scaling, plain RTN) is in the grid, so the search never does worse
than RTN on those rows. The best s is then folded in, and the layer rounded as int4_wo.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from kiln.build.smoothquant import scale_after_norm, scale_after_up, scaled_inputs
from kiln.distributed import Mapping
from kiln.layers.weight_only import quantize_int4_asymmetric

GRID = 20  # alpha in 0, 0.05, ..., 0.95


def _rtn(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4_wo rounding of weight, dequantized (what the engine will hold)."""
    q, scale, offset = quantize_int4_asymmetric(weight, group_size)
    n, k = weight.shape
    return (q.view(n, scale.shape[1], -1).float() * scale[:, :, None]
            + offset[:, :, None]).view(n, k)


def search_scale(x: torch.Tensor, weight: torch.Tensor, group_size: int
                 ) -> tuple[torch.Tensor, float, float]:
    """x [R, K] calibration inputs, weight [N, K] float -> (s [K], best alpha, its error
    relative to plain RTN's)."""
    x = x.float()
    w = weight.float()
    want = x @ w.T
    mean = x.abs().mean(dim=0).clamp_min(1e-6)
    best: tuple[float, float, torch.Tensor] | None = None
    baseline = 0.0
    for step in range(GRID):
        alpha = step / GRID
        s = mean ** alpha
        s = s / (s.max() * s.min()).sqrt()
        got = (x / s) @ _rtn(w * s, group_size).T
        error = (got - want).pow(2).mean().item()
        if step == 0:
            baseline = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    assert best is not None
    return best[2], best[1], best[0] / max(baseline, 1e-30)


def awq_model(model: nn.Module, inputs: dict[str, list[torch.Tensor]], group_size: int,
              mapping: Mapping, progress: bool = True) -> dict[str, float]:
    """Fold the searched AWQ scales into a loaded float model (this rank's slice) in
    place; returns the alpha chosen per linear layer. inputs: calibration rows per
    linear layer of the whole model (row-parallel inputs are sliced to this rank)."""
    chosen = {}
    targets = [(kind, prev, linears, key) for name, layer in model.named_modules()
               for kind, prev, linears, key in scaled_inputs(name, layer)]
    for kind, prev, linears, key in tqdm(targets, desc="AWQ", unit="input", leave=False,
                                         disable=None if progress else True):
        if key not in inputs:
            continue
        x = torch.cat(inputs[key]).to(linears[0].weight.device)
        if kind == "up":
            size = linears[0].in_features
            x = x.narrow(1, mapping.tp_rank * size, size)
        # Layers sharing an input share its scale: searched over their rows together.
        weight = torch.cat([linear.weight.data for linear in linears])
        s, alpha, _ = search_scale(x, weight, group_size)
        chosen[key] = alpha
        if alpha == 0:
            continue
        if kind == "norm":
            scale_after_norm(prev, linears, s)
        else:
            scale_after_up(prev, linears[0], s)
    return chosen
