"""A llama-architecture GGUF file of a preset's shape (kiln.checkpoint.random.PRESETS) with
random blocks of one llama.cpp type, for timing GGUF engines kept quantized at real shapes
without a download (speed does not depend on weight values):

    python benchmarks/random_gguf.py /tmp/llama8b-q4_1.gguf --config llama-3.1-8b --type Q4_1
    kiln bench latency /tmp/llama8b-q4_1.gguf --input-len 128 --output-len 256

Every linear of the decoder layers is in --type; the embedding in --embed and the output
layer in --head (Q8_0 both by default, as SmolLM2's file has its tied embedding; "tied":
no output.weight). Each block's fp16 fields (scale, minimum) are random finite values of
about 0.01, the rest random bytes. Only llama-shaped presets (no biases, gated MLP)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] of random blocks of qtype, every fp16 field finite."""
    import gguf

    per, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    Q = gguf.GGMLQuantizationType
    fields = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,)}.get(qtype, (0,))
    for start in fields:
        values = (rng.standard_normal((rows, cols // per)) * 0.01).astype(np.float16)
        data[:, :, start:start + 2] = values.view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


def write(path: str, config: str, qtype: str, embed: str, head: str, seed: int = 0) -> None:
    import gguf

    from kiln.checkpoint.random import PRESETS

    if config not in PRESETS:
        sys.exit(f"unknown --config {config!r}; one of {', '.join(sorted(PRESETS))}")
    p = PRESETS[config]
    if p.get("architecture") != "LlamaForCausalLM":
        sys.exit(f"{config} is not a llama-architecture preset")
    Q = gguf.GGMLQuantizationType
    try:
        types = {k: Q[v] for k, v in (("layer", qtype), ("embed", embed))}
        if head != "tied":
            types["head"] = Q[head]
    except KeyError as e:
        sys.exit(f"unknown llama.cpp type {e.args[0]!r} (e.g. Q4_0, Q4_1, Q4_K, Q8_0, Q6_K)")
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
        print(f"\rlayer {i + 1} / {p['num_layers']}", end="", file=sys.stderr, flush=True)
    w.add_tensor("output_norm.weight", ones)
    if head != "tied":
        linear("output.weight", p["vocab_size"], hidden, "head")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"\nwrote {path} ({config}, layers {qtype}, embedding {embed}, head {head}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--type", default="Q4_1", help="the decoder layers' llama.cpp type")
    ap.add_argument("--embed", default="Q8_0")
    ap.add_argument("--head", default="Q8_0", help='a llama.cpp type, or "tied"')
    args = ap.parse_args(argv)
    write(args.out, args.config, args.type, args.embed, args.head)


if __name__ == "__main__":
    main()
