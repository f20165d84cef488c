"""GPTQ (Frantar et al., 2022): INT4 rounding with second-order error feedback.

For a layer y = x W^T, with H = 2/n sum x^T x over n calibration tokens (the Hessian of
the output's squared error in W), the columns of W are rounded one at a time; each
column's rounding error, divided by [H^-1]_ii, is spread onto the columns not yet
rounded in proportion to row i of the upper Cholesky factor of H^-1. That keeps the
layer's output close to the float one on the calibration inputs, where rounding to
nearest (RTN) treats every weight alone.

Details: a damping of 1% of H's mean diagonal keeps H invertible; inputs that were
always zero ("dead" channels) get H_ii = 1 and weight 0. Columns go in blocks of the
group size (128 per channel), errors inside a block update the block, the block's
errors then update the rest at once. Group parameters (scale = (max - min) / 15,
offset = min, as int4_wo) are fixed when a group's first column comes up, from the
weights as updated so far. act_order: columns in order of decreasing H_ii (the most
used inputs first); group parameters are then computed up front from the float weights
("static groups"), so the storage keeps groups of consecutive inputs.
"""

from __future__ import annotations

import torch

DAMP = 0.01


def _group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, G] -> (scale, offset) [N] of 4-bit min/max rounding."""
    low = w.amin(dim=1)
    return ((w.amax(dim=1) - low) / 15).clamp_min(1e-6), low


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (damped further if H is not positive definite)."""
    damp = DAMP * hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        damp *= 10
    raise ValueError("the calibration Hessian is not positive definite even when damped")


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
              act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] (sum of x^T x; the scale does not matter) ->
    (q uint8 0..15 [N, K], scale, offset float32 [N, K / G]), w ~ q * scale + offset."""
    w = weight.double().clone()
    h = hessian.double().clone()
    n, k = w.shape
    group = group_size or k
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = torch.empty(n, k // group, dtype=torch.float64, device=w.device)
    offset = torch.empty_like(scale)
    if act_order:
        for g in range(k // group):
            scale[:, g], offset[:, g] = _group_params(w[:, g * group:(g + 1) * group])
        perm = torch.argsort(h.diagonal(), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)
    q = torch.empty(n, k, dtype=torch.float64, device=w.device)
    block = group if group < k else min(128, k)
    for start in range(0, k, block):
        end = min(start + block, k)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = int(perm[col]) // group
            if not act_order and col % group == 0:
                scale[:, g], offset[:, g] = _group_params(
                    torch.cat((w_block[:, i:], w[:, end:]), dim=1)[:, :group])
            column = w_block[:, i]
            values = ((column - offset[:, g]) / scale[:, g]).round().clamp(0, 15)
            q[:, col] = values
            error = (column - (values * scale[:, g] + offset[:, g])) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    q_original = torch.empty_like(q)
    q_original[:, perm] = q
    return q_original.to(torch.uint8), scale.float(), offset.float()


def gptq_model(model: torch.nn.Module, quant, hessians: dict[str, torch.Tensor],
               mapping, act_order: bool, progress: bool) -> None:
    """Round every linear layer `quant` makes INT4 with GPTQ, in place (this rank's
    slice; hessians are of the whole model, row-parallel inputs sliced to the rank)."""
    from tqdm.auto import tqdm

    from kiln.layers.quantization import linear_layers
    from kiln.layers.weight_only import IntWeightMethod

    layers = [(n, m) for n, m in linear_layers(model) if n in hessians]
    for name, layer in tqdm(layers, desc="GPTQ", unit="layer", leave=False,
                            disable=None if progress else True):
        method = quant.method_for(name)
        if not isinstance(method, IntWeightMethod):
            continue
        h = hessians[name]
        if not layer.rows_sharded and mapping.tp_size > 1:
            k = layer.in_features
            h = h.narrow(0, mapping.tp_rank * k, k).narrow(1, mapping.tp_rank * k, k)
        weight = layer.weight.data
        q, scale, offset = gptq_int4(weight.float(), h.to(weight.device), method.group_size,
                                     act_order)
        method.store(layer, q, scale, offset)
