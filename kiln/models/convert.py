"""Checkpoint layouts of GPT-era families onto the generic decoder's (Llama) names.

A family is a row: regex renames of its tensor names, the tensors to drop, whether its
2-D weights are stored [in, out] (GPT-2's Conv1D), and how its fused QKV rows are laid
out. `to_decoder_names` applies a row to one checkpoint tensor; the decoder then splits
fused Q/K/V as it does for every family.
"""

from __future__ import annotations

import re

import torch

from kiln.config import ModelConfig

_GPT2 = (
    (r"^(transformer\.)?wte\.", "model.embed_tokens."),
    (r"^(transformer\.)?wpe\.", "model.embed_positions."),
    (r"^(transformer\.)?ln_f\.", "model.norm."),
    (r"^(transformer\.)?h\.", "model.layers."),
    (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
    (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
)
_NEOX = (
    (r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
    (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
    (r"^gpt_neox\.layers\.", "model.layers."),
    (r"^embed_out\.", "lm_head."),
    (r"\.attention\.query_key_value\.", ".self_attn.qkv_proj."),
    (r"\.attention\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.c_fc."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.c_proj."),
)
_FUSED_MLP = (
    (r"\.self_attention\.query_key_value\.", ".self_attn.qkv_proj."),
    (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.c_fc."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.c_proj."),
    (r"^(transformer\.)?ln_f\.", "model.norm."),
    (r"^(transformer\.)?h\.", "model.layers."),
)
_BLOOM = (
    (r"^(transformer\.)?word_embeddings_layernorm\.", "model.embed_norm."),
    (r"^(transformer\.)?word_embeddings\.", "model.embed_tokens."),
    *_FUSED_MLP,
)
_FALCON = (
    (r"^(transformer\.)?word_embeddings\.", "model.embed_tokens."),
    (r"\.ln_attn\.", ".input_layernorm."),
    (r"\.ln_mlp\.", ".post_attention_layernorm."),
    *_FUSED_MLP,
)
_PHI = (
    (r"^model\.final_layernorm\.", "model.norm."),
    (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
)

RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "GPT2LMHeadModel": _GPT2, "GPTNeoXForCausalLM": _NEOX, "PhiForCausalLM": _PHI,
    "BloomForCausalLM": _BLOOM, "FalconForCausalLM": _FALCON,
    "MixtralForCausalLM": ((r"\.block_sparse_moe\.", ".mlp."),),
}
# Buffers some checkpoints carry (causal masks, rotary tables): recomputed, never loaded.
SKIP = re.compile(r"\.attn\.(masked_)?bias$|\.attention\.(masked_)?bias$|rotary_emb\.inv_freq$")
CONV1D = ("GPT2LMHeadModel",)  # Conv1D: weights stored [in, out]
# Fused QKV rows grouped per KV head: [kv_heads, group + 2, d] (group query heads, then
# K, then V): NeoX and Bloom per head ([heads, 3, d]); Falcon's MQA ([1, heads + 2, d]:
# all queries, then K, V) and its new architecture's groups.
QKV_GROUPED = ("GPTNeoXForCausalLM", "BloomForCausalLM", "FalconForCausalLM")


def to_decoder_names(cfg: ModelConfig, name: str, tensor: torch.Tensor
                     ) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor as (decoder name, tensor) pairs; [] for buffers to drop."""
    renames = RENAMES.get(cfg.architecture)
    if renames is None:
        return [(name, tensor)]
    if SKIP.search(name):
        return []
    if cfg.architecture in CONV1D and tensor.dim() == 2 and re.match(r"(transformer\.)?h\.",
                                                                      name):
        tensor = tensor.t()
    name = decoder_name(cfg, name)
    if cfg.architecture in QKV_GROUPED and ".self_attn.qkv_proj." in name:
        group = cfg.num_heads // cfg.num_kv_heads
        rest = tensor.shape[1:]
        grouped = tensor.reshape(cfg.num_kv_heads, group + 2, cfg.head_dim, *rest)
        return [(name.replace("qkv_proj", "q_proj"), grouped[:, :group].reshape(-1, *rest)),
                (name.replace("qkv_proj", "k_proj"), grouped[:, group].reshape(-1, *rest)),
                (name.replace("qkv_proj", "v_proj"), grouped[:, group + 1].reshape(-1, *rest))]
    return [(name, tensor)]


def decoder_name(cfg: ModelConfig, name: str) -> str:
    """A checkpoint tensor's name in the decoder's (Llama) naming."""
    for pattern, replacement in RENAMES.get(cfg.architecture, ()):
        name = re.sub(pattern, replacement, name)
    return name
