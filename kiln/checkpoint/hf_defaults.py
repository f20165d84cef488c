"""What transformers' config classes assume for a key config.json leaves out, per
architecture, for the keys ModelConfig.from_hf reads (older and hand-written exports omit
keys whose class default was right for them: google/gemma-2-2b has no tie_word_embeddings).

Keys are the names from_hf reads (after its GPT-era aliases). Where a key is not listed,
from_hf's own fallback applies, which is what every class here that has the key defaults it to:
rope_theta 10000, partial_rotary_factor 1, no tied embeddings, no biases, SiLU, RMSNorm eps
1e-6 (LayerNorm eps 1e-5), no sliding window, no BOS / EOS, 4096 positions, num_key_value_heads
= num_attention_heads, head_dim = hidden_size / num_attention_heads, intermediate_size = 4 x
hidden_size. tests/test_hf_layouts_qa44.py compares the result with the installed
transformers' config classes, architecture by architecture.
"""

from __future__ import annotations

from typing import Any

_GEMMA = dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", bos_token_id=2,
              eos_token_id=1, head_dim=256)
_GEMMA2 = dict(_GEMMA, num_key_value_heads=4, intermediate_size=9216, sliding_window=4096,
               query_pre_attn_scalar=256)
_QWEN = dict(max_position_embeddings=32768, use_sliding_window=False, max_window_layers=28)

HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(max_position_embeddings=2048, intermediate_size=11008,
                             bos_token_id=1, eos_token_id=2),
    "MistralForCausalLM": dict(max_position_embeddings=131072, intermediate_size=14336,
                               num_key_value_heads=8, sliding_window=4096, bos_token_id=1,
                               eos_token_id=2),
    "Qwen2ForCausalLM": dict(_QWEN, intermediate_size=22016, num_key_value_heads=32),
    "Qwen3ForCausalLM": dict(_QWEN, intermediate_size=22016, num_key_value_heads=32,
                             head_dim=128),
    "GemmaForCausalLM": dict(_GEMMA, max_position_embeddings=8192, intermediate_size=24576,
                             num_key_value_heads=16),
    "Phi3ForCausalLM": dict(rms_norm_eps=1e-5, intermediate_size=8192, bos_token_id=1,
                            eos_token_id=32000, original_max_position_embeddings=4096),
    "Starcoder2ForCausalLM": dict(tie_word_embeddings=True, use_bias=True,
                                  hidden_act="gelu_pytorch_tanh", intermediate_size=12288,
                                  num_key_value_heads=2, bos_token_id=50256,
                                  eos_token_id=50256),
    "GPT2LMHeadModel": dict(max_position_embeddings=1024, tie_word_embeddings=True,
                            hidden_act="gelu_new", bos_token_id=50256, eos_token_id=50256),
    "GPTNeoXForCausalLM": dict(max_position_embeddings=2048, partial_rotary_factor=0.25,
                               hidden_act="gelu", intermediate_size=24576, bos_token_id=0,
                               eos_token_id=2, attention_bias=True),
    "PhiForCausalLM": dict(max_position_embeddings=2048, partial_rotary_factor=0.5,
                           hidden_act="gelu_new", intermediate_size=8192, bos_token_id=1,
                           eos_token_id=2),
    "BloomForCausalLM": dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                             bos_token_id=1, eos_token_id=2),
    "FalconForCausalLM": dict(max_position_embeddings=2048, tie_word_embeddings=True,
                              hidden_act="gelu", bos_token_id=11, eos_token_id=11),
    "MixtralForCausalLM": dict(max_position_embeddings=131072, rms_norm_eps=1e-5,
                               rope_theta=1e6, intermediate_size=14336, num_key_value_heads=8,
                               num_local_experts=8, num_experts_per_tok=2, bos_token_id=1,
                               eos_token_id=2),
    "Qwen2MoeForCausalLM": dict(_QWEN, intermediate_size=5632, num_key_value_heads=16,
                                num_experts=60, num_experts_per_tok=4,
                                moe_intermediate_size=1408,
                                shared_expert_intermediate_size=5632),
    "Qwen3MoeForCausalLM": dict(_QWEN, intermediate_size=6144, num_key_value_heads=4,
                                num_experts=128, num_experts_per_tok=8,
                                moe_intermediate_size=768),
    "Gemma2ForCausalLM": dict(_GEMMA2, max_position_embeddings=8192,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "Gemma3ForCausalLM": dict(_GEMMA2, max_position_embeddings=131072, rope_theta=1e6,
                              rope_local_base_freq=10000.0),
}


def token_ids(fields: dict[str, Any], key: str, where: str = "config.json") -> tuple[int, ...]:
    """fields[key] as token ids: one id, a list of them, or none (absent or null; a
    negative id, which some exports write for none, is left out); a CheckpointError naming
    the field where it holds anything else (a token's text: the engine compares ids, and
    "2" is no id)."""
    from kiln.errors import CheckpointError

    value = fields.get(key)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{where} field {key!r} is {value!r}; it must be a token id (a "
                              "whole number), a list of them, or null")
    return tuple(i for i in ids if i >= 0)
