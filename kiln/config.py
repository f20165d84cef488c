"""Frozen configs: what the model is (ModelConfig) and how it was built (BuildConfig)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import CheckpointError

# HF architecture name -> (kiln model family, per-family flags). Families are rows here,
# not classes: one generic decoder serves every row.
_LLAMA_FAMILY = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # RMSNorm scales by (1 + w), embeddings by sqrt(hidden), GeGLU (tanh GELU) MLP.
    "GemmaForCausalLM": {"norm_weight_offset": 1.0, "scale_embeddings": True},
    # Q/K/V and gate/up come fused in the checkpoint (split at build time).
    "Phi3ForCausalLM": {},
    # LayerNorm with bias, a plain (not gated) GELU MLP, biases everywhere (use_bias).
    "Starcoder2ForCausalLM": {"norm_type": "layernorm", "gated_mlp": False,
                              "bias_key": "use_bias"},
    # GPT-style rows (kiln.models.convert maps their tensor names onto the decoder's).
    # GPT-2: learned absolute positions, Conv1D (transposed) weights, biases everywhere.
    "GPT2LMHeadModel": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                        "position_embedding": "learned", "tie_word_embeddings": True},
    # GPT-NeoX / Pythia: x + attn(ln1(x)) + mlp(ln2(x)), rotary on part of each head.
    "GPTNeoXForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                           "parallel_residual_key": "use_parallel_residual"},
    # Phi-2: one LayerNorm feeds attention and MLP in parallel; partial rotary; LM head bias.
    "PhiForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                       "parallel_residual": True, "parallel_shared_norm": True,
                       "lm_head_bias": True},
    # Bloom: ALiBi instead of positions, a LayerNorm on the embeddings, per-head fused QKV.
    "BloomForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                         "position_embedding": "alibi", "embedding_norm": True,
                         "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"},
    # Falcon: parallel attention + MLP (one shared LayerNorm, or ln_attn / ln_mlp in the
    # new decoder architecture of 40B / 180B), multi-query or grouped KV (see _falcon).
    "FalconForCausalLM": {"norm_type": "layernorm", "gated_mlp": False,
                          "tie_word_embeddings": True, "hidden_act": "gelu",
                          "parallel_residual_key": "parallel_attn"},
    # Mixture of experts (kiln.layers.moe): top-k routing over SwiGLU experts; Mixtral
    # renormalises the top-k weights, the Qwen MoEs when norm_topk_prob says so; Qwen2-MoE
    # adds a shared expert behind a sigmoid gate.
    "MixtralForCausalLM": {"moe": True, "norm_topk_prob": True},
    "Qwen2MoeForCausalLM": {"moe": True, "qkv_bias": True},
    "Qwen3MoeForCausalLM": {"moe": True, "qk_norm": True},
    # Gemma 2: Gemma plus sandwich norms, soft-capping, alternating sliding/global layers.
    "Gemma2ForCausalLM": {"norm_weight_offset": 1.0, "scale_embeddings": True,
                          "sandwich_norms": True, "layer_pattern": 2},
    # Gemma 3 text: Gemma 2 without soft-capping, plus QK norm and a local RoPE base.
    "Gemma3ForCausalLM": {"norm_weight_offset": 1.0, "scale_embeddings": True,
                          "sandwich_norms": True, "qk_norm": True, "layer_pattern": 6},
}
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_tanh", "gelu", "gelu_new")
SUPPORTED_ARCHITECTURES = tuple(_LLAMA_FAMILY)
# GPT-era config.json names -> the names read below.
_HF_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
               "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
               "n_inner": "intermediate_size", "layer_norm_epsilon": "layer_norm_eps",
               "activation_function": "hidden_act", "rotary_emb_base": "rope_theta",
               "rotary_pct": "partial_rotary_factor", "norm_epsilon": "layer_norm_eps",
               "n_embed": "hidden_size", "ffn_hidden_size": "intermediate_size",
               "activation": "hidden_act"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model definition needs, independent of transformers."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    norm_weight_offset: float = 0.0  # RMSNorm multiplies by (offset + w) (Gemma: 1)
    norm_type: str = "rmsnorm"  # or "layernorm" (with bias)
    gated_mlp: bool = True  # down(act(gate) * up); False: down(act(up)) (c_fc / c_proj)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    # Position encoding: "rope" (rotary on the first rotary_dim dims of each head),
    # "learned" (absolute position embeddings added to the token embeddings).
    position_embedding: str = "rope"
    partial_rotary_factor: float = 1.0
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, Phi)
    parallel_shared_norm: bool = False  # ... with norm1 == norm2 (Phi-2)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    # Per-layer "sliding_attention" | "full_attention"; empty: every layer uses
    # sliding_window (when set).
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3)
    lm_head_bias: bool = False
    embedding_norm: bool = False  # a LayerNorm right after the token embeddings (Bloom)
    # Mixture of experts: layers in moe_layers replace the MLP by num_experts SwiGLU
    # experts of moe_intermediate_size, num_experts_per_tok of them per token (and a
    # gated shared expert of shared_expert_intermediate_size when > 0).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary rotates (0 without rotary)."""
        if self.position_embedding != "rope":
            return 0
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: global attention)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window or None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        data["layer_types"] = tuple(data.get("layer_types", ()))
        data["moe_layers"] = tuple(data.get("moe_layers", ()))
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a HuggingFace `config.json` dict (transformers 4 or 5 layout)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(hf.get("model_type"))
        if arch not in _LLAMA_FAMILY:
            raise CheckpointError(
                f"unsupported architecture {arch!r}; kiln supports: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        flags = _LLAMA_FAMILY[arch]
        hf = {**{_HF_ALIASES[k]: v for k, v in hf.items() if k in _HF_ALIASES}, **hf}
        _refuse_unsupported(arch, hf)
        bias_key = flags.get("bias_key", "attention_bias")
        all_bias = bool(flags.get("bias", False))
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            # transformers 5 moved rope_theta / rope_scaling into rope_parameters; Gemma 3
            # keeps one set per layer type there.
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            local_rope = rope.pop("sliding_attention", None)
            rope = dict(rope.pop("full_attention", None) or rope)
            rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
            partial = float(rope.pop("partial_rotary_factor",
                                     hf.get("partial_rotary_factor", 1.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type == "longrope":  # Phi-3 keeps the original context at the top level
                original = int(rope.get("original_max_position_embeddings")
                               or hf["original_max_position_embeddings"])
                rope["original_max_position_embeddings"] = original
                rope.setdefault("factor", None)
                if rope["factor"] is None:
                    rope["factor"] = int(hf.get("max_position_embeddings", 4096)) / original
            rope_scaling = rope if rope_type not in (None, "default") else None
            local_theta = (local_rope or {}).get("rope_theta", hf.get("rope_local_base_freq"))
            window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
            layers = int(hf["num_hidden_layers"])
            pattern = flags.get("layer_pattern")
            layer_types = tuple(hf.get("layer_types") or ())
            if pattern and not layer_types:
                pattern = int(hf.get("sliding_window_pattern")
                              or hf.get("_sliding_window_pattern") or pattern)
                layer_types = tuple("sliding_attention" if (i + 1) % pattern else
                                    "full_attention" for i in range(layers))
            layernorm = flags.get("norm_type") == "layernorm"
            scalar = hf.get("query_pre_attn_scalar") if flags.get("sandwich_norms") else None
            fields = dict(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
                num_layers=layers,
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(hf.get("layer_norm_eps", 1e-5) if layernorm
                                   else hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                                flags.get("tie_word_embeddings", False))),
                qkv_bias=all_bias or bool(flags.get("qkv_bias", hf.get(bias_key, False))),
                o_bias=all_bias or (bool(hf.get(bias_key, False)) and not flags.get("qkv_bias")),
                mlp_bias=all_bias or bool(hf.get("mlp_bias", hf.get(bias_key, False)
                                                 if bias_key == "use_bias" else False)),
                qk_norm=bool(flags.get("qk_norm", False)),
                hidden_act=_activation(arch, hf),
                norm_weight_offset=float(flags.get("norm_weight_offset", 0.0)),
                scale_embeddings=bool(flags.get("scale_embeddings", False)),
                norm_type=str(flags.get("norm_type", "rmsnorm")),
                gated_mlp=bool(flags.get("gated_mlp", True)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=window,
                position_embedding=str(flags.get("position_embedding", "rope")),
                partial_rotary_factor=partial,
                parallel_residual=bool(hf.get(flags["parallel_residual_key"], True)
                                       if "parallel_residual_key" in flags
                                       else flags.get("parallel_residual", False)),
                parallel_shared_norm=bool(flags.get("parallel_shared_norm", False)),
                sandwich_norms=bool(flags.get("sandwich_norms", False)),
                attn_scale=float(scalar) ** -0.5 if scalar else None,
                attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
                final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
                layer_types=layer_types,
                rope_local_theta=_optional_float(local_theta),
                lm_head_bias=bool(flags.get("lm_head_bias", False)),
                embedding_norm=bool(flags.get("embedding_norm", False)),
            )
            if arch == "FalconForCausalLM":
                fields.update(_falcon(hf, num_heads))
            if flags.get("moe"):
                fields.update(_moe(hf, layers, flags))
            return cls(**fields)
        except KeyError as e:
            raise CheckpointError(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json has a field of the wrong type: {e}") from None


def _falcon(hf: dict[str, Any], num_heads: int) -> dict[str, Any]:
    """Falcon's KV heads, biases and norms: 7B is multi-query with one LayerNorm shared by
    attention and MLP; the new decoder architecture (40B, 180B) has grouped KV heads and
    two LayerNorms (ln_attn, ln_mlp) unless num_ln_in_parallel_attn is 1."""
    new_arch = bool(hf.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(hf["num_kv_heads"])
    else:
        kv_heads = 1 if hf.get("multi_query", True) else num_heads
    bias = bool(hf.get("bias", False))
    return dict(num_kv_heads=kv_heads, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                parallel_shared_norm=not new_arch or hf.get("num_ln_in_parallel_attn") == 1)


def _moe(hf: dict[str, Any], layers: int, flags: dict[str, Any]) -> dict[str, Any]:
    """Expert counts and sizes; which layers are sparse (Qwen: every decoder_sparse_step-th
    layer not in mlp_only_layers; Mixtral: all)."""
    experts = int(hf.get("num_local_experts") or hf["num_experts"])
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or ())
    return dict(
        num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
        norm_topk_prob=bool(flags.get("norm_topk_prob", hf.get("norm_topk_prob", False))),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# config.json fields (architecture, field, the value kiln implements) kiln cannot honour
# otherwise: a build fails with the field's name rather than run a different model.
_REQUIRED_VALUES = (
    ("GPT2LMHeadModel", "scale_attn_by_inverse_layer_idx", False),
    ("GPT2LMHeadModel", "reorder_and_upcast_attn", False),
    ("GPT2LMHeadModel", "scale_attn_weights", True),
    ("PhiForCausalLM", "qk_layernorm", False),
    ("BloomForCausalLM", "apply_residual_connection_post_layernorm", False),
    ("FalconForCausalLM", "alibi", False),
)


def _refuse_unsupported(arch: str, hf: dict[str, Any]) -> None:
    if hf.get("use_sliding_window") and hf.get("max_window_layers") is not None and \
            not hf.get("layer_types"):
        # Qwen: only the layers from max_window_layers on slide; kiln would slide them all.
        raise CheckpointError(f"config.json field use_sliding_window=True (with "
                              f"max_window_layers) is not supported for {arch}")
    for name, field_name, value in _REQUIRED_VALUES:
        if name == arch and field_name in hf and hf[field_name] != value:
            raise CheckpointError(f"config.json field {field_name}={hf[field_name]!r} is not "
                                  f"supported for {arch} (kiln implements {value!r})")


def _activation(arch: str, hf: dict[str, Any]) -> str:
    default = _LLAMA_FAMILY[arch].get("hidden_act", "silu")
    act = str(hf.get("hidden_activation") or hf.get("hidden_act") or default)
    # Gemma's releases say "gelu" but mean the tanh approximation (as transformers does).
    gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    return "gelu_pytorch_tanh" if gemma and act == "gelu" else act


def _arch_from_model_type(model_type: str | None) -> str:
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM",
               "starcoder2": "Starcoder2ForCausalLM", "gpt2": "GPT2LMHeadModel",
               "gpt_neox": "GPTNeoXForCausalLM", "phi": "PhiForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "bloom": "BloomForCausalLM", "falcon": "FalconForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}
    return by_type.get(model_type or "", f"<model_type={model_type}>")


DTYPES = ("float32", "float16", "bfloat16")
# auto: what the checkpoint holds (none for floats)
QUANTIZATIONS = ("auto", "none", "fp8", "int8_wo", "int4_wo", "int4_awq", "int4_gptq", "int8_sq",
                 "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # auto: the checkpoint's KV scheme, else dtype
ACTIVATION_SCHEMES = ("auto", "dynamic", "static")  # auto: static when calibrated


@dataclass(frozen=True)
class BuildConfig:
    """How an engine is built. Stored in engine.json; the runtime reads its limits."""

    dtype: str = "auto"  # auto: bfloat16 where CUDA is available, else float32
    max_batch_size: int = 64
    max_seq_len: int = 4096
    max_num_tokens: int = 8192  # token budget of one engine step
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES; a built engine stores the resolved one
    block_size: int = 16  # tokens per KV cache block
    tp_size: int = 1
    pp_size: int = 1
    random_weights: bool = False
    # Quantization (see kiln.layers.quantization). A built engine records what it holds:
    # the method, how activations are scaled, and the linear layers kept in high precision.
    quantization: str = "auto"
    activation_scheme: str = "auto"  # fp8 inputs: dynamic per token or static per tensor
    quant_ignore: tuple[str, ...] = ()  # kiln module names left unquantized
    quant_source: str = ""  # where the quantized weights came from (kiln, a format name)
    calib_file: str | None = None  # text for static activation and KV scales
    group_size: int = 0  # integer weights: inputs per scale (0: int4 128, int8 per channel)
    quant_layers: dict[str, str] = field(default_factory=dict)  # gguf: storage per layer
    smooth_alpha: float = 0.5  # int8_sq: SmoothQuant migration strength
    act_order: bool = False  # int4_gptq: columns in order of decreasing activation energy
    calib_samples: int = 32
    calib_seq_len: int = 512

    @property
    def quantized(self) -> bool:
        return self.quantization not in ("auto", "none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["quant_ignore"] = tuple(data.get("quant_ignore", ()))
        return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    """What `engine.json` holds: the model, how it was built, and where it came from."""

    model: ModelConfig
    build: BuildConfig
    source: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1


def add_build_arguments(p: argparse.ArgumentParser, limits: bool = True) -> None:
    """The build options of `kiln build | run | serve | bench | eval` (limits: the
    engine-size options, which bench and eval set themselves)."""
    g = p.add_argument_group("build options")
    g.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16")
    if limits:
        # Limits are runtime settings of a built engine (its built max_seq_len is the most
        # it serves); given here they also size an engine built into the cache.
        g.add_argument("--max-batch-size", type=int, default=None,
                       help="sequences per step (default: the engine's, 64 for new builds)")
        g.add_argument("--max-seq-len", type=int, default=None,
                       help="prompt + output tokens (default: the engine's, 4096 for new builds)")
        g.add_argument("--max-num-tokens", type=int, default=None,
                       help="token budget of one engine step (default: the engine's, 8192)")
        g.add_argument("--tp-size", type=int, default=1)
        g.add_argument("--pp-size", type=int, default=1)
        g.add_argument("--custom-all-reduce", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="TP on CUDA: all-reduce decode-sized messages with kiln's "
                       "one-shot NVLink kernel (fused with add + RMSNorm) instead of NCCL "
                       "(default: on where the GPUs support it)")
        g.add_argument("--attention-sinks", type=int, default=None, metavar="S",
                       help="StreamingLLM: keep each sequence's first S tokens (whole KV "
                       "blocks) and its last --attention-window tokens, so generation runs "
                       "past --max-seq-len in constant memory (RoPE models)")
        g.add_argument("--attention-window", type=int, default=None, metavar="W",
                       help="with --attention-sinks: recent tokens kept (default: what "
                       "max_seq_len leaves after the sinks and one block)")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="fp8: W8A8 FP8 weights and activations; int8_wo / int4_wo: INT8 "
                   "(per channel) / INT4 (groups, with offsets) weights, 16-bit "
                   "activations; int4_awq / int4_gptq: INT4 storage, AWQ scale search / "
                   "GPTQ rounding on calibration text; int8_sq: SmoothQuant INT8 weights "
                   "and per-token INT8 activations (calibrated); auto: what the checkpoint "
                   "holds (FP8 compressed-tensors / modelopt checkpoints stay FP8; GGUF "
                   "files keep their quantized blocks on CUDA, and are dequantized on the "
                   "CPU); gguf / none: keep / dequantize a GGUF file's blocks")
    g.add_argument("--group-size", type=int, default=None,
                   help="integer weights: inputs sharing one scale; it must divide every "
                   "layer's input size (default: 128 for int4, per channel for int8)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8 or int8: 1-byte KV cache with per-head scales (int8 needs "
                   "--calib-file); auto: the checkpoint's KV scheme, else --dtype")
    g.add_argument("--activation-scheme", default="auto", choices=ACTIVATION_SCHEMES,
                   help="FP8 inputs: dynamic per token, or static per tensor from "
                   "calibration (auto: static when --calib-file is given)")
    g.add_argument("--calib-file", default=None, metavar="TEXT",
                   help="text to calibrate static input scales, KV scales and SmoothQuant on "
                   "(int8_sq without it: a public-domain text that ships with kiln)")
    g.add_argument("--smooth-alpha", type=float, default=None,
                   help="int8_sq: how much of the activation range SmoothQuant moves into "
                   "the weights, 0..1 (default 0.5)")
    g.add_argument("--act-order", action="store_true", default=None,
                   help="int4_gptq: round the most used input channels first")
    g.add_argument("--calib-samples", type=int, default=32)
    g.add_argument("--calib-seq-len", type=int, default=512)


LIMITS = ("max_batch_size", "max_num_tokens", "max_seq_len")


def build_config_from_args(args: argparse.Namespace, **overrides: Any) -> BuildConfig:
    """A BuildConfig from the options add_build_arguments added (and `overrides`)."""
    names = {f.name for f in dataclasses.fields(BuildConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return BuildConfig(**{**values, **overrides})


def limits_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime limits and options given on the command line (engine defaults for the
    rest)."""
    options: dict[str, Any] = {k: getattr(args, k) for k in LIMITS
                               if getattr(args, k, None) is not None}
    for name in ("custom_all_reduce", "attention_sinks", "attention_window"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options
