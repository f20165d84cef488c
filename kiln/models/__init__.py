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
