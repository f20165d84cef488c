"""A HuggingFace transformers model with an engine's exact weights, for side-by-side runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kiln.build.engine_dir import load_engine_config, rank_file
from kiln.config import ModelConfig
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine

_HF_CONFIG = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
              "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
              "MixtralForCausalLM": "MixtralConfig", "Gemma2ForCausalLM": "Gemma2Config"}


def hf_config(cfg: ModelConfig):
    import transformers

    if cfg.architecture not in _HF_CONFIG:
        from kiln.errors import KilnError

        raise KilnError(f"the transformers comparison supports {', '.join(_HF_CONFIG)}, "
                        f"not {cfg.architecture}")
    config_cls = getattr(transformers, _HF_CONFIG[cfg.architecture])
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
    )
    if cfg.architecture == "LlamaForCausalLM":
        kwargs.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    if cfg.architecture == "MixtralForCausalLM":
        kwargs.update(num_local_experts=cfg.num_experts, sliding_window=None,
                      num_experts_per_tok=cfg.num_experts_per_tok,
                      intermediate_size=cfg.moe_intermediate_size)
    if cfg.architecture == "Gemma2ForCausalLM":
        kwargs.update(hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window,
                      layer_types=list(cfg.layer_types),
                      query_pre_attn_scalar=round((cfg.attn_scale or cfg.head_dim ** -0.5)
                                                  ** -2),
                      attn_logit_softcapping=cfg.attn_logit_softcap,
                      final_logit_softcapping=cfg.final_logit_softcap)
    return config_cls(**kwargs)


def unfused_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Split kiln's fused qkv_proj / gate_up_proj back into HF's separate projections;
    experts as transformers 5 holds them ([E, 2I, H] gate_up_proj, [E, H, I] down_proj);
    a folded norm offset (Gemma's 1 + w) taken back out."""
    out = {}
    for name, tensor in state.items():
        if cfg.norm_weight_offset and name.endswith("norm.weight"):
            out[name] = (tensor.float() - cfg.norm_weight_offset).to(tensor.dtype)
        elif name.endswith(".mlp.experts.w13"):
            out[name.replace("w13", "gate_up_proj")] = tensor
        elif name.endswith(".mlp.experts.w2"):
            out[name.replace("w2", "down_proj")] = tensor
        elif ".qkv_proj." in name:
            q, k, v = tensor.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = t
        elif ".gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = tensor
    return out


def dequantized_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype
                           ) -> dict[str, torch.Tensor]:
    """FP8 weights (linear [N, K] with scales [N], experts [E, N, K] with [E, N]) and
    integer ones (scales [N] or [N, groups], offsets) dequantized in `dtype`; scale and
    offset tensors dropped (transformers then runs the float model the quantized one
    approximates)."""
    out = {}
    for name, tensor in state.items():
        if _is_scale(name):
            continue
        out[name] = _dequantized(tensor, state.get(name + "_scale"), dtype,
                                 state.get(name + "_offset"))
    return out


def _is_scale(name: str) -> bool:
    return name.endswith(("_scale", ".k_scale", ".v_scale", ".weight_offset"))


def _dequantized(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
    if scale is not None and tensor.dtype == torch.float8_e4m3fn:  # a scale per row
        return (tensor.float() * scale.float().unsqueeze(-1)).to(dtype)
    if scale is not None and tensor.dtype in (torch.int8, torch.uint8):  # kiln's storage
        from kiln.kernels.reference import dequantize_int_weight

        groups = scale.float() if scale.dim() == 2 else scale.float().view(-1, 1)
        return dequantize_int_weight(tensor, groups, offset).to(dtype)
    return tensor


@torch.no_grad()
def hf_model_from_engine(engine_dir: str | Path, device: str | torch.device = "cpu"):
    """transformers model (eval, engine dtype, on device) holding the engine's rank-0 weights
    (dequantized: a quantized engine is compared with the float model it approximates).
    The weights are copied in one tensor at a time, so the device needs room for the
    model and its largest tensor, not two copies of the model (Mixtral-8x7B: 93 GB)."""
    import transformers
    from safetensors import safe_open

    engine = load_engine_config(engine_dir)
    if engine.build.tp_size * engine.build.pp_size != 1:
        raise ValueError("the transformers comparison needs a single-rank engine")
    if engine.build.load_format == "dummy":
        raise KilnError(f"{engine_dir} stores no weights (--load-format dummy): transformers "
                        "has nothing to load; build it without --load-format dummy to compare")
    cfg = engine.model
    dtype = getattr(torch, engine.build.dtype)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
    targets = model.state_dict()
    loaded, unexpected = set(), []
    with safe_open(str(rank_file(Path(engine_dir), 0)), framework="pt",
                   device=str(device)) as f:
        names = set(f.keys())
        # a kept GGUF head holds the tied embedding (VocabEmbedding.look_up_in)
        read_head = cfg.tie_word_embeddings and "model.embed_tokens.weight" not in names
        for name in sorted(names):
            if _is_scale(name):
                continue
            scale, offset = (f.get_tensor(name + suffix) if name + suffix in names else None
                             for suffix in ("_scale", "_offset"))
            tensor = _dequantized(f.get_tensor(name), scale, dtype, offset)
            if read_head and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            for hf_name, part in unfused_state_dict(cfg, {name: tensor}).items():
                if hf_name not in targets or targets[hf_name].shape != part.shape:
                    unexpected.append(hf_name)
                    continue
                targets[hf_name].copy_(part)
                loaded.add(hf_name)
            del tensor, scale
    missing = [m for m in targets if m not in loaded and m != "lm_head.weight"
               and not m.endswith(("inv_freq", "original_inv_freq"))]
    if unexpected or missing:
        raise ValueError(f"weights do not fit transformers: {missing[:3]} {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def release_device_memory(engine: LLMEngine) -> None:
    """Give the measured engine's weights, KV pool and CUDA graphs back to the GPU, so that
    transformers can load the same weights next (Mixtral-8x7B fits an H200 only once)."""
    runner = engine.runner
    runner.graphs = runner.prefill_graphs = runner.piecewise = None
    runner.kv_cache = None
    for layer in runner.model.attention_layers():
        layer.k_cache = layer.v_cache = torch.empty(0)
    runner.model.to("meta")
    torch.cuda.empty_cache()


def run_hf(engine: LLMEngine, prompts: list[list[int]], output_len: int,
           batch: int) -> dict[str, Any]:
    """transformers `generate` (greedy, every output to output_len) on the engine's weights
    and prompts, `batch` prompts at a time, after the engine's memory is given back."""
    if engine.device.type == "cuda":
        release_device_memory(engine)
    model = hf_model_from_engine(engine.engine_dir, engine.device)

    def generate(chunk: list[list[int]], n: int, model=model) -> None:
        ids = torch.tensor(chunk, device=engine.device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    generate(prompts[:1], 2)  # warm up
    started = time.perf_counter()
    generate(prompts[:1], 1)
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch), desc="transformers", leave=False):
        generate(prompts[i:i + batch], output_len)
    elapsed = time.perf_counter() - started
    per_batch = elapsed / -(-len(prompts) // batch)
    del model
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": elapsed, "ttft_ms": 1000 * ttft,
            "tpot_ms": 1000 * (per_batch - ttft) / max(output_len - 1, 1),
            "output_tok_s": len(prompts) * output_len / elapsed,
            "total_tok_s": len(prompts) * (len(prompts[0]) + output_len) / elapsed}
