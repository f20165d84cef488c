"""An independent simulation of kiln's low-precision schemes on a transformers Llama model.

Written from the definitions, not from kiln's code: weights rounded to e4m3 per output
row, linear inputs rounded per token (or with a given static scale), K (after rotary)
and V rounded per KV head as a 1-byte cache stores them. The model then computes in
float32 on the rounded values, which is what an exact low-precision engine computes up
to the order of float32 sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

E4M3_MAX = 448.0


def round_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded to scale * (nearest e4m3 value of x / scale), saturating at 448."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def round_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-127, 127) * scale


def fp8_weights(model: torch.nn.Module, match: str = ".layers.") -> None:
    """Round every decoder projection's weight (every linear layer whose name holds
    `match`; "lm_head": the LM head) per output row (scale = row amax / 448); the e4m3
    values and scales are kept for the FP8 GEMM of `simulate`."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and match in name:
            w = module.weight.data.float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-6) / E4M3_MAX
            module.fp8_values = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(
                torch.float8_e4m3fn).float()
            module.fp8_scale = scale[:, 0]
            module.weight.data = module.fp8_values * scale


def smoothquant_weights(model: torch.nn.Module, windows: list[list[int]], alpha: float
                        ) -> None:
    """SmoothQuant on a transformers Llama, from the paper's definition: per input channel
    j of q/k/v, gate/up and down, a_j = max |x_j| over the calibration windows, w_j = max
    |W_ij| over the rows that take x, s_j = a_j^alpha / w_j^(1 - alpha); the norm before
    q/k/v (gate/up) is divided by s and those weights' columns multiplied by it; for down,
    up's rows are divided by s. Then every decoder projection is rounded to int8 per
    output row (scale = max |row| / 127); values and scales are kept for `simulate`."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "gate_proj", "down_proj")):
            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                amax[name] = x if name not in amax else torch.maximum(amax[name], x)
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in windows:
            model(torch.tensor([ids]))
    for h in handles:
        h.remove()

    def factors(a: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        w = torch.stack([x.abs().amax(0) for x in weights]).amax(0)
        return (a.clamp_min(1e-5) ** alpha / w.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{i}"
            s_qkv = factors(amax[f"{prefix}.self_attn.q_proj"],
                            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            s_mlp = factors(amax[f"{prefix}.mlp.gate_proj"],
                            [mlp.gate_proj.weight, mlp.up_proj.weight])
            s_down = factors(amax[f"{prefix}.mlp.down_proj"], [mlp.down_proj.weight])
            layer.input_layernorm.weight.div_(s_qkv)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.mul_(s_qkv)
            layer.post_attention_layernorm.weight.div_(s_mlp)
            mlp.gate_proj.weight.mul_(s_mlp)
            mlp.up_proj.weight.mul_(s_mlp)
            mlp.up_proj.weight.div_(s_down[:, None])
            mlp.down_proj.weight.mul_(s_down)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data.float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-6) / 127
            module.int8_values = (w / scale).round().clamp(-127, 127)
            module.int8_scale = scale[:, 0]
            module.weight.data = module.int8_values * scale


@contextlib.contextmanager
def simulate(model: torch.nn.Module, fp8: bool = False,
             input_scales: dict[str, float] | None = None, kv: str | None = None,
             kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
             int8: bool = False, fp8_head: bool = False) -> Iterator[None]:
    """Within the block, `model` (a transformers Llama whose weights the caller already
    rounded with fp8_weights, if fp8) rounds linear inputs (per token, or by
    input_scales[module name]) and K/V ("fp8" or "int8", per-head scales per layer index,
    1.0 when not given). fp8_head: the LM head too (rounded by fp8_weights(model,
    "lm_head")), its input per token."""
    from transformers.models.llama import modeling_llama

    handles = []
    layer_index = [0]
    if fp8:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (
                    ".layers." in name or (fp8_head and name == "lm_head")):
                def fp8_gemm(mod, args, out, name=name):
                    """As FP8 tensor cores compute: sum of products of e4m3 values (exact in
                    float32), then times both scales."""
                    x = args[0].float()
                    if input_scales is not None and name != "lm_head":
                        scale = torch.tensor(input_scales[name])
                    else:
                        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / E4M3_MAX
                    x_values = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(
                        torch.float8_e4m3fn).float()
                    y = (x_values @ mod.fp8_values.T) * scale * mod.fp8_scale
                    return (y if mod.bias is None else y + mod.bias).to(out.dtype)
                handles.append(module.register_forward_hook(fp8_gemm))
    if int8:  # W8A8 INT8 on the values smoothquant_weights kept
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                def int8_gemm(mod, args, out):
                    """Exact integer sums, then times both scales."""
                    x = args[0].float()
                    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127
                    x_values = (x / scale).round().clamp(-127, 127)
                    y = (x_values.double() @ mod.int8_values.double().T).float() * scale * \
                        mod.int8_scale
                    return (y if mod.bias is None else y + mod.bias).to(out.dtype)
                handles.append(module.register_forward_hook(int8_gemm))
    original_rotary = modeling_llama.apply_rotary_pos_emb
    if kv:
        rounder = round_e4m3 if kv == "fp8" else round_int8

        def scales(i: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
            if kv_scales is None:
                return torch.ones(heads), torch.ones(heads)
            return kv_scales[i]

        def rotary(q, k, cos, sin, *args, **kwargs):
            q, k = original_rotary(q, k, cos, sin, *args, **kwargs)
            k_scale, _ = scales(layer_index[0], k.shape[1])  # k: [B, heads, T, d]
            return q, rounder(k.float(), k_scale.view(1, -1, 1, 1)).to(k.dtype)

        modeling_llama.apply_rotary_pos_emb = rotary
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn

            def enter(mod, args, kwargs, i=i):
                layer_index[0] = i

            def round_v(mod, args, out, i=i, attn=attn):
                heads = attn.config.num_key_value_heads
                _, v_scale = scales(i, heads)
                shaped = out.float().unflatten(-1, (heads, -1))
                return rounder(shaped, v_scale.view(-1, 1)).flatten(-2).to(out.dtype)

            handles.append(attn.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(attn.v_proj.register_forward_hook(round_v))
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = original_rotary
        for h in handles:
            h.remove()


def int_weights(model: torch.nn.Module, bits: int, group_size: int,
                match: str = ".layers.") -> None:
    """Round every decoder projection's weight (every linear whose name holds `match`)
    as kiln's weight-only schemes define it:
    8 bits symmetric (scale = group max |w| / 127), 4 bits asymmetric (scale = (max - min)
    / 15, offset = min, q in 0..15), groups of group_size inputs (0: the whole row);
    the model then computes in float32 on w = q * scale + offset."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and match in name:
            w = module.weight.data.float()
            rows, cols = w.shape
            size = group_size or cols
            groups = w.reshape(rows, cols // size, size)
            if bits == 8:
                scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127
                rounded = (groups / scale).round().clamp(-127, 127) * scale
            else:
                low = groups.amin(-1, keepdim=True)
                scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp_min(1e-6)
                rounded = ((groups - low) / scale).round().clamp(0, 15) * scale + low
            module.weight.data = rounded.reshape(rows, cols)
