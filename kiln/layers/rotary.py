"""Rotary position embedding tables (default, linear, Llama 3, LongRoPE and YaRN scaling)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kiln.errors import BuildError, CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
# What each type's table is computed from: the keys transformers' rope validation requires
# (a KeyError there). Config reading fills original_max_position_embeddings in, a null yarn
# factor and a null or absent longrope one, as transformers computes them.
_NEEDS = {"linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"),
          "yarn": ("factor", "original_max_position_embeddings"),
          "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict[str, Any] | None, rotary_dim: int) -> None:
    """A CheckpointError naming the field where the model's rope_scaling (rope_parameters
    in transformers 5) is of a type kiln does not compute, or lacks what its type needs."""
    rope_type = _rope_type(scaling)
    where = "config.json's rope_scaling"
    supported = f"kiln supports the rope types {', '.join(SUPPORTED_ROPE_TYPES)}"
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{where} has type {rope_type!r}, which is not supported; "
                              f"{supported}")
    for key in _NEEDS.get(rope_type, ()):
        value = scaling.get(key)  # type: ignore[union-attr]
        if value is None:  # (transformers: "Missing required keys in `rope_parameters`")
            hint = "; set it (a null one is max_position_embeddings / original_max_position_" \
                "embeddings, as in transformers)" if (rope_type, key) == ("yarn", "factor") \
                else f" ({supported})"
            raise CheckpointError(f"{where} of type {rope_type!r} has no {key!r}; a {rope_type} "
                                  f"block needs {', '.join(_NEEDS[rope_type])}{hint}")
        if key in ("short_factor", "long_factor"):
            ok = isinstance(value, list) and len(value) == rotary_dim // 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            want = f"a list of {rotary_dim // 2} numbers (one per rotary dim pair)"
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            want = "a positive number"
        if not ok:
            raise CheckpointError(f"{where} field {key!r} is {value!r}; it must be {want}")


def _rope_type(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """LongRoPE's cos/sin scale: sqrt(1 + ln(factor) / ln(original context)) unless given."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """The scale on cos/sin: LongRoPE's and YaRN's (as transformers computes them), else 1."""
    rope_type = _rope_type(scaling)
    if rope_type == "longrope":
        return longrope_attention_factor(scaling)  # type: ignore[arg-type]
    if rope_type != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:  # type: ignore[union-attr]
        return float(scaling["attention_factor"])  # type: ignore[index]
    factor = float(scaling["factor"])  # type: ignore[index]
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")  # type: ignore
    if mscale and mscale_all:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
    return _yarn_mscale(factor)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float,
          scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): the high frequencies kept, the low ones divided by `factor`,
    a linear ramp between them over the dims whose rotations in the original context fall
    between beta_slow and beta_fast."""
    original = scaling.get("original_max_position_embeddings")
    if not original or not scaling.get("factor"):
        raise BuildError("yarn rope scaling needs factor and original_max_position_embeddings "
                         f"in rope_scaling (it has {sorted(scaling)})")
    factor = float(scaling["factor"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: extrapolate (the frequency as is), 1: interpolate (divided by factor)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                        max_positions: int = 0) -> torch.Tensor:
    """inv_freq [head_dim / 2]. LongRoPE (Phi-3) divides by its short factors when
    max_positions fit the original context, else by its long factors (RotaryEmbedding
    uses both: short below the original context, long from it on)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    rope_type = _rope_type(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "longrope":
        long = max_positions > int(scaling["original_max_position_embeddings"])  # type: ignore
        factors = scaling["long_factor" if long else "short_factor"]  # type: ignore[index]
        return inv_freq / torch.tensor(factors, dtype=torch.float32)
    if rope_type == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)  # type: ignore[arg-type]
    factor = float(scaling["factor"])  # type: ignore[index]
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))  # type: ignore[union-attr]
        high = float(scaling.get("high_freq_factor", 4.0))  # type: ignore[union-attr]
        old_len = float(scaling["original_max_position_embeddings"])  # type: ignore[index]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise BuildError(f"rope scaling type {rope_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """The rotary table [max_pos, head_dim] = [cos | sin] in float32; attention applies it
    fused with writing the KV cache (`functional.rotary_and_write_kv`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None, shared: dict | None = None) -> None:
        """shared: a dict the model's layers pass alike, so layers with the same rotary
        share one table (the layers of a model nearly always do: one table instead of
        one per layer, e.g. 64 MiB instead of 2 GiB for 32 layers at 128k positions)."""
        super().__init__()
        self.head_dim = head_dim
        self.long_offset = 0  # LongRoPE: where the all-long rows start (see below)
        key = (head_dim, max_positions, theta, repr(sorted((scaling or {}).items())))
        if shared is not None and key in shared:
            table = shared[key]
            self.long_offset = table.long_offset
            if hasattr(table, "original_positions"):
                self.original_positions = table.original_positions
            self.register_buffer("cos_sin", table.cos_sin, persistent=False)
            return
        if shared is not None:
            shared[key] = self
        inv_freq = inverse_frequencies(head_dim, theta, scaling, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        if _rope_type(scaling) == "longrope":
            # transformers rotates a sequence with the short factors while it fits the
            # original context and with the long ones from there on (generate's cache keeps
            # the earlier keys); a prompt longer than the original context gets the long
            # factors on every token. Rows [0, max): short below the original context,
            # long from it; rows [max, 2 max): long. The model runner adds long_offset to
            # the positions of a sequence whose prompt is longer than the original context.
            original = int(scaling["original_max_position_embeddings"])  # type: ignore[index]
            self.original_positions = original
            if max_positions > original:
                short = inverse_frequencies(head_dim, theta, scaling, original)
                mixed = freqs.clone()
                mixed[:original] = torch.outer(torch.arange(original, dtype=torch.float32),
                                               short)
                freqs = torch.cat([mixed, freqs])
                self.long_offset = max_positions
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
        if attention_factor(scaling) != 1.0:  # LongRoPE, YaRN
            cos_sin = cos_sin * attention_factor(scaling)
        # Not persistent: it is derived from the config, never stored in the engine.
        self.register_buffer("cos_sin", cos_sin, persistent=False)
