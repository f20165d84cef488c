"""The generic decoder: Llama, Mistral, Qwen2 (QKV bias), Qwen3 (QK norm) by config flags."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_reduce
from kiln.layers import (
    Attention,
    GatedMLP,
    LMHead,
    PlainMLP,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
    RowLinear,
    VocabEmbedding,
    make_norm,
)
from kiln.layers.linear import default_weight_loader
from kiln.layers.norm import reduce_add_norm

# HF projection name -> (fused kiln parameter, shard id).
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int) -> None:
        super().__init__()
        tp = mapping.tp_size
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = cfg.num_kv_heads // tp
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                  cfg.head_dim, cfg.qkv_bias, mapping)
        self.o_proj = RowLinear(cfg.q_size, cfg.hidden_size, cfg.o_bias, mapping)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                      cfg.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim,
                              cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            tokens = q.shape[0]
            q = self.q_norm(q.reshape(tokens, -1, self.head_dim)).view(tokens, -1)
            k = self.k_norm(k.reshape(tokens, -1, self.head_dim)).view(tokens, -1)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary.cos_sin))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, mapping, max_positions)
        self.post_attention_layernorm = make_norm(cfg.norm_type, cfg.hidden_size,
                                                  cfg.rms_norm_eps)
        mlp = GatedMLP if cfg.gated_mlp else PlainMLP
        self.mlp = mlp(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, mapping,
                       cfg.hidden_act)
        self.tp_size = mapping.tp_size
        # With TP, the O and down projections hand their partial sums to the next norm,
        # which all-reduces them fused with the residual add (one kernel instead of two).
        self.defer_reduce = (mapping.tp_size > 1 and cfg.norm_type != "layernorm"
                             and not cfg.o_bias and not cfg.mlp_bias)
        self.self_attn.o_proj.defer_reduce = self.defer_reduce
        self.mlp.output_projection().defer_reduce = self.defer_reduce

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, partial: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`partial`: hidden is still a TP partial sum (the previous layer deferred its
        reduce); the returned hidden is one when this layer defers."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = reduce_add_norm(self.input_layernorm, hidden, residual,
                                               self.tp_size, partial)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = reduce_add_norm(self.post_attention_layernorm, hidden, residual,
                                           self.tp_size, self.defer_reduce)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, mapping)
        # A ModuleDict keyed by global layer index keeps HF names on every pipeline stage.
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, mapping, max_positions)
            for i in mapping.pp_layers(cfg.num_layers)
        })
        self.norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """forward(input_ids, positions) -> hidden [T, H]; compute_logits(hidden) -> float32."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping | None = None,
                 max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.mapping = mapping or Mapping()
        self.model = DecoderBody(cfg, self.mapping, max_positions or cfg.max_position_embeddings)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.mapping)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states; a pipeline stage before the last takes the previous
        stage's (hidden, residual) as `intermediate` (none on the first) and returns its own."""
        if intermediate is None:
            hidden, residual = self.model.embed_tokens(input_ids), None
            if self.config.scale_embeddings:  # in the model dtype, as transformers does
                hidden = hidden * torch.tensor(self.config.hidden_size ** 0.5,
                                               dtype=hidden.dtype)
        else:
            hidden, residual = intermediate
        partial = False
        for layer in self.model.layers.values():
            hidden, residual = layer(positions, hidden, residual, partial)
            partial = layer.defer_reduce
        if not self.mapping.is_last_pp_rank:
            if partial:
                hidden = tp_all_reduce(hidden, self.mapping.tp_size)
            return hidden, residual
        hidden, _ = reduce_add_norm(self.model.norm, hidden, residual, self.mapping.tp_size,
                                    partial)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers.values()]

    # ---- building -------------------------------------------------------------------
    def weight_target(self, hf_name: str) -> tuple[str, object] | None:
        """Map an HF tensor name to (kiln parameter name, shard id); None to skip it."""
        if self.config.tie_word_embeddings and hf_name == "lm_head.weight":
            return None
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        parts = hf_name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and \
                int(parts[2]) not in self.mapping.pp_layers(self.config.num_layers):
            return None
        for hf_proj, (fused, shard) in FUSED_PROJECTIONS.items():
            if f".{hf_proj}." in hf_name:
                return hf_name.replace(hf_proj, fused), shard
        if hf_name.endswith(("self_attn.k_scale", "self_attn.v_scale")):  # KV-cache scales
            return hf_name.replace("self_attn.", "self_attn.attn."), None
        return hf_name, None

    def split_fused(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A checkpoint tensor in the per-projection naming the loaders take: fused Q/K/V
        and gate/up (Phi-3) split, a norm offset (Gemma's 1 + w) folded into the weight."""
        cfg = self.config
        if cfg.norm_weight_offset and hf_name.endswith("norm.weight"):
            return [(hf_name, tensor.float() + cfg.norm_weight_offset)]
        for fused, parts, sizes in (
                ("self_attn.qkv_proj.", ("q_proj", "k_proj", "v_proj"),
                 [cfg.q_size, cfg.kv_size, cfg.kv_size]),
                ("mlp.gate_up_proj.", ("gate_proj", "up_proj"), [cfg.intermediate_size] * 2)):
            if fused not in hf_name:
                continue
            if tensor.numel() == 1:  # a per-tensor scale applies to every part
                pieces = [tensor] * len(parts)
            else:
                pieces = tensor.split(sizes, dim=0)
            name = fused.split(".")[1]
            return [(hf_name.replace(name, part), piece) for part, piece in zip(parts, pieces)]
        return [(hf_name, tensor)]

    def loader_for(self, param: nn.Parameter) -> Callable[..., None]:
        return getattr(param, "weight_loader", default_weight_loader)

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """What goes into rank{r}.safetensors: tied weights stored once."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state
