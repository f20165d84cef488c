"""The generic decoder: every dense family kiln runs, by config flags.

Llama, Mistral, Qwen2 (QKV bias), Qwen3 (QK norm), Gemma 1/2/3 ((1 + w) norms, sandwich
norms, soft-capping, sliding layers), Phi-2/3, StarCoder2, GPT-2 (learned positions),
GPT-NeoX (parallel residual, partial rotary), Bloom (ALiBi, embedding norm), Falcon
(parallel attention, multi-query); kiln.models.convert maps GPT-era tensor names onto
the Llama names used here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_reduce
from kiln.kernels.reference import alibi_slopes
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
from kiln.layers.moe import SparseMoE
from kiln.layers.norm import reduce_add_norm
from kiln.models.convert import to_decoder_names

# One expert's projection: HF (Qwen MoE) or Mixtral (w1 gate, w3 up, w2 down) names; the
# weight, or an FP8 checkpoint's weight / input scale.
EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)"
                    r"\.(weight|weight_scale|input_scale)$")
EXPERT_SHARD = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1),
                "w3": ("w13", 1), "down_proj": ("w2", None), "w2": ("w2", None)}
# HF projection name -> (fused kiln parameter, shard id).
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int,
                 layer: int = 0, rotary_tables: dict | None = None) -> None:
        super().__init__()
        tp = mapping.tp_size
        self.num_heads = cfg.num_heads // tp
        # fewer KV heads than ranks: one replicated KV head a rank (QKVLinear)
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                  cfg.head_dim, cfg.qkv_bias, mapping)
        self.o_proj = RowLinear(cfg.q_size, cfg.hidden_size, cfg.o_bias, mapping)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        window = cfg.layer_window(layer)
        if window is not None and cfg.rope_local_theta is not None:  # Gemma 3 local layers
            theta, scaling = cfg.rope_local_theta, None
        else:
            theta, scaling = cfg.rope_theta, cfg.rope_scaling
        self.rotary = RotaryEmbedding(cfg.rotary_dim, max_positions, theta, scaling,
                                      shared=rotary_tables)
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        # A window as long as every context the engine can hold is global attention.
        window = window if window is not None and window < max_positions else None
        slopes = None
        if cfg.position_embedding == "alibi":  # this rank's heads
            first = mapping.tp_rank * self.num_heads
            slopes = alibi_slopes(cfg.num_heads)[first:first + self.num_heads].contiguous()
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, cfg.head_dim, scale, window,
            cfg.attn_logit_softcap, slopes,
            kv_head_start=mapping.tp_rank // self.qkv_proj.kv_replicas * self.num_kv_heads,
            total_kv_heads=cfg.num_kv_heads)

    def input_quant(self) -> object:
        return self.qkv_proj.input_quant()

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.q_norm is None:  # decode rows on Hopper (KILN_SWAP_ROPE): one launch
            q = self.attn.fused_qkv(self.qkv_proj, x, positions, self.rotary.cos_sin)
            if q is not None:
                return self.o_proj(self.attn.attend_rotated(q, self.rotary.cos_sin))
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            tokens = q.shape[0]
            q = self.q_norm(q.reshape(tokens, -1, self.head_dim)).view(tokens, -1)
            k = self.k_norm(k.reshape(tokens, -1, self.head_dim)).view(tokens, -1)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary.cos_sin))


class DecoderLayer(nn.Module):
    """Pre-norm layer. Activations travel as (hidden, residual) with hidden + residual the
    layer input, so each norm fuses the residual add. Variants by flag: parallel
    residual (x + attn(n1(x)) + mlp(n2(x)), n2 = n1 when shared) and sandwich norms
    (a norm on the attention and MLP outputs too)."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int,
                 layer: int = 0, rotary_tables: dict | None = None) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.input_layernorm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, mapping, max_positions, layer, rotary_tables)
        if not (cfg.parallel_residual and cfg.parallel_shared_norm):
            self.post_attention_layernorm = make_norm(cfg.norm_type, cfg.hidden_size,
                                                      cfg.rms_norm_eps)
        if cfg.sandwich_norms:  # HF: post_attention_layernorm normalises attention's output
            self.pre_feedforward_layernorm = make_norm(cfg.norm_type, cfg.hidden_size,
                                                       cfg.rms_norm_eps)
            self.post_feedforward_layernorm = make_norm(cfg.norm_type, cfg.hidden_size,
                                                        cfg.rms_norm_eps)
        self.sandwich = cfg.sandwich_norms
        moe = layer in cfg.moe_layers
        if moe:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                 cfg.moe_intermediate_size, cfg.norm_topk_prob, mapping,
                                 cfg.shared_expert_intermediate_size)
        else:
            mlp = GatedMLP if cfg.gated_mlp else PlainMLP
            self.mlp = mlp(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, mapping,
                           cfg.hidden_act)
        self.tp_size = mapping.tp_size
        # With TP, the O and down projections hand their partial sums to the next norm,
        # which all-reduces them fused with the residual add (one kernel instead of two).
        # Only the plain pre-norm layer does: parallel residual, sandwich norms and MoE
        # outputs are reduced where they are made.
        self.defer_reduce = (mapping.tp_size > 1 and cfg.norm_type != "layernorm"
                             and not cfg.o_bias and not cfg.mlp_bias and not self.parallel
                             and not self.sandwich and not moe)
        self.self_attn.o_proj.defer_reduce = self.defer_reduce
        if self.defer_reduce:
            self.mlp.output_projection().defer_reduce = True

    def norm_feeds(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """(norm, names within this layer of the linear layers that take the norm's output
        and nothing else): where a per-input-channel scale of those linear layers can be
        folded into the norm (SmoothQuant, AWQ). The MLP's norm is pre_feedforward_layernorm
        with sandwich norms (post_attention_layernorm then normalises attention's output);
        a norm shared by attention and MLP (Phi-2, Falcon-7B) feeds both, so one scale
        must serve both; an MoE layer's router also takes its norm's output: none there."""
        first = next((f"mlp.{n}" for n in ("gate_up_proj", "c_fc") if hasattr(self.mlp, n)),
                     None)
        if not hasattr(self, "post_attention_layernorm"):  # parallel, shared norm
            return [(self.input_layernorm, ("self_attn.qkv_proj", first))] if first else []
        feeds = [(self.input_layernorm, ("self_attn.qkv_proj",))]
        if first is not None:
            norm = self.pre_feedforward_layernorm if self.sandwich \
                else self.post_attention_layernorm
            feeds.append((norm, (first,)))
        return feeds

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, partial: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`partial`: hidden is still a TP partial sum (the previous layer deferred its
        reduce); the returned hidden is one when this layer defers."""
        if self.parallel:
            if partial:
                hidden = tp_all_reduce(hidden, self.tp_size)
            residual = hidden if residual is None else hidden + residual
            normed = self.input_layernorm(residual)
            mlp_in = getattr(self, "post_attention_layernorm", None)
            mlp_in = normed if mlp_in is None else mlp_in(residual)
            return self.self_attn(positions, normed) + self.mlp(mlp_in), residual
        # An FP8 linear after a norm gets its input quantized by the norm (on a GPU).
        attn_quant = self.self_attn.input_quant()
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden, None, attn_quant)
        else:
            hidden, residual = reduce_add_norm(self.input_layernorm, hidden, residual,
                                               self.tp_size, partial, attn_quant)
        hidden = self.self_attn(positions, hidden)
        if self.sandwich:
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        mlp_quant = getattr(self.mlp, "input_quant", lambda: None)()  # none for MoE
        hidden, residual = reduce_add_norm(self.post_attention_layernorm, hidden, residual,
                                           self.tp_size, self.defer_reduce, mlp_quant)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, mapping)
        if cfg.position_embedding == "learned":  # GPT-2
            self.embed_positions = VocabEmbedding(cfg.max_position_embeddings,
                                                  cfg.hidden_size, mapping)
        if cfg.embedding_norm:  # Bloom
            self.embed_norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)
        # A ModuleDict keyed by global layer index keeps HF names on every pipeline stage;
        # layers with the same rotary share its table.
        rotary_tables: dict = {}
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, mapping, max_positions, i, rotary_tables)
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
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.mapping, cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states; a pipeline stage before the last takes the previous
        stage's (hidden, residual) as `intermediate` (none on the first) and returns its own."""
        hidden, residual = self.embed(input_ids, positions) if intermediate is None \
            else intermediate
        partial = False
        for layer in self.model.layers.values():
            hidden, residual = layer(positions, hidden, residual, partial)
            partial = layer.defer_reduce
        return self.finish(hidden, residual, partial)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, None]:
        """The first layer's input (hidden, residual = None) on the first pipeline stage."""
        hidden = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # in the model dtype, as transformers does
            hidden = hidden * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden.dtype)
        if self.config.position_embedding == "learned":
            hidden = hidden + self.model.embed_positions(positions)
        if self.config.embedding_norm:
            hidden = self.model.embed_norm(hidden)
        return hidden, None

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor, partial: bool
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """After the last layer: the final norm's output, or on a pipeline stage before the
        last the (hidden, residual) it sends on (partial: hidden is a TP partial sum)."""
        if not self.mapping.is_last_pp_rank:
            if partial:
                hidden = tp_all_reduce(hidden, self.mapping.tp_size)
            return hidden, residual
        hidden, _ = reduce_add_norm(self.model.norm, hidden, residual, self.mapping.tp_size,
                                    partial)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """float32 logits; out: a float32 [rows, vocab] buffer to write them into (the
        same kernels: the conversion to float32 becomes the copy into it)."""
        logits = self.lm_head(hidden)
        logits = logits.float() if out is None else out.copy_(logits)
        cap = self.config.final_logit_softcap
        if cap is None:
            return logits
        if out is None:
            return torch.tanh(logits / cap) * cap
        return torch.tanh(logits.div_(cap), out=logits).mul_(cap)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers.values()]

    # ---- building -------------------------------------------------------------------
    def weight_target(self, hf_name: str) -> tuple[str, object] | None:
        """Map an HF tensor name to (kiln parameter name, shard id); None to skip it."""
        if self.config.tie_word_embeddings and hf_name == "lm_head.weight" and \
                self.lm_head.weight is getattr(self.model.embed_tokens, "weight", None):
            return None  # (a GGUF file's kept head has its own weight: loaded)
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        parts = hf_name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and \
                int(parts[2]) not in self.mapping.pp_layers(self.config.num_layers):
            return None
        expert = EXPERT.match(hf_name)
        if expert:
            prefix, index, proj, what = expert.groups()
            if what == "input_scale":  # FP8 experts quantize their inputs per token
                return None
            param, half = EXPERT_SHARD[proj]
            param += "_scale" if what == "weight_scale" else ""
            return f"{prefix}.{param}", (int(index), half) if half is not None else int(index)
        for hf_proj, (fused, shard) in FUSED_PROJECTIONS.items():
            if f".{hf_proj}." in hf_name:
                return hf_name.replace(hf_proj, fused), shard
        if hf_name.endswith(("self_attn.k_scale", "self_attn.v_scale")):  # KV-cache scales
            return hf_name.replace("self_attn.", "self_attn.attn."), None
        return hf_name, None

    def split_fused(self, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A checkpoint tensor in the per-projection naming the loaders take: fused Q/K/V
        and gate/up (Phi-3) split, a norm offset (Gemma's 1 + w) folded into the weight."""
        return [pair for name, t in to_decoder_names(self.config, hf_name, tensor)
                for pair in self._split_decoder_tensor(name, t)]

    def _split_decoder_tensor(self, hf_name: str, tensor: torch.Tensor
                              ) -> list[tuple[str, torch.Tensor]]:
        cfg = self.config
        stacked = re.match(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$",
                           hf_name)
        if stacked and tensor.dim() == 3:  # GGUF: each projection of every expert [E, ...]
            base, proj = stacked.groups()
            return [(f"{base}.{e}.{proj}.weight", expert) for e, expert in enumerate(tensor)]
        if hf_name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
            return [(hf_name, tensor[None])]  # GGUF keeps the [1, H] gate as [H]
        if hf_name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.w13",
                             "mlp.experts.down_proj", "mlp.experts.w2")):
            # All experts in one tensor (transformers 5, or kiln's own layout): per expert.
            base = hf_name.rsplit(".", 1)[0]
            if hf_name.endswith(("gate_up_proj", "w13")):
                return [(f"{base}.{e}.{proj}.weight", part)
                        for e, expert in enumerate(tensor)
                        for proj, part in zip(("gate_proj", "up_proj"), expert.chunk(2))]
            return [(f"{base}.{e}.down_proj.weight", expert) for e, expert in enumerate(tensor)]
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
        """What goes into rank{r}.safetensors: tied weights stored once (a quantized LM
        head is its own)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings and \
                self.lm_head.weight is getattr(self.model.embed_tokens, "weight", None):
            state.pop("lm_head.weight", None)
        return state
