"""SmoothQuant: move activation outliers into the weights before INT8 W8A8 quantization.

For a linear layer with input x (per-channel calibrated max |x_j| = a_j) and weight W
(max over its rows |W_ij| = w_j), the smoothing factor is

    s_j = a_j ** alpha / w_j ** (1 - alpha)    (alpha 0.5: both sides meet halfway)

and x / s, W * s give the same product with flatter activations. x / s is folded into
what produces x, so nothing is added at run time:
- q/k/v (fused) and the first MLP projection: the norm before them (weight, and bias for
  LayerNorm) is divided by s (which norm: the model's norm_feeds; with Gemma 2/3's
  sandwich norms the MLP's is pre_feedforward_layernorm; a norm shared by attention and
  MLP, as in Phi-2, gets one s for both);
- the gated MLP's down projection: its input is silu(gate) * up, so up's rows are
  divided by s.
The attention output projection (its input mixes heads through softmax) and a plain
MLP's second projection (after GELU) are quantized without smoothing.
Each rank smooths its own slice (a norm is computed again on every rank, so its copies
may differ); the activation maxima come from calibrating the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.distributed import Mapping
from kiln.layers.linear import LinearBase

MIN_FACTOR = 1e-5


def smoothing_factors(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float
                      ) -> torch.Tensor:
    """s [in] for activations with per-channel max act_amax and the weights [out, in]
    that take them (several for a fused input)."""
    w_amax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_amax.float().clamp_min(MIN_FACTOR) ** alpha / w_amax.clamp_min(MIN_FACTOR) ** (
        1 - alpha)
    return s.clamp_min(MIN_FACTOR)


def scale_after_norm(norm: nn.Module, linears: list[LinearBase], s: torch.Tensor) -> None:
    """The input channels of the linear layers times s, the norm that feeds them divided
    by s."""
    s = s.to(norm.weight.device)
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.float() / s).to(norm.bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


def scale_after_up(gate_up: LinearBase, down: LinearBase, s: torch.Tensor) -> None:
    """down's input channels times s, the up half of gate_up (rows) divided by s."""
    s = s.to(down.weight.device)
    start, size = gate_up.shard_sizes[0], gate_up.shard_sizes[1]
    up = gate_up.weight.data[start:start + size]
    up.copy_((up.float() / s[:, None]).to(up.dtype))
    if gate_up.bias is not None:
        b = gate_up.bias.data[start:start + size]
        b.copy_((b.float() / s).to(b.dtype))
    down.weight.data = (down.weight.data.float() * s).to(down.weight.dtype)


def smooth_model(model: nn.Module, channel_amax: dict[str, torch.Tensor], alpha: float,
                 mapping: Mapping) -> None:
    """Fold smoothing factors into a loaded float model (this rank's slice) in place.
    channel_amax: per linear layer name, max |x| per input channel of the whole model."""
    for name, layer in model.named_modules():
        for kind, prev, linears, key in scaled_inputs(name, layer):
            if key not in channel_amax:
                continue
            amax = channel_amax[key]
            if kind == "up":  # row parallel: this rank's slice of the intermediate size
                size = linears[0].in_features
                amax = amax.narrow(0, mapping.tp_rank * size, size)
            s = smoothing_factors(amax, [linear.weight.data for linear in linears], alpha)
            if kind == "norm":
                scale_after_norm(prev, linears, s)
            else:
                scale_after_up(prev, linears[0], s)


def scaled_inputs(name: str, layer: nn.Module
                  ) -> list[tuple[str, nn.Module, list[LinearBase], str]]:
    """The linear inputs of a decoder layer whose scale can move into what produces
    them: (kind "norm" or "up", producer, the linear layers that take that input alone,
    the first one's name: where calibration keeps the input's statistics). Which norm
    feeds which linear layers is the model's declaration (its layers' norm_feeds)."""
    feeds = getattr(layer, "norm_feeds", None)
    if feeds is None:
        return []
    out: list[tuple[str, nn.Module, list[LinearBase], str]] = [
        ("norm", norm, [layer.get_submodule(path) for path in paths], f"{name}.{paths[0]}")
        for norm, paths in feeds()]
    mlp = getattr(layer, "mlp", None)
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):
        out.append(("up", mlp.gate_up_proj, [mlp.down_proj], f"{name}.mlp.down_proj"))
    return out
