"""SASS instructions per KV byte in the main loop of e4m3 decode attention, without a GPU.

    python benchmarks/attn_decode_sass.py [--out attn_decode_sass.json]

Compiles kiln.kernels.attention_decode._decode_kernel for sm_90 (compile_check) at the
Llama-3.1-8B decode shape (group 4 -> 16 query rows, d 128, 32 splits) for each e4m3 mode
(E4M3_MODES) and launch config, and counts the opcodes of the key loop
(compile_check.main_loop_sass). A loop iteration reads BLOCK_N keys' K and V (256 bytes a
key); "per byte" is loop instructions x threads / bytes, the issue cost of one byte.
"""

from __future__ import annotations

import argparse
import json

from kiln.kernels import attention_decode
from kiln.kernels.compile_check import main_loop_sass

ARGS = {"q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
        "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
        "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": 0.1,
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "stride_qt": 4096, "stride_qh": 128,
        "stride_ot": 4096, "stride_oh": 128, "stride_kb": 16384, "stride_ks": 1024,
        "stride_kh": 128, "stride_bt": 511, "window": 4096, "softcap": 72.1,
        "alibi_ptr": "*fp32", "cos_sin_ptr": "*fp32", "stride_cs": 128}
SHAPE = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_D": 128, "DOT_PREC": "tf32",
         "WINDOW": False, "SOFTCAP": False, "ALIBI": False, "ROPE_K": False, "BLOCK_G": 16,
         "NUM_SPLITS": 32}
CONFIGS = [(64, 2, 2), (128, 2, 2), (64, 2, 4), (128, 2, 4), (128, 3, 4), (128, 2, 8)]


def count(mode: str, block_n: int, stages: int, warps: int) -> dict:
    cvt, fp8_qk = attention_decode.E4M3_MODES[mode]
    ops = main_loop_sass(attention_decode._decode_kernel, ARGS, {
        **SHAPE, "BLOCK_N": block_n, "CVT_WORDS": cvt, "FP8_QK": fp8_qk}, warps, stages)
    total = sum(ops.values())
    return {"mode": mode, "block_n": block_n, "stages": stages, "warps": warps,
            "loop": total, "per_byte": round(total * 32 * warps / (block_n * 256), 3),
            "top": dict(ops.most_common(8))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attn_decode_sass.json")
    args = ap.parse_args()
    rows = [count(m, *c) for m in attention_decode.E4M3_MODES for c in CONFIGS]
    print(f"{'mode':6} {'n/st/w':>9} {'loop':>5} {'per byte':>8}  most frequent")
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["top"].items())[:5])
        print(f"{r['mode']:6} {r['block_n']:>4}/{r['stages']}/{r['warps']} {r['loop']:5d} "
              f"{r['per_byte']:8.3f}  {top}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
