"""Random-block GGUF files of a preset's shape (kiln.checkpoint.random.PRESETS), for timing
engines kept quantized at real shapes without a download (speed does not depend on weight
values; `benchmarks/random_gguf.py` is the command line), and random blocks for tests."""

from __future__ import annotations

import sys
import time

import numpy as np

from kiln.errors import CheckpointError


def random_blocks(qtype, rows: int, cols: int,
                  seed: int | np.random.Generator = 0) -> np.ndarray:
    """[rows, bytes] of random blocks of the llama.cpp type qtype: random bytes, every fp16
    field (scale d, minimum m, dmin) a random finite value of about 0.01."""
    import gguf

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    Q = gguf.GGMLQuantizationType
    fields = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,)}.get(qtype, (0,))
    for start in fields:
        values = (rng.standard_normal((rows, cols // per)) * 0.01).astype(np.float16)
        data[:, :, start:start + 2] = values.view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


def write_random_gguf(path: str, config: str, qtype: str, embed: str = "Q8_0",
                      head: str = "Q8_0", seed: int = 0, progress: bool = True) -> None:
    """A llama GGUF of PRESETS[config]'s shape: every decoder linear in qtype, the embedding
    in embed, the output layer in head ("tied": none); norms of ones. Only llama-shaped
    presets (no biases, gated MLP). A bad name raises CheckpointError."""
    import gguf

    from kiln.checkpoint.random import PRESETS

    if config not in PRESETS:
        raise CheckpointError(f"unknown config {config!r}; one of {', '.join(sorted(PRESETS))}")
    p = PRESETS[config]
    if p.get("architecture") != "LlamaForCausalLM":
        raise CheckpointError(f"{config} is not a llama-architecture preset")
    Q = gguf.GGMLQuantizationType
    try:
        types = {"layer": Q[qtype], "embed": Q[embed]}
        if head != "tied":
            types["head"] = Q[head]
    except KeyError as e:
        raise CheckpointError(f"unknown llama.cpp type {e.args[0]!r} (e.g. Q4_0, Q4_1, Q4_K, "
                              "Q8_0, Q6_K)") from None
    hidden, inter, heads, kv = (p["hidden_size"], p["intermediate_size"], p["num_heads"],
                                p["num_kv_heads"])
    head_dim = p.get("head_dim", hidden // heads)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(p["num_layers"])
    w.add_context_length(min(p.get("max_position_embeddings", 8192), 131072))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(p.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(p.get("rope_theta", 10000.0))

    def linear(name: str, rows: int, cols: int, kind: str) -> None:
        w.add_tensor(name, random_blocks(types[kind], rows, cols, rng), raw_dtype=types[kind])

    ones = np.ones(hidden, dtype=np.float32)
    start = time.perf_counter()
    linear("token_embd.weight", p["vocab_size"], hidden, "embed")
    for i in range(p["num_layers"]):
        for name, rows, cols in (("attn_q", heads * head_dim, hidden),
                                 ("attn_k", kv * head_dim, hidden),
                                 ("attn_v", kv * head_dim, hidden),
                                 ("attn_output", hidden, heads * head_dim),
                                 ("ffn_gate", inter, hidden), ("ffn_up", inter, hidden),
                                 ("ffn_down", hidden, inter)):
            linear(f"blk.{i}.{name}.weight", rows, cols, "layer")
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        if progress:
            print(f"\rlayer {i + 1} / {p['num_layers']}", end="", file=sys.stderr, flush=True)
    w.add_tensor("output_norm.weight", ones)
    if head != "tied":
        linear("output.weight", p["vocab_size"], hidden, "head")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if progress:
        print(f"\nwrote {path} ({config}, layers {qtype}, embedding {embed}, head {head}) "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
