"""Readers of pre-quantized HF checkpoints: what scheme a folder holds, in kiln's terms.

Supported: integer weights repacked by kiln.build.packed_int (compressed-tensors
`pack-quantized` W4A16 / W8A16, AutoAWQ GEMM, GPTQ), compressed-tensors `int-quantized`
W8A8 (as int8_sq), and FP8 W8A8 in the formats most public FP8 checkpoints use:
- compressed-tensors `float-quantized` (llm-compressor): e4m3 weights with per-channel or
  per-tensor `weight_scale`, dynamic per-token or static per-tensor `input_scale`,
  optional `kv_cache_scheme` (static per-tensor `self_attn.k_scale` / `v_scale`, which
  every attention layer must then hold; a dynamic one stores none and leaves the cache
  16-bit, with a warning).
- NVIDIA Model Optimizer HF export (`quant_method: modelopt` in config.json, or an older
  `hf_quant_config.json`): `quant_algo` FP8 (per-tensor weight and input scales) or
  FP8_PER_CHANNEL_PER_TOKEN, optional FP8 KV (`k_proj.k_scale` / `v_proj.v_scale` in
  every layer, or in none: `fp8_cast`, scale 1.0).
Anything else fails with the scheme's name. Tensors keep their HF names apart from the KV
scales, which are renamed to `self_attn.k_scale` / `self_attn.v_scale` for every format.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.checkpoint import Checkpoint
from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.layers.quantization import QuantConfig

log = logging.getLogger(__name__)

# HF linear names of one decoder layer, and the kiln layer each is fused into.
_LINEARS = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
            "self_attn.v_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj",
            "mlp.down_proj": "mlp.down_proj"}
# An MoE layer's HF module (Mixtral's own name, and everyone else's) and the names of an
# expert's three projections (HF, Mixtral).
_MOE_BLOCKS = ("mlp", "block_sparse_moe")
_EXPERT_PROJECTIONS = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
_SHARED_EXPERT = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"}
_KV_SCALE_NAMES = {".k_proj.k_scale": ".k_scale", ".v_proj.v_scale": ".v_scale",
                   ".k_proj.output_scale": ".k_scale", ".v_proj.output_scale": ".v_scale"}


@dataclass(frozen=True)
class Prequantized:
    quant: QuantConfig
    kv_cache_dtype: str | None  # "fp8" when the checkpoint carries KV scales
    source: str  # the format's name
    # every attention layer's k_scale / v_scale must be stored (compressed-tensors'
    # kv_cache_scheme); otherwise they are all or none (modelopt's fp8_cast: none, 1.0)
    kv_scales_required: bool = False

    def rename(self, hf_name: str) -> str:
        for old, new in _KV_SCALE_NAMES.items():
            if hf_name.endswith(old):
                return hf_name[: -len(old)] + new
        return hf_name

    def tensors(self, stream: Iterator[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            yield self.rename(name), tensor

    def stream(self, ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as the engine's parameters take them."""
        return self.tensors(ckpt.tensors())


@dataclass(frozen=True)
class GGUFBlocks(Prequantized):
    """A GGUF file whose quantized linear weights stay quantized (kiln.build.gguf_blocks);
    quant.layers says each kiln layer's storage."""

    def stream(self, ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
        from kiln.build.gguf_blocks import decode_blocks, to_storage

        specs = dict(self.quant.layers)
        tied_head: dict[str, torch.Tensor] = {}

        def decode(hf_name: str, qtype, data, rows: int, cols: int):
            if hf_name == "model.embed_tokens.weight" and "lm_head" in specs and \
                    "lm_head.weight" not in types:  # tied: the head keeps it, and the
                tied_head.update(to_storage(*decode_blocks(qtype, data, rows, cols),
                                            specs["lm_head"]))
                return {}  # embedding looks its rows up there (VocabEmbedding.look_up_in)
            module = "lm_head" if hf_name == "lm_head.weight" else kiln_linear(hf_name)
            spec = specs.get(module or "", "none")
            if spec == "none" or not hf_name.endswith(".weight"):
                return None
            return to_storage(*decode_blocks(qtype, data, rows, cols), spec)

        types = getattr(ckpt, "tensor_types", dict)()
        for name, tensor in ckpt.tensors(decoder=decode):  # type: ignore[call-arg]
            yield name, tensor
            while tied_head:
                suffix, part = tied_head.popitem()
                yield f"lm_head.{suffix}", part


def kiln_linear(hf_name: str) -> str | None:
    """"model.layers.3.self_attn.k_proj.weight" -> "model.layers.3.self_attn.qkv_proj"."""
    for hf, kiln in _LINEARS.items():
        if f".{hf}." in hf_name:
            return hf_name[:hf_name.index(f".{hf}.")] + "." + kiln
    return None


def gguf_plan(types: dict[str, object], keep_head: bool = True) -> GGUFBlocks:
    """Which linear layers of a GGUF file stay quantized, and in which storage; with
    keep_head, the LM head too (kiln.build.quantize keeps it off CUDA builds, where an
    integer head with GGUF's groups has not been measured yet)."""
    from kiln.build.gguf_blocks import layer_spec

    parts: dict[str, list] = {}
    for hf_name, qtype in types.items():
        module = kiln_linear(hf_name)
        if module is not None and hf_name.endswith(".weight"):
            parts.setdefault(module, []).append(qtype)
    # The LM head: output.weight, or the embedding it is tied to (no output.weight)
    head = types.get("lm_head.weight", types.get("model.embed_tokens.weight"))
    if keep_head and head is not None and layer_spec([head]) != "none":
        parts["lm_head"] = [head]
    layers = tuple(sorted((m, layer_spec(t)) for m, t in parts.items()))
    return GGUFBlocks(QuantConfig("gguf", layers=layers,
                                  lm_head="gguf" if "lm_head" in parts else ""), None, "gguf")


def quantization_config(folder: Path, hf_config: dict) -> object:
    """What a HF folder says of its quantization: config.json's quantization_config, else
    an older modelopt export's hf_quant_config.json (as one); None for float weights."""
    qc = hf_config.get("quantization_config")
    legacy = folder / "hf_quant_config.json"
    if qc is None and legacy.is_file():
        try:
            data = as_object(json.loads(legacy.read_text()), str(legacy))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{legacy} is not valid JSON: {e}") from None
        qc = {"quant_method": "modelopt",
              **as_object(data.get("quantization", {}), f"{legacy}'s \"quantization\"")}
    return qc


def read_quantization(folder: Path, hf_config: dict, cfg: ModelConfig,
                      names: list[str] | None = None) -> Prequantized | None:
    """The scheme of a HF folder, None for a float checkpoint; CheckpointError if kiln
    cannot read it. names: the checkpoint's tensor names, where known (AWQ / GPTQ layers
    stored in float are found by them)."""
    qc = quantization_config(folder, hf_config)
    if qc is None:
        return None
    qc = as_object(qc, f"{folder / 'config.json'}'s quantization_config")
    method = str(qc.get("quant_method", "")).lower()
    producer = qc.get("producer")
    if not method and isinstance(producer, dict) and producer.get("name") == "modelopt":
        method = "modelopt"  # modelopt 0.31-0.32 wrote no quant_method
    if method == "compressed-tensors":
        return _compressed_tensors(qc, cfg)
    if method == "modelopt":
        return _modelopt(qc, cfg)
    if method in ("awq", "gptq"):
        from kiln.build.packed_int import awq_gptq

        return awq_gptq(method, qc, cfg, names or [])
    if method == "fp8":  # transformers' own FP8 config (e.g. DeepSeek / Qwen FP8 blocks)
        raise CheckpointError(
            f"the checkpoint is quantized with quant_method 'fp8' ({describe(qc)}); kiln "
            "reads FP8 checkpoints in the compressed-tensors and modelopt formats")
    raise CheckpointError(
        f"the checkpoint is quantized with {method or 'an unnamed method'!r} "
        f"({describe(qc)}); kiln reads compressed-tensors (FP8, pack-quantized INT4/INT8, "
        "int-quantized W8A8), modelopt FP8, AutoAWQ GEMM and GPTQ checkpoints; use the float "
        "checkpoint with --quantization fp8 / int4_awq / int4_gptq / ... instead")


def describe(qc: dict) -> str:
    keys = ("quant_method", "format", "quant_algo", "bits", "group_size")
    return ", ".join(f"{k}={qc[k]}" for k in keys if k in qc)


def as_object(value: object, what: str) -> dict:
    """A JSON object of a quantization config, or CheckpointError saying what it is."""
    if isinstance(value, dict):
        return value
    kind = {str: "a string", list: "a list", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise CheckpointError(f"{what} is {kind} ({shown}); quantization tools write a JSON "
                          "object there")


def name_list(value: object, what: str) -> list[str]:
    """A list of module names (or patterns) of quantization_config; [] when absent."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise CheckpointError(f"quantization_config {what} is {value!r}; expected a list of "
                          "module names")


def _compressed_tensors(qc: dict, cfg: ModelConfig) -> Prequantized:
    fmt = qc.get("format")
    config_groups = as_object(qc.get("config_groups") or {},
                              "compressed-tensors config_groups (group name -> scheme)")
    groups = [as_object(g, f"compressed-tensors config_groups[{k!r}]")
              for k, g in config_groups.items()]
    if not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups")
    schemes = {json.dumps({k: g.get(k) for k in ("weights", "input_activations")},
                          sort_keys=True) for g in groups}
    if len(schemes) > 1:
        raise CheckpointError("compressed-tensors checkpoint mixes several schemes "
                              f"({len(schemes)} config groups); kiln reads one FP8 scheme")
    weights = as_object(groups[0].get("weights") or {}, "compressed-tensors weights scheme")
    inputs = groups[0].get("input_activations")
    if inputs is not None:
        inputs = as_object(inputs, "compressed-tensors input_activations scheme")
    name = (f"compressed-tensors format={fmt}, weights {weights.get('type')}"
            f"{weights.get('num_bits')}/{weights.get('strategy')}, inputs "
            + (f"{inputs.get('type')}{inputs.get('num_bits')}/{inputs.get('strategy')}"
               if inputs else "none"))
    if fmt == "pack-quantized":
        return _pack_quantized(qc, cfg, weights, inputs, name)
    if fmt == "int-quantized":
        return _int8_w8a8(qc, cfg, weights, inputs, name)
    is_fp8 = weights.get("type") == "float" and weights.get("num_bits") == 8
    if fmt != "float-quantized" or not is_fp8 or \
            weights.get("strategy") not in ("channel", "tensor"):
        raise CheckpointError(f"unsupported quantized checkpoint ({name}); kiln reads "
                              "FP8 float-quantized weights with channel or tensor scales")
    if not inputs or inputs.get("type") != "float" or inputs.get("num_bits") != 8:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): kiln needs FP8 "
                              "input activations (W8A8); FP8 weight-only is not supported")
    if inputs.get("dynamic") and inputs.get("strategy") == "token":
        scheme = "dynamic"
    elif not inputs.get("dynamic") and inputs.get("strategy") == "tensor":
        scheme = "static"
    else:
        raise CheckpointError(f"unsupported quantized checkpoint ({name}): FP8 inputs must "
                              "be dynamic per token or static per tensor")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"compressed-tensors checkpoint is {qc['quantization_status']!r}"
                              ", not 'compressed'; save it with save_compressed=True")
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        kv = as_object(kv, "compressed-tensors kv_cache_scheme")
    if kv and not (kv.get("type") == "float" and kv.get("num_bits") == 8
                   and kv.get("strategy", "tensor") == "tensor"
                   and kv.get("symmetric", True) is not False):
        raise CheckpointError(f"unsupported kv_cache_scheme {kv}; kiln reads FP8 per-tensor "
                              "symmetric KV scales")
    if kv and kv.get("dynamic") not in (None, False):
        # scales taken from each step's keys and values, which a paged cache written
        # step by step cannot hold: no scales are stored, and the cache stays 16-bit
        log.warning("%s: its kv_cache_scheme is dynamic (scales computed from each step's "
                    "keys and values, none stored), which kiln's paged cache cannot hold; "
                    "the KV cache stays 16-bit (--kv-cache-dtype fp8 [--calib-file TEXT] "
                    "for a 1-byte one with static scales)", name)
        kv = None
    ignore = ignored(cfg, name_list(qc.get("ignore"), "ignore"), _ct_match)
    return Prequantized(QuantConfig("fp8", scheme, ignore), "fp8" if kv else None,
                        "compressed-tensors", kv_scales_required=bool(kv))


def _pack_quantized(qc: dict, cfg: ModelConfig, weights: dict, inputs: dict | None,
                    name: str) -> Prequantized:
    from kiln.build.packed_int import PackQuantized, pack_quantized_scheme

    bits, group, symmetric = pack_quantized_scheme(weights, inputs, name)
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"compressed-tensors checkpoint is {qc['quantization_status']!r}"
                              ", not 'compressed'; save it with save_compressed=True")
    ignore = ignored(cfg, name_list(qc.get("ignore"), "ignore"), _ct_match)
    quant = QuantConfig("int4_wo" if bits == 4 else "int8_wo", ignore=ignore, group_size=group)
    return PackQuantized(quant, None, "compressed-tensors", bits=bits, symmetric=symmetric)


def _int8_w8a8(qc: dict, cfg: ModelConfig, weights: dict, inputs: dict | None,
               name: str) -> Prequantized:
    """int-quantized W8A8 (llm-compressor's W8A8 / SmoothQuant recipes): int8 weights with
    per-channel scales and dynamic per-token int8 inputs, which is kiln's int8_sq engine
    (the smoothing is already in the weights and norms)."""
    def is_int8(scheme: dict | None) -> bool:
        return bool(scheme) and scheme.get("type") == "int" and scheme.get("num_bits") == 8 \
            and scheme.get("symmetric", True)
    if not is_int8(weights) or weights.get("strategy") != "channel" or not is_int8(inputs) \
            or not inputs.get("dynamic") or inputs.get("strategy") != "token":
        raise CheckpointError(f"unsupported quantized checkpoint ({name}); kiln reads "
                              "int-quantized W8A8 with per-channel weights and dynamic "
                              "per-token inputs")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"compressed-tensors checkpoint is {qc['quantization_status']!r}"
                              ", not 'compressed'; save it with save_compressed=True")
    ignore = ignored(cfg, name_list(qc.get("ignore"), "ignore"), _ct_match)
    return Prequantized(QuantConfig("int8_sq", ignore=ignore), None, "compressed-tensors")


def _modelopt(qc: dict, cfg: ModelConfig) -> Prequantized:
    algo = str(qc.get("quant_algo") or "").upper()
    schemes = {"FP8": "static", "FP8_PER_CHANNEL_PER_TOKEN": "dynamic"}
    if algo not in schemes:
        raise CheckpointError(f"unsupported modelopt quant_algo {algo or None!r}; kiln reads "
                              "FP8 and FP8_PER_CHANNEL_PER_TOKEN")
    # KV: kv_cache_quant_algo (hf_quant_config.json), or kv_cache_scheme in config.json
    # (a dict of num_bits/type, or the string "FP8" in modelopt 0.31-0.32).
    kv = qc.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme")
    if isinstance(kv, dict):
        kv = "FP8" if (kv.get("type"), kv.get("num_bits")) == ("float", 8) else str(kv)
    if kv and str(kv).upper() != "FP8":
        raise CheckpointError(f"unsupported modelopt KV cache scheme {kv!r}; kiln reads FP8")
    patterns = name_list(qc.get("exclude_modules") or qc.get("ignore"), "exclude_modules")
    ignore = ignored(cfg, patterns, lambda name, p: fnmatch.fnmatchcase(name, p))
    return Prequantized(QuantConfig("fp8", schemes[algo], ignore), "fp8" if kv else None,
                        "modelopt")


def _ct_match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def ignored(cfg: ModelConfig, patterns: list[str],
             match: Callable[[str, str], bool]) -> tuple[str, ...]:
    """kiln module names to keep in high precision: fused layers whose HF parts are all
    ignored; a fused layer with only some parts ignored cannot be one GEMM. The same for
    the experts of an MoE layer, which kiln holds as one tensor per projection."""
    fused: dict[str, list[bool]] = {}
    moe = set(cfg.moe_layers)
    for i in range(cfg.num_layers):
        for hf, kiln in _LINEARS.items():
            if i in moe and hf.startswith("mlp."):
                continue  # an MoE layer has experts (below) instead of the dense MLP
            name = f"model.layers.{i}.{hf}"
            hit = any(match(name, p) for p in patterns)
            fused.setdefault(f"model.layers.{i}.{kiln}", []).append(hit)
    for i in moe:
        fused[f"model.layers.{i}.mlp.experts"] = [
            any(match(f"model.layers.{i}.{block}.experts.{e}.{proj}", p)
                for block in _MOE_BLOCKS for proj in aliases for p in patterns)
            for e in range(cfg.num_experts) for aliases in _EXPERT_PROJECTIONS]
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: a dense MLP beside them
            for hf, kiln in _SHARED_EXPERT.items():
                name = f"model.layers.{i}.mlp.shared_expert.{hf}"
                fused.setdefault(f"model.layers.{i}.mlp.shared_expert.{kiln}", []).append(
                    any(match(name, p) for p in patterns))
    mixed = [k for k, hits in fused.items() if any(hits) and not all(hits)]
    if mixed:
        raise CheckpointError(f"the checkpoint quantizes only some of the projections kiln "
                              f"fuses in {mixed[0]}; kiln cannot run that layer as one GEMM")
    return tuple(k for k, hits in fused.items() if all(hits))
