"""Model registry: HF architecture name -> model class, imported lazily."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed import Mapping
from kiln.errors import BuildError
from kiln.layers.quantization import QuantConfig, quantize_model

_REGISTRY = {
    "LlamaForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "MistralForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Qwen2ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Qwen3ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "GemmaForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Phi3ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Starcoder2ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "GPT2LMHeadModel": "kiln.models.decoder:DecoderForCausalLM",
    "GPTNeoXForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "PhiForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Gemma2ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Gemma3ForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "BloomForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "FalconForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "MixtralForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Qwen2MoeForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
    "Qwen3MoeForCausalLM": "kiln.models.decoder:DecoderForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _REGISTRY:
        raise BuildError(f"no kiln model for architecture {architecture!r}; "
                         f"supported: {', '.join(_REGISTRY)}")
    module, name = _REGISTRY[architecture].split(":")
    return getattr(importlib.import_module(module), name)


def check_model(cfg: ModelConfig) -> None:
    """What no kiln model can run, named before a build starts: query heads that do not
    split into groups of the KV heads, a rotary part that is not an even number of dims
    of the head, layers of a kind kiln does not run, a rope_scaling block kiln does not
    compute."""
    from kiln.layers.rotary import check_rope_scaling

    if cfg.num_heads % cfg.num_kv_heads:
        raise BuildError(f"the model's {cfg.num_heads} attention heads are not a multiple of its "
                         f"{cfg.num_kv_heads} KV heads (num_key_value_heads), so they do not "
                         "share them evenly; is config.json right?")
    if cfg.position_embedding == "rope" and not (
            0 < cfg.rotary_dim <= cfg.head_dim and cfg.rotary_dim % 2 == 0):
        raise BuildError(f"partial_rotary_factor {cfg.partial_rotary_factor} of the "
                         f"{cfg.head_dim}-dim heads rotates {cfg.rotary_dim} dims; it must "
                         "rotate an even number of them, at least 2 and at most the head's")
    thetas = (cfg.rope_theta, cfg.rope_local_theta) if cfg.position_embedding == "rope" else ()
    bad = next((t for t in thetas if t is not None and not t > 0), None)
    if bad is not None:  # (the rotary tables would be NaN)
        raise BuildError(f"rope_theta {bad} must be a positive number (the rotary base, e.g. "
                         "10000); is config.json right?")
    other = sorted(set(cfg.layer_types) - {"sliding_attention", "full_attention"})
    if other:  # (transformers' other kinds: chunked, linear attention, ...)
        raise BuildError(f"config.json's layer_types lists {', '.join(map(repr, other))}; kiln "
                         "runs 'sliding_attention' and 'full_attention' layers only")
    check_rope_scaling(cfg.rope_scaling, cfg.rotary_dim)


def create_model(cfg: ModelConfig, mapping: Mapping, max_positions: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 quant: QuantConfig | None = None, kv_cache_dtype: str = "auto") -> nn.Module:
    """Instantiate with uninitialised parameters of `dtype` on `device` (no init cost);
    with `quant`, linear layers hold that format's parameters, and a 1-byte
    `kv_cache_dtype` gives attention layers their KV scales."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(cfg.architecture)(cfg, mapping, max_positions)
            quantize_model(model, quant or QuantConfig(), kv_cache_dtype)
            return model
    finally:
        torch.set_default_dtype(previous)
