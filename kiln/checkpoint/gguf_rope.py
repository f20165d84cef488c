"""A GGUF's rope scaling as HF's rope_scaling dict: linear and YaRN from the
{arch}.rope.scaling.* keys (as llama.cpp's converter writes them from config.json), Llama
3's from its rope_freqs tensor."""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from kiln.checkpoint.gguf_file import GGUFFile, GGUFTensor
from kiln.errors import CheckpointError

# {arch}.rope.scaling.<key> -> the HF rope_scaling field it came from (yarn).
_YARN_KEYS = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow",
              "yarn_attn_factor": "attention_factor"}


def _value(reader: GGUFFile, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _f32(value: Any) -> float:
    return float(str(np.float32(value)))  # GGUF floats are float32: 1e-5 back as 1e-5


def rope_scaling(reader: GGUFFile, tensors: list[GGUFTensor], arch: str, theta: float,
                 head_dim: int, name: str) -> dict[str, Any] | None:
    """HF's rope_scaling for the file (None: plain rotary), or a CheckpointError for
    scaling kiln cannot reproduce."""
    key = f"{arch}.rope.scaling."
    kind = _value(reader, key + "type") or "none"
    factor = _value(reader, key + "factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn" and factor:
        return _yarn(reader, key, _f32(factor), arch, name)
    if kind not in ("none", "linear", "yarn"):
        raise CheckpointError(f"{name} uses rope scaling {kind!r} ({key}type); kiln reads "
                              "none, linear and yarn (and Llama 3's rope_freqs)")
    freqs = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_rope(freqs, theta, head_dim, name)


def _yarn(reader: GGUFFile, key: str, factor: float, arch: str, name: str) -> dict[str, Any]:
    # llama.cpp takes the trained context as the original one where the file has none.
    original = _value(reader, key + "original_context_length") or \
        _value(reader, f"{arch}.context_length")
    if not isinstance(original, int) or original <= 0:
        raise CheckpointError(f"{name} uses yarn rope scaling but has no "
                              f"{key}original_context_length")
    scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor,
                               "original_max_position_embeddings": original}
    for gguf_key, hf_key in _YARN_KEYS.items():
        value = _value(reader, key + gguf_key)
        if value is not None:
            scaling[hf_key] = _f32(value)
    # Knobs llama.cpp has and HF's yarn (kiln's) does not: only their neutral values.
    for gguf_key, neutral in (("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0),
                              ("attn_factor", 1.0)):
        value = _value(reader, key + gguf_key)
        if value is not None and _f32(value) != neutral:
            raise CheckpointError(
                f"{name} sets {key}{gguf_key} = {_f32(value)}; kiln's yarn rope scaling (as "
                f"transformers') has no such setting, so it cannot reproduce the model")
    return scaling


def _llama3_rope(t: GGUFTensor, theta: float, head_dim: int, name: str
                 ) -> dict[str, Any] | None:
    """Llama 3.1+ keeps its rope scaling only as per-frequency divisors (rope_freqs).

    Recompute them from the HF llama3 formula with Meta's published parameters and
    accept the file only if they match, so a model is never run with the wrong rotary.
    """
    got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
    if np.allclose(got, 1.0):
        return None
    scaling = {"rope_type": "llama3", "factor": _f32(got.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    orig, low, high = 8192, 1.0, 4.0
    want = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        smooth = min(max((orig / wavelen - low) / (high - low), 0.0), 1.0)
        want.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    if len(want) != len(got) or not np.allclose(got, want, rtol=1e-4):
        raise CheckpointError(
            f"{name} has a rope_freqs tensor that is not Llama 3 rope scaling "
            "with the usual parameters; kiln cannot reproduce its rotary embedding")
    return scaling
