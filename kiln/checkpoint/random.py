"""Random-weight checkpoints of real architectures, for measuring speed without downloads.

Speed does not depend on weight values, so `kiln build --random-weights --config
llama-3.1-8b` gives an engine with the exact shapes of the real model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.checkpoint.base import Checkpoint
from kiln.config import ModelConfig
from kiln.errors import CheckpointError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama(**kw) -> dict:
    base = dict(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, bos_token_id=128000,
                eos_token_ids=(128001, 128009), vocab_size=128256, head_dim=128,
                rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                max_position_embeddings=131072)
    return {**base, **kw}


PRESETS: dict[str, dict] = {
    "llama-3.1-8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8),
    "llama-3.1-70b": _llama(hidden_size=8192, intermediate_size=28672, num_layers=80,
                            num_heads=64, num_kv_heads=8),
    # 810 GB in bf16, 405 GB in FP8: build it with --load-format dummy (no disk holds it)
    "llama-3.1-405b": _llama(hidden_size=16384, intermediate_size=53248, num_layers=126,
                             num_heads=128, num_kv_heads=8),
    "llama-3.2-1b": _llama(hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                           rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.2-3b": _llama(hidden_size=3072, intermediate_size=8192, num_layers=28,
                           num_heads=24, num_kv_heads=8, tie_word_embeddings=True,
                           rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "qwen2.5-7b": dict(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, qkv_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, eos_token_ids=(151645,)),
    "qwen3-8b": dict(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, qk_norm=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, eos_token_ids=(151645,)),
    "mistral-7b": dict(architecture="MistralForCausalLM", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=32768, eos_token_ids=(2,)),
    "gemma-2-9b": dict(architecture="Gemma2ForCausalLM", vocab_size=256000, hidden_size=3584,
                       intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8,
                       head_dim=256, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0,
                       scale_embeddings=True, sandwich_norms=True, attn_scale=256 ** -0.5,
                       attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
                       layer_types=("sliding_attention", "full_attention") * 21,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=8192,
                       bos_token_id=2, eos_token_ids=(1, 107)),
    "phi-2": dict(architecture="PhiForCausalLM", vocab_size=51200, hidden_size=2560,
                  intermediate_size=10240, num_layers=32, num_heads=32, num_kv_heads=32,
                  head_dim=80, partial_rotary_factor=0.4, norm_type="layernorm",
                  rms_norm_eps=1e-5, hidden_act="gelu_new", gated_mlp=False, qkv_bias=True,
                  o_bias=True, mlp_bias=True, parallel_residual=True,
                  parallel_shared_norm=True, lm_head_bias=True, max_position_embeddings=2048,
                  eos_token_ids=(50256,)),
    "mixtral-8x7b": dict(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=14336, norm_topk_prob=True,
                         moe_layers=tuple(range(32)), rope_theta=1000000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,)),
    "falcon-7b": dict(architecture="FalconForCausalLM", vocab_size=65024, hidden_size=4544,
                      intermediate_size=18176, num_layers=32, num_heads=71, num_kv_heads=1,
                      head_dim=64, norm_type="layernorm", rms_norm_eps=1e-5, hidden_act="gelu",
                      gated_mlp=False, parallel_residual=True, parallel_shared_norm=True,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=11, eos_token_ids=(11,)),
    "bloom-7b1": dict(architecture="BloomForCausalLM", vocab_size=250880, hidden_size=4096,
                      intermediate_size=16384, num_layers=30, num_heads=32, num_kv_heads=32,
                      head_dim=128, norm_type="layernorm", rms_norm_eps=1e-5,
                      hidden_act="gelu_pytorch_tanh", gated_mlp=False, qkv_bias=True,
                      o_bias=True, mlp_bias=True, position_embedding="alibi",
                      embedding_norm=True, tie_word_embeddings=True,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": dict(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         eos_token_ids=(2,)),
}


# Architectures whose HF tensor names _shapes writes out; the others take kiln's own
# parameter names, which the decoder's loaders accept as well.
_LLAMA_LAYOUT = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM")  # (and dense: an MoE config takes the model's names)


def _model_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter an engine of `cfg` stores (the model is built on
    the meta device: no memory)."""
    from kiln.distributed import Mapping
    from kiln.models import create_model

    model = create_model(cfg, Mapping(), 16, device="meta")
    return [(name, tuple(t.shape)) for name, t in model.engine_state_dict().items()]


class RandomCheckpoint(Checkpoint):
    """Normal(0, 0.02) weights (norms at 1) under HF names, for a preset or a ModelConfig."""

    synthetic_values = True

    def __init__(self, config: str | ModelConfig, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        if isinstance(config, str):
            if config not in PRESETS:
                raise CheckpointError(f"unknown --config {config!r}; presets: "
                                      + ", ".join(PRESETS))
            self.name = config
            config = ModelConfig(**PRESETS[config])
        else:
            self.name = config.architecture
        self.config = config
        self.source = Path(f"random:{self.name}")
        self.seed = seed
        self.dtype = dtype

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        if c.architecture not in _LLAMA_LAYOUT or c.num_experts:
            return _model_shapes(c)
        h, kv = c.hidden_size, c.kv_size
        shapes = [("model.embed_tokens.weight", (c.vocab_size, h)), ("model.norm.weight", (h,))]
        if not c.tie_word_embeddings:
            shapes.append(("lm_head.weight", (c.vocab_size, h)))
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes += [(p + "input_layernorm.weight", (h,)),
                       (p + "post_attention_layernorm.weight", (h,)),
                       (p + "self_attn.q_proj.weight", (c.q_size, h)),
                       (p + "self_attn.k_proj.weight", (kv, h)),
                       (p + "self_attn.v_proj.weight", (kv, h)),
                       (p + "self_attn.o_proj.weight", (h, c.q_size)),
                       (p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                       (p + "mlp.up_proj.weight", (c.intermediate_size, h)),
                       (p + "mlp.down_proj.weight", (h, c.intermediate_size))]
            if c.qkv_bias:
                shapes += [(p + "self_attn.q_proj.bias", (c.q_size,)),
                           (p + "self_attn.k_proj.bias", (kv,)),
                           (p + "self_attn.v_proj.bias", (kv,))]
            if c.qk_norm:
                shapes += [(p + "self_attn.q_norm.weight", (c.head_dim,)),
                           (p + "self_attn.k_norm.weight", (c.head_dim,))]
        return shapes

    def num_tensors(self) -> int:
        return len(self._shapes())

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Drawing billions of normals is ~50x faster on a GPU than on the CPU.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device).manual_seed(self.seed)
        for name, shape in self._shapes():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=self.dtype)
            else:
                weight = torch.empty(shape, dtype=self.dtype, device=device)
                yield name, weight.normal_(0, 0.02, generator=generator).cpu()

    synthetic_tokenizer = True  # word-level, mostly <unk> for real prose

    def write_tokenizer(self, dest: Path) -> bool:
        """A word-level tokenizer over the whole vocabulary (text in and out of servers)."""
        from kiln.checkpoint.word_tokenizer import write_word_tokenizer

        c = self.config
        write_word_tokenizer(dest, c.vocab_size, c.bos_token_id, tuple(c.eos_token_ids or ()))
        return True

    def fingerprint(self) -> str:
        key = json.dumps([self.config.to_dict(), self.seed, "word-tokenizer"], sort_keys=True,
                         default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]
