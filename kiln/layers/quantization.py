"""How linear layers hold their weights: one method object per layer, chosen by name.

A method creates the layer's parameters (with their weight loaders), applies the GEMM,
and, at build time, converts a float weight into its own storage. Models never see
formats: `quantize_model` walks a built model and gives every linear layer that is not
declared high precision the method of the engine's `QuantConfig`, and every attention
layer the KV-cache scales its cache dtype needs. The embedding, the LM head and norms
are not linear layers of this kind, so they stay in the model dtype; the LM head becomes
one (LinearLMHead) where the engine asks for it (QuantConfig.lm_head, weight-only
methods).

Methods: `none` (the model dtype), `fp8` (W8A8: e4m3fn weights with per-output-row
scales; inputs quantized per token, or with a calibrated per-tensor scale), and the
weight-only integer methods `int8_wo` / `int4_wo` (kiln.layers.weight_only).

Mixture-of-experts weights (kiln.layers.moe.Experts) take the method of their module name
where the method supports experts (`supports_experts`: FP8, whose experts quantize their
inputs per token in every activation scheme); under the others they stay in the model
dtype.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kiln import functional as KF
from kiln.kernels.reference import FP8, FP8_MAX, INT8_MAX, MIN_AMAX
from kiln.kernels.reference_quant import FP8Quant, Int8Quant
from kiln.layers import swap_input
from kiln.layers.attention import Attention
from kiln.layers.embedding import LinearLMHead, LMHead
from kiln.layers.linear import LinearBase
from kiln.layers.moe import Experts
from kiln.layers.swap_input import PendingInput


@dataclass(frozen=True)
class QuantConfig:
    """What an engine's linear layers hold (from engine.json's build section)."""

    method: str = "none"  # none | fp8 | int8_wo | int4_wo | int4_awq | int4_gptq | int8_sq | gguf
    activation_scheme: str = "dynamic"  # dynamic (per token) | static (per tensor)
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) kept high precision
    group_size: int = 0  # integer weights: inputs per scale (0: per channel)
    # gguf: (module name, storage) per linear layer, e.g. "int4_g32_offset"; others "none"
    layers: tuple[tuple[str, str], ...] = ()
    lm_head: str = ""  # the LM head's method (LinearLMHead): "" none, the method, int8_wo
    # (int8 per channel under other layers); an FP8 head quantizes its input per token

    def ignores(self, module_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern):
                return True
        return False

    def method_for(self, module_name: str) -> LinearMethod:
        if self.method == "none" or self.ignores(module_name):
            return UNQUANTIZED
        if module_name == "lm_head" and self.lm_head not in ("", self.method):
            from kiln.layers.weight_only import IntWeightMethod

            return IntWeightMethod("int8_wo", 8, 0, False)  # (int8 per channel, its only other)
        if self.method == "fp8":  # the head's input is not calibrated: per token always
            return FP8Method(static=self.activation_scheme == "static" and
                             module_name != "lm_head")
        if self.method in ("int8_wo", "int4_wo", "int4_awq", "int4_gptq"):
            from kiln.layers.weight_only import IntWeightMethod

            four = self.method.startswith("int4")
            return IntWeightMethod(self.method, 4 if four else 8, self.group_size, four)
        if self.method == "int8_sq":
            return Int8Method()
        if self.method == "gguf":
            spec = dict(self.layers).get(module_name, "none")
            if spec == "none":
                return UNQUANTIZED
            from kiln.layers.weight_only import IntWeightMethod

            return IntWeightMethod.from_spec(spec)
        raise ValueError(f"unknown quantization method {self.method!r}")


# Whether FP8 layers let the kernel before them quantize their input (see input_quant),
# and INT8 W8A8 ones (KILN_INT8_FUSED_QUANT=0 turns it off; H200, int8_sq 1000 / 1000 x 300:
# 12,775 out tok/s against 12,704 unfused, TTFT 2.85 s against 2.90, in the 36th session).
_FUSED_INPUT_QUANT = [os.environ.get("KILN_FP8_FUSED_QUANT", "1") != "0"]
_FUSED_INT8_INPUT = os.environ.get("KILN_INT8_FUSED_QUANT", "1") != "0"


@contextlib.contextmanager
def unfused_inputs() -> Iterator[None]:
    """Every linear layer gets its input unquantized (calibration hooks read it)."""
    before = _FUSED_INPUT_QUANT[0]
    _FUSED_INPUT_QUANT[0] = False
    try:
        yield
    finally:
        _FUSED_INPUT_QUANT[0] = before


class LinearMethod:
    """Unquantized: weight [out, in] in the model dtype, y = x W^T + b."""

    name = "none"
    param_names: tuple[str, ...] = ("weight",)
    supports_experts = False  # see create_expert_weights

    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = layer.new_param(layer.out_features, layer.in_features)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if isinstance(x, PendingInput):  # the norm / activation before left it to us
            return x.linear(layer.weight, bias)
        if swap_input.PLAIN and swap_input.weight_takes(layer.weight, x):
            from kiln.kernels import gemv_swap

            return gemv_swap.gemv_swap(x, layer.weight, bias)
        return KF.linear(x, layer.weight, bias, getattr(layer, "packed_weight", None))

    def quantize_from_float(self, layer: LinearBase, input_amax: torch.Tensor | None) -> None:
        """Build time: turn the loaded float `layer.weight` into this method's parameters."""

    def input_quant(self, layer: LinearBase) -> object:
        """How this method would have its input quantized by the kernel that makes it (an
        FP8Quant), or None: the norm / activation before it then writes it as usual.
        Unquantized 16-bit layers with KILN_BF16_SWAP=fused: SWAP_PROLOGUE (swap_input:
        at 1-16 rows on Hopper the norm / activation is left to this layer's GEMV)."""
        if (self.name == "none" and swap_input.FUSED and _FUSED_INPUT_QUANT[0]
                and layer.weight.dtype in swap_input.DTYPES):
            return swap_input.SWAP_PROLOGUE
        return None

    def create_expert_weights(self, experts: Experts) -> None:
        """Give an MoE layer's experts this method's storage (if supports_experts)."""
        raise NotImplementedError(f"{self.name} does not quantize MoE experts")

    def quantize_experts_from_float(self, experts: Experts) -> None:
        """Build time: turn the experts' loaded float weights into this method's storage."""
        raise NotImplementedError(f"{self.name} does not quantize MoE experts")


UNQUANTIZED = LinearMethod()


def cpu_float_weight(layer: LinearBase, x: torch.Tensor, make: Callable[[], torch.Tensor]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(float32 weight, its oneDNN packing or None) that a quantized layer multiplies on
    the CPU, made once by `make` and kept (what a float32 engine holds) rather than on
    every call; (None, None) on a GPU, whose kernels read the quantized weight."""
    if x.is_cuda:
        return None, None
    weight_float = getattr(layer, "_weight_float", None)
    if weight_float is None or weight_float.device != layer.weight.device:
        weight_float = make()
        layer._weight_float = weight_float
        layer._weight_packed = KF.pack_cpu_weight(weight_float)
    return weight_float, layer._weight_packed


def _load_max(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Fused projections share one input scale: the largest of their shards'."""
    value = loaded.detach().float().reshape(-1).max()
    loaded_before = getattr(param, "_loaded_once", False)
    param.data.fill_(torch.maximum(param.data.max(), value) if loaded_before else value)
    param._loaded_once = True


class FP8Method(LinearMethod):
    """W8A8 FP8: weight [out, in] e4m3fn, weight_scale [out] float32 (w = q * scale), and
    with static activations input_scale [1] (x_q = x / input_scale)."""

    name = "fp8"
    supports_experts = True

    def __init__(self, static: bool = False) -> None:
        self.static = static
        self.param_names = ("weight", "weight_scale", "input_scale") if static else \
            ("weight", "weight_scale")

    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = layer.new_param(layer.out_features, layer.in_features, dtype=FP8)
        layer.weight_scale = layer.new_param(layer.out_features, dtype=torch.float32,
                                             loader=layer.load_rows)
        if self.static:
            layer.input_scale = layer.new_param(1, dtype=torch.float32, loader=_load_max)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        input_scale = layer.input_scale if self.static else None
        # The CPU has no FP8 GEMM: it multiplies the (exact) float32 copy of the weight.
        weight_float, packed = cpu_float_weight(layer, x, lambda: layer.weight.float())
        return KF.fp8_linear(x, layer.weight, layer.weight_scale, input_scale, bias,
                             weight_float, packed)

    def input_quant(self, layer: LinearBase) -> object:
        """The norm / SiLU-mul before the layer quantizes (with KILN_FP8_FUSED_QUANT=0, or
        inside `unfused_inputs()`, the layer does, in a kernel of its own; the numbers are
        the same either way)."""
        if not _FUSED_INPUT_QUANT[0]:
            return None
        return FP8Quant(layer.input_scale if self.static else None)

    def quantize_from_float(self, layer: LinearBase, input_amax: torch.Tensor | None) -> None:
        weight = layer.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp_min(MIN_AMAX) / FP8_MAX
        quantized = (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        del layer.weight
        self.create_weights(layer)
        layer.method = self
        layer.weight.data = quantized
        layer.weight_scale.data = scale
        if self.static:
            if input_amax is None:
                raise ValueError("static FP8 activations need calibration")
            layer.input_scale.data = (input_amax.float().clamp_min(MIN_AMAX) / FP8_MAX).reshape(1)

    # Experts: e4m3 weights with per-row scales, like a linear layer's; their inputs are
    # quantized per token even in a static engine (the tokens an expert sees change with
    # the routing, and one calibrated scale for every expert loses the most to the
    # outliers; a checkpoint's per-expert input scales are not read).
    def create_expert_weights(self, experts: Experts) -> None:
        experts.create(FP8, scales=True)

    def quantize_experts_from_float(self, experts: Experts) -> None:
        w13, w2 = experts.w13.data, experts.w2.data
        experts.create(FP8, scales=True)
        for weight, param, scale in ((w13, experts.w13, experts.w13_scale),
                                     (w2, experts.w2, experts.w2_scale)):
            param.data = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            scale.data = torch.empty(weight.shape[:2], dtype=torch.float32,
                                     device=weight.device)
            for e in range(weight.shape[0]):  # one expert at a time: a float32 copy of one
                w = weight[e].float()
                scale.data[e] = w.abs().amax(dim=1).clamp_min(MIN_AMAX) / FP8_MAX
                param.data[e] = (w / scale.data[e][:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Int8Method(LinearMethod):
    """INT8 W8A8 (SmoothQuant engines): weight [out, in] int8, weight_scale [out] float32
    (w = q * scale, symmetric per output row); inputs quantized per token at run time.
    The smoothing itself (scales folded into the preceding norm / projection) happens at
    build time, before quantize_from_float (kiln.build.smoothquant)."""

    name = "int8_sq"
    param_names = ("weight", "weight_scale")

    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = layer.new_param(layer.out_features, layer.in_features, dtype=torch.int8)
        layer.weight_scale = layer.new_param(layer.out_features, dtype=torch.float32,
                                             loader=layer.load_rows)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        return KF.int8_linear(x, layer.weight, layer.weight_scale, bias)

    def input_quant(self, layer: LinearBase) -> object:
        """The norm / SiLU-mul before the layer quantizes its input per token (on a GPU;
        the same numbers as the layer's own kernel; KILN_INT8_FUSED_QUANT=0: not)."""
        if not (_FUSED_INT8_INPUT and _FUSED_INPUT_QUANT[0]) or \
                layer.in_features % 8 or layer.out_features % 8:  # (_int_mm's shapes)
            return None
        return Int8Quant()

    def quantize_from_float(self, layer: LinearBase, input_amax: torch.Tensor | None) -> None:
        weight = layer.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp_min(MIN_AMAX) / INT8_MAX
        quantized = (weight / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        del layer.weight
        self.create_weights(layer)
        layer.method = self
        layer.weight.data = quantized
        layer.weight_scale.data = scale


# ---- KV cache ------------------------------------------------------------------------
KV_CACHE_TORCH_DTYPES = {"fp8": FP8, "int8": torch.int8}
KV_QMAX = {FP8: FP8_MAX, torch.int8: INT8_MAX}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_TORCH_DTYPES.get(kv_cache_dtype, model_dtype)


def enable_kv_scales(attn: Attention) -> None:
    """Give a 1-byte-cache attention layer k_scale / v_scale [kv_heads of this rank],
    1.0 until loaded; a checkpoint's per-tensor scale is broadcast over heads."""
    heads, start, total = attn.num_kv_heads, attn.kv_head_start, attn.total_kv_heads

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        loaded = loaded.detach().float().reshape(-1)
        if loaded.numel() == 1:
            param.data.fill_(loaded.item())
        elif loaded.numel() == total:
            param.data.copy_(loaded[start:start + heads])
        else:
            raise ValueError(f"expected 1 or {total} KV scales, got {loaded.numel()}")

    for name in ("k_scale", "v_scale"):
        param = nn.Parameter(torch.ones(heads, dtype=torch.float32), requires_grad=False)
        param.weight_loader = load
        param.optional = True  # fp8 without calibration keeps 1.0, as vLLM does
        setattr(attn, name, param)


def linear_lm_head(model: nn.Module, quant: QuantConfig) -> None:
    """quant.lm_head: the model's LM head becomes a linear layer (LinearLMHead, holding
    the same float weight, tied or not) that the method then quantizes or loads."""
    head = getattr(model, "lm_head", None)
    if quant.lm_head and isinstance(head, LMHead):
        model.lm_head = LinearLMHead(head)


def quantize_model(model: nn.Module, quant: QuantConfig, kv_cache_dtype: str) -> None:
    """Give each linear layer its method and each attention layer its KV scales (the
    parameters are created uninitialised, for loading)."""
    linear_lm_head(model, quant)
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            method = quant.method_for(name)
            if method is not module.method:
                module.set_method(method)
        elif isinstance(module, Experts):
            method = quant.method_for(name)
            if method.supports_experts:
                method.create_expert_weights(module)
        elif isinstance(module, Attention) and kv_cache_dtype in KV_CACHE_TORCH_DTYPES:
            enable_kv_scales(module)
    config = getattr(model, "config", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if quant.lm_head == "gguf" and getattr(config, "tie_word_embeddings", False) and embed:
        embed.look_up_in(model.lm_head)  # the kept token_embd, held once


def linear_layers(model: nn.Module) -> Iterable[tuple[str, LinearBase]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LinearBase))


def quantize_float_model(model: nn.Module, quant: QuantConfig, kv_cache_dtype: str,
                         input_amax: dict[str, torch.Tensor],
                         kv_amax: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Build time: convert a loaded float model in place to `quant` and the KV dtype.

    input_amax: calibrated max |input| per linear layer name (static activations);
    kv_amax: per attention layer name, max |k| and |v| per KV head of the full model.
    """
    linear_lm_head(model, quant)
    for name, layer in list(linear_layers(model)):
        method = quant.method_for(name)
        if method is not UNQUANTIZED and layer.method is UNQUANTIZED:  # not done already
            method.quantize_from_float(layer, input_amax.get(name))
    for name, experts in model.named_modules():
        if isinstance(experts, Experts) and experts.w13_scale is None:  # not done already
            method = quant.method_for(name)
            if method.supports_experts:
                method.quantize_experts_from_float(experts)
    if kv_cache_dtype not in KV_CACHE_TORCH_DTYPES:
        return
    qmax = KV_QMAX[KV_CACHE_TORCH_DTYPES[kv_cache_dtype]]
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            enable_kv_scales(module)
            if name in kv_amax:
                for param, amax in zip((module.k_scale, module.v_scale), kv_amax[name]):
                    param.weight_loader(param, amax.float().clamp_min(MIN_AMAX) / qmax)
