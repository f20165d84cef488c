"""GGUF (llama.cpp) reader: metadata -> ModelConfig, dequantized tensors under HF names."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from kiln.checkpoint.base import Checkpoint
from kiln.checkpoint.gguf_file import GGUFFile, UnknownTypeError
from kiln.checkpoint.gguf_rope import rope_scaling
from kiln.checkpoint.gguf_shards import open_shards, shard_paths
from kiln.config import ModelConfig
from kiln.errors import CheckpointError

Q = gguf.GGMLQuantizationType
# (HF name, GGUF type, raw blocks, rows, cols) -> {suffix: tensor}, or None to dequantize
BlockDecoder = Callable[[str, Q, np.ndarray, int, int], "dict[str, torch.Tensor] | None"]

# general.architecture -> (HF architecture, does llama.cpp permute Q/K rows for this arch).
# llama.cpp converts llama-style models to its interleaved rotary layout by permuting the
# Q/K weights; qwen2/qwen3 use NeoX rotary there, which is HF's layout already.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    # llama.cpp stores Gemma's norms as 1 + w already (kiln then adds no offset).
    "gemma": ("GemmaForCausalLM", False),
    "gemma2": ("Gemma2ForCausalLM", False),
    "gpt2": ("GPT2LMHeadModel", False),
    "phi2": ("PhiForCausalLM", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", False),
}
# llama.cpp keeps Mixtral under "llama" (with expert_count); top-k weights renormalised
# unless {arch}.expert_weights_norm says otherwise.
_MOE_RENORMALIZE = {"llama": True, "qwen2moe": False, "qwen3moe": True}
# GPT-2 and Phi-2: a plain (c_fc / c_proj) GELU MLP; Q/K/V may come fused (attn_qkv).
_PLAIN_MLP_LAYER_NAMES = {
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj", "attn_qkv": "self_attn.qkv_proj",
}
# Gemma 2's sandwich norms: llama.cpp's ffn_norm is the norm before the MLP there.
_SANDWICH_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

SUPPORTED_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
})
_UNSUPPORTED = ("which kiln cannot dequantize; supported: "
                + ", ".join(q.name for q in sorted(SUPPORTED_TYPES)))

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
    "output_norm.bias": "model.norm.bias",
    "position_embd.weight": "model.embed_positions.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixture of experts: the router, experts stacked [E, ...], Qwen2-MoE's shared expert.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp-only tensors: rotary tables that HF recomputes from the config.
_SKIPPED_RE = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")


def field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """One metadata value as Python (str, number, bool or list), or default if absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _optional_f32(value: Any) -> float | None:
    return None if value is None else _f32(value)


def _f32(value: Any) -> float:
    # GGUF floats are float32: print the shortest repr so 1e-5 comes back as 1e-5.
    return float(str(np.float32(value)))


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.source = path
        name = path.name
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
        if magic != b"GGUF":
            raise CheckpointError(f"{name} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
        try:
            self._reader = GGUFFile(path)
        except UnknownTypeError as e:
            raise CheckpointError(f"{name}: {e}, {_UNSUPPORTED}") from None
        except (ValueError, IndexError, KeyError, TypeError, OverflowError,
                UnicodeDecodeError) as e:
            # The reader indexes past the end or fails a reshape when the file is cut short.
            raise CheckpointError(f"{name} is truncated or corrupt: {e}") from None
        if self._reader.byte_order != "<":
            raise CheckpointError(f"{name} is a big-endian GGUF; kiln reads little-endian "
                                  "files (the ones llama.cpp writes by default)")
        readers = open_shards(path, self._reader)  # a split GGUF: its tensors in every shard
        self._tensors = [t for r in readers for t in r.tensors]
        files = shard_paths(path, len(readers)) if len(readers) > 1 else [path]
        for reader, file in zip(readers, files or [path], strict=True):
            file_size = len(reader.data)
            for t in reader.tensors:
                if t.data_offset + t.n_bytes > file_size:
                    raise CheckpointError(
                        f"{file.name} is truncated: tensor {t.name} ends at byte "
                        f"{t.data_offset + t.n_bytes} but the file has {file_size}; "
                        "re-download it")
        arch = field(self._reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointError(
                f"{name} has GGUF architecture {arch!r}; kiln reads: " + ", ".join(ARCHITECTURES))
        self._permuted = ARCHITECTURES[arch][1]
        self._names = self._map_names(arch)
        try:
            self.config = self._read_config(arch)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            # e.g. a per-layer list where llama-family models have one head count
            raise CheckpointError(f"{name} has malformed model metadata: {e}") from None
        from kiln.checkpoint.gguf_tokenizer import no_tokenizer_reason, read_tokenizer_spec

        # The tokenizer metadata checked now (an unknown pre-tokenizer, ids past the
        # vocabulary), not after the build has begun.
        self._tokenizer = read_tokenizer_spec(self._reader, name)
        reason = no_tokenizer_reason(self._reader)
        self.no_tokenizer_reason = None if reason is None else f"{name}: {reason}"

    def _map_names(self, arch: str) -> dict[str, str]:
        names: dict[str, str] = {}
        layer_names = _LAYER_NAMES | (_SANDWICH_LAYER_NAMES if arch == "gemma2" else {}) | (
            _PLAIN_MLP_LAYER_NAMES if arch in ("gpt2", "phi2") else {})
        for t in self._tensors:
            if _SKIPPED_RE.fullmatch(t.name):
                continue
            hf = _GLOBAL_NAMES.get(t.name)
            m = _LAYER_RE.fullmatch(t.name)
            if m and m[2] in layer_names:
                hf = f"model.layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"
            if hf is None:
                raise CheckpointError(
                    f"{self.source.name} has tensor {t.name!r}, which kiln does not know; "
                    "this GGUF is not a plain llama-family model")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.source.name}: tensor {t.name} has type "
                                      f"{t.tensor_type.name}, {_UNSUPPORTED}")
            names[t.name] = hf
        return names

    def _read_config(self, arch: str) -> ModelConfig:
        r = self._reader

        def need(key: str) -> int:
            value = field(r, f"{arch}.{key}")
            if not isinstance(value, int):
                raise CheckpointError(
                    f"{self.source.name} lacks the integer metadata {arch}.{key} (found {value!r})")
            return value

        hidden, heads = need("embedding_length"), need("attention.head_count")
        head_dim = (field(r, f"{arch}.attention.key_length")
                    or field(r, f"{arch}.rope.dimension_count") or hidden // heads)
        tokens = field(r, "tokenizer.ggml.tokens")
        vocab = field(r, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            vocab = next((int(t.shape[-1]) for t in self._tensors
                          if t.name == "token_embd.weight"), 0)
        theta = _f32(field(r, f"{arch}.rope.freq_base", 10000.0))
        eps = field(r, f"{arch}.attention.layer_norm_rms_epsilon")
        # Stop on end-of-turn too: chat GGUFs often keep <|eot_id|> apart from eos.
        eos = [field(r, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        if tokens:  # llama.cpp ignores an end-of-turn id past the vocabulary
            eos = [e for e in eos if isinstance(e, int) and 0 <= e < len(tokens)]
        tensor_names = set(self._names)
        return dataclasses.replace(ModelConfig(
            architecture=ARCHITECTURES[arch][0],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=need("feed_forward_length"),
            num_layers=need("block_count"),
            num_heads=heads,
            num_kv_heads=int(field(r, f"{arch}.attention.head_count_kv") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(field(r, f"{arch}.context_length", 4096)),
            rms_norm_eps=1e-6 if eps is None else _f32(eps),
            rope_theta=theta,
            rope_scaling=rope_scaling(r, self._tensors, arch, theta, int(head_dim),
                                      self.source.name),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            bos_token_id=field(r, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        ), **self._gemma_fields(arch, hidden, heads), **self._gpt_fields(arch, hidden, heads),
            **self._moe_fields(arch))

    def _moe_fields(self, arch: str) -> dict[str, Any]:
        r = self._reader
        experts = field(r, f"{arch}.expert_count")
        if not experts:
            return {}
        names = set(self._names)
        layers = int(field(r, f"{arch}.block_count"))
        return dict(
            architecture="MixtralForCausalLM" if arch == "llama" else ARCHITECTURES[arch][0],
            num_experts=int(experts),
            num_experts_per_tok=int(field(r, f"{arch}.expert_used_count")),
            moe_intermediate_size=int(field(r, f"{arch}.expert_feed_forward_length")
                                      or field(r, f"{arch}.feed_forward_length")),
            norm_topk_prob=bool(field(r, f"{arch}.expert_weights_norm",
                                      _MOE_RENORMALIZE.get(arch, True))),
            shared_expert_intermediate_size=int(
                field(r, f"{arch}.expert_shared_feed_forward_length") or 0),
            moe_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" in names))

    def _gpt_fields(self, arch: str, hidden: int, heads: int) -> dict[str, Any]:
        """GPT-2 (learned positions) and Phi-2 (parallel block on one LayerNorm, partial
        rotary over rope.dimension_count dims): LayerNorms with bias, tanh-GELU MLP."""
        if arch not in ("gpt2", "phi2"):
            return {}
        r, names = self._reader, set(self._names)
        head_dim = int(field(r, f"{arch}.attention.key_length") or hidden // heads)
        bias = "blk.0.attn_qkv.bias" in names or "blk.0.attn_q.bias" in names
        fields: dict[str, Any] = dict(
            head_dim=head_dim, norm_type="layernorm", gated_mlp=False, hidden_act="gelu_new",
            rms_norm_eps=_f32(field(r, f"{arch}.attention.layer_norm_epsilon", 1e-5)),
            qkv_bias=bias, o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names, lm_head_bias="output.bias" in names,
            rope_scaling=None)
        if arch == "gpt2":
            fields.update(position_embedding="learned")
        else:
            rotary = int(field(r, "phi2.rope.dimension_count", head_dim))
            fields.update(parallel_residual=True, parallel_shared_norm=True,
                          partial_rotary_factor=rotary / head_dim)
        return fields

    def _gemma_fields(self, arch: str, hidden: int, heads: int) -> dict[str, Any]:
        """Gemma: GeGLU, embeddings times sqrt(hidden). Gemma 2 also: sandwich norms,
        soft-caps, sliding window on even layers, and llama.cpp's attention scale (27B,
        its 46 layers: (hidden / heads)^-1/2 as query_pre_attn_scalar; else head_dim's)."""
        if arch not in ("gemma", "gemma2"):
            return {}
        fields: dict[str, Any] = dict(hidden_act="gelu_pytorch_tanh", scale_embeddings=True)
        if arch == "gemma2":
            r = self._reader
            layers = int(field(r, "gemma2.block_count"))
            window = field(r, "gemma2.attention.sliding_window")
            fields.update(
                sandwich_norms=True,
                attn_logit_softcap=_optional_f32(field(r, "gemma2.attn_logit_softcapping")),
                final_logit_softcap=_optional_f32(field(r, "gemma2.final_logit_softcapping")),
                sliding_window=int(window) if window else None,
                layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                  for i in range(layers)),
                attn_scale=(hidden / heads) ** -0.5 if layers == 46 else None)
        return fields

    def num_tensors(self) -> int:
        return len(self._names)

    def tensor_types(self) -> dict[str, gguf.GGMLQuantizationType]:
        """HF name -> the GGUF type its data is stored in."""
        return {self._names[t.name]: t.tensor_type for t in self._tensors
                if t.name in self._names}

    def tensors(self, decoder: BlockDecoder | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) pairs; a tensor for which `decoder` returns parts
        (suffix -> row-major tensor) comes as those parts, named `<name less .weight>.
        <suffix>`, instead (the build keeps quantized blocks that way)."""
        cfg = self.config
        for t in self._tensors:
            hf = self._names.get(t.name)
            if hf is None:
                continue
            parts = None
            if decoder is not None and t.data.dtype == np.uint8:
                rows, cols = int(t.shape[-1]) if len(t.shape) > 1 else 1, int(t.shape[0])
                parts = decoder(hf, t.tensor_type, t.data, rows, cols)
            if parts is not None:
                base = hf.removesuffix(".weight")
                for suffix, part in parts.items():
                    if self._permuted and (".q_proj." in hf or ".k_proj." in hf):
                        heads = cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads
                        part = unpermute_qk(part, heads)
                    yield f"{base}.{suffix}", part
                continue
            array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if not array.flags.writeable:  # F32 is a view of the read-only mmap: own a copy
                array = array.copy()
            # GGUF lists dims innermost first; PyTorch outermost first.
            w = torch.from_numpy(array).reshape([int(d) for d in reversed(t.shape)])
            if self._permuted and (".q_proj." in hf or ".k_proj." in hf):
                w = unpermute_qk(w, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
            yield hf, w

    def write_tokenizer(self, dest: Path) -> bool:
        from kiln.checkpoint.gguf_tokenizer import write_tokenizer

        if self._tokenizer is None:  # no_tokenizer_reason says why
            return False
        write_tokenizer(self._tokenizer, dest)
        return True

    def fingerprint(self) -> str:
        return gguf_fingerprint(self.source)


def gguf_fingerprint(path: Path) -> str:
    """A cheap identity of a GGUF file (resolved path, size, mtime; of every shard, for a
    split GGUF named as llama.cpp names shards), for the engine cache."""
    files = [p for p in shard_paths(path) or [] if p.is_file()] or [path]
    if path not in files:  # a shard named apart from its siblings
        files.insert(0, path)
    keys = []
    for file in files:
        st = file.stat()
        keys.append(f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(keys).encode()).hexdigest()[:16]


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> llama.cpp: each head's rows [first half | second half] become interleaved pairs."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp -> HF: the inverse of permute_qk (rows (i, pair) back to (half, i))."""
    if w.shape[0] % (2 * n_heads):
        raise CheckpointError(
            f"a Q/K tensor has {w.shape[0]} rows, not a multiple of 2 x {n_heads} heads")
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
