"""What the model is: ModelConfig, read from a HF config.json (or a GGUF header turned
into one), with the architecture table that maps HF names to kiln's generic decoder."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from kiln.errors import CheckpointError

log = logging.getLogger(__name__)

# HF architecture name -> (kiln model family, per-family flags). Families are rows here,
# not classes: one generic decoder serves every row. partial_rotary: the row rotates
# partial_rotary_factor of each head (the other rows' transformers classes ignore it).
_LLAMA_FAMILY = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # RMSNorm scales by (1 + w), embeddings by sqrt(hidden), GeGLU (tanh GELU) MLP.
    "GemmaForCausalLM": {"norm_weight_offset": 1.0, "scale_embeddings": True},
    # Q/K/V and gate/up come fused in the checkpoint (split at build time).
    "Phi3ForCausalLM": {"partial_rotary": True},
    # LayerNorm with bias, a plain (not gated) GELU MLP, biases everywhere (use_bias).
    "Starcoder2ForCausalLM": {"norm_type": "layernorm", "gated_mlp": False,
                              "bias_key": "use_bias"},
    # GPT-style rows (kiln.models.convert maps their tensor names onto the decoder's).
    # GPT-2: learned absolute positions, Conv1D (transposed) weights, biases everywhere.
    "GPT2LMHeadModel": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                        "position_embedding": "learned"},
    # GPT-NeoX / Pythia: x + attn(ln1(x)) + mlp(ln2(x)), rotary on part of each head.
    # Its attention biases follow attention_bias (default true), the MLP's are always there.
    "GPTNeoXForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "mlp_bias": True,
                           "parallel_residual_key": "use_parallel_residual",
                           "partial_rotary": True},
    # Phi-2: one LayerNorm feeds attention and MLP in parallel; partial rotary; LM head bias.
    "PhiForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                       "parallel_residual": True, "parallel_shared_norm": True,
                       "lm_head_bias": True, "partial_rotary": True},
    # Bloom: ALiBi instead of positions, a LayerNorm on the embeddings, per-head fused QKV.
    "BloomForCausalLM": {"norm_type": "layernorm", "gated_mlp": False, "bias": True,
                         "position_embedding": "alibi", "embedding_norm": True},
    # Falcon: parallel attention + MLP (one shared LayerNorm, or ln_attn / ln_mlp in the
    # new decoder architecture of 40B / 180B), multi-query or grouped KV (see _falcon).
    "FalconForCausalLM": {"norm_type": "layernorm", "gated_mlp": False,
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
# config.json model_type -> architecture (read where architectures names none kiln knows).
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM",
               "starcoder2": "Starcoder2ForCausalLM", "gpt2": "GPT2LMHeadModel",
               "gpt_neox": "GPTNeoXForCausalLM", "phi": "PhiForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "bloom": "BloomForCausalLM", "falcon": "FalconForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}
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
    def uniform_window(self) -> int | None:
        """The sliding window every layer shares (Mistral v0.1 style), else None."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return windows.pop() if len(windows) == 1 else None

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
        from kiln.checkpoint.hf_defaults import HF_DEFAULTS, token_ids  # (an import cycle)

        arch = _architecture(hf)
        flags = _LLAMA_FAMILY[arch]
        # A key config.json leaves out means what transformers' config class defaults it to.
        hf = {**HF_DEFAULTS.get(arch, {}),
              **{_HF_ALIASES[k]: v for k, v in hf.items() if k in _HF_ALIASES}, **hf}
        _refuse_unsupported(arch, hf)
        bias_key = flags.get("bias_key", "attention_bias")
        all_bias = bool(flags.get("bias", False))
        try:
            num_heads = _whole(hf, "num_attention_heads")
            hidden = _whole(hf, "hidden_size")
            head_dim = _whole(hf, "head_dim", hidden // num_heads)
            eos_ids, bos = token_ids(hf, "eos_token_id"), token_ids(hf, "bos_token_id")
            # transformers 5 moved rope_theta / rope_scaling into rope_parameters; Gemma 3
            # keeps one set per layer type there.
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            local_rope = rope.pop("sliding_attention", None)
            rope = dict(rope.pop("full_attention", None) or rope)
            rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
            partial = float(rope.pop("partial_rotary_factor",
                                     hf.get("partial_rotary_factor", 1.0)))
            partial = partial if flags.get("partial_rotary") else 1.0  # (as transformers)
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):  # as transformers
                rope_type = rope["rope_type"] = "longrope"  # (Phi-3's first 128k configs)
                rope.pop("type", None)
            if rope_type in ("llama3", "yarn", "longrope"):
                _default_original_context(rope, rope_type, hf, local_rope is not None)
            rope_scaling = rope if rope_type not in (None, "default") else None
            local_theta = (local_rope or {}).get("rope_theta", hf.get("rope_local_base_freq"))
            window = hf.get("use_sliding_window", True) and hf.get("sliding_window") or None
            window = window and _whole(hf, "sliding_window")  # (0 / null: no window)
            layers = _whole(hf, "num_hidden_layers")
            pattern = flags.get("layer_pattern")
            layer_types = tuple(hf.get("layer_types") or ())
            if pattern and not layer_types:
                pattern = int(hf.get("sliding_window_pattern")
                              or hf.get("_sliding_window_pattern") or pattern)
                layer_types = tuple("sliding_attention" if (i + 1) % pattern else
                                    "full_attention" for i in range(layers))
            if len(layer_types) not in (0, layers):  # (layers dropped from num_hidden_layers)
                raise CheckpointError(f"config.json field 'layer_types' lists {len(layer_types)} "
                                      f"layer type(s) for {layers} layers; it needs one per layer")
            layernorm = flags.get("norm_type") == "layernorm"
            scalar = hf.get("query_pre_attn_scalar") if flags.get("sandwich_norms") else None
            fields = dict(
                architecture=arch,
                vocab_size=_whole(hf, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_whole(hf, "intermediate_size", 4 * hidden),
                num_layers=layers,
                num_heads=num_heads,
                num_kv_heads=_whole(hf, "num_key_value_heads", num_heads),
                head_dim=head_dim,
                max_position_embeddings=_whole(hf, "max_position_embeddings", 4096),
                rms_norm_eps=float(hf.get("layer_norm_eps", 1e-5) if layernorm
                                   else hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=all_bias or bool(flags.get("qkv_bias", hf.get(bias_key, False))),
                o_bias=all_bias or (bool(hf.get(bias_key, False)) and not flags.get("qkv_bias")),
                mlp_bias=all_bias or bool(flags.get("mlp_bias")) or bool(hf.get(
                    "mlp_bias", hf.get(bias_key, False) if bias_key == "use_bias" else False)),
                qk_norm=bool(flags.get("qk_norm", False)),
                hidden_act=_activation(arch, hf),
                norm_weight_offset=float(flags.get("norm_weight_offset", 0.0)),
                scale_embeddings=bool(flags.get("scale_embeddings", False)),
                norm_type=str(flags.get("norm_type", "rmsnorm")),
                gated_mlp=bool(flags.get("gated_mlp", True)),
                bos_token_id=bos[0] if len(bos) == 1 else None,
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


def _default_original_context(rope: dict[str, Any], rope_type: str, hf: dict[str, Any],
                              per_layer_type: bool) -> None:
    """The pretraining context and factor of a llama3 / yarn / longrope block as
    transformers' standardize_rope_params and rope init fill them in: the top-level
    original_max_position_embeddings first (Phi-3 keeps it there; not for Gemma 3's rope
    per layer type), else the block's, else max_position_embeddings; a null yarn factor
    and a null or absent longrope one max_position_embeddings / that (DeepSeek-V3). A
    yarn block without the key is left so: transformers' validation refuses it (a
    KeyError), and so does check_rope_scaling."""
    positions = int(hf.get("max_position_embeddings", 4096))
    top = None if per_layer_type else hf.get("original_max_position_embeddings")
    original = int(top or rope.get("original_max_position_embeddings") or positions)
    rope["original_max_position_embeddings"] = original
    if (rope_type == "longrope" or rope_type == "yarn" and "factor" in rope) \
            and rope.get("factor") is None:
        rope["factor"] = positions / original


def _falcon(hf: dict[str, Any], num_heads: int) -> dict[str, Any]:
    """Falcon's KV heads, biases and norms: 7B is multi-query with one LayerNorm shared by
    attention and MLP; the new decoder architecture (40B, 180B) has grouped KV heads and
    two LayerNorms (ln_attn, ln_mlp) unless num_ln_in_parallel_attn is 1."""
    new_arch = bool(hf.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(hf.get("num_kv_heads") or num_heads)
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
    act = str(hf.get("hidden_activation") or hf.get("hidden_act") or "silu")
    # Gemma's releases say "gelu" but mean the tanh approximation (as transformers does).
    gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    return "gelu_pytorch_tanh" if gemma and act == "gelu" else act


def _architecture(hf: dict[str, Any]) -> str:
    """The first architecture config.json lists that kiln knows, else its model_type's (as
    transformers picks the class by model_type: ["LLaMAForCausalLM"] exports load)."""
    listed = hf.get("architectures") or []
    listed = [str(a) for a in (listed if isinstance(listed, list) else [listed])]
    arch = next((a for a in listed if a in _LLAMA_FAMILY), None)
    if arch is not None:
        return arch
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        if listed:
            log.warning("config.json lists architecture(s) %s, which kiln does not know; "
                        "reading it by its model_type %r as %s", ", ".join(listed),
                        model_type, MODEL_TYPES[model_type])
        return MODEL_TYPES[model_type]
    if listed:
        also = f" (model_type {model_type!r})" if model_type is not None else ""
        raise CheckpointError(f"unsupported architecture {', '.join(map(repr, listed))}{also}; "
                              "kiln supports: " + ", ".join(SUPPORTED_ARCHITECTURES))
    if model_type is None:
        raise CheckpointError('config.json names neither its architectures nor its model_type; '
                              'add the model\'s, e.g. "architectures": ["LlamaForCausalLM"]')
    raise CheckpointError(f"unsupported model_type {model_type!r} in config.json; kiln "
                          "supports the model types " + ", ".join(MODEL_TYPES))


def _whole(hf: dict[str, Any], key: str, fallback: int | None = None) -> int:
    """hf[key] as an int (absent or null: fallback; no fallback: a KeyError where absent),
    or a CheckpointError naming the field."""
    value = hf[key] if fallback is None else hf.get(key) or fallback
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1 or \
            isinstance(value, float) and not value.is_integer():
        raise CheckpointError(f"config.json field {key!r} is {json.dumps(value)}; it must be a "
                              "positive whole number")
    return int(value)
