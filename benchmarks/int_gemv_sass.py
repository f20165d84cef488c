"""Instructions per weight in the main loop of the decode integer GEMV, without a GPU.

    python benchmarks/int_gemv_sass.py [--out int_gemv_sass.json]

The batch-1 INT4 / INT8 GEMV streams its weights at 0.8-1.4 TB/s on an H200 where bf16
reaches 3.4-4.3 (BENCHMARKS.md): it is bound by instruction issue, not by memory. So the
number to drive down is SASS instructions per weight in the K loop, which this counts by
compiling the kernel for sm_90 (kiln.kernels.compile_check.main_loop_sass) at the
Llama-3.1-8B shape (K 4096, groups of 128 for int4, per channel for int8), for the launch
int_gemm_config picks and for other tiles. Every thread of a 4-warp program handles
BLOCK_N * BLOCK_K / 128 weights a loop iteration (times the rows of x: 1, and 2 and 4 at
the end). Also reported: registers a thread and stack bytes (spills) of the kernel.

Before the K-major 4-bit storage (engine format 2, session 7): int4 g128 7.7 a weight at
the default 32 x 256 tile, int8 6.7.
"""

from __future__ import annotations

import argparse
import json

from kiln.kernels import int_gemm, int_gemv
from kiln.kernels.compile_check import main_loop_sass

K = 4096
TILES = {4: [(64, 512), (128, 256), (64, 256), (32, 512), (128, 512)],  # (BLOCK_N, BLOCK_K)
         8: [(64, 256), (128, 256), (32, 256), (256, 128)]}


def per_weight(bits: int, block_n: int, block_k: int, warps: int = 4, rows: int = 1
               ) -> dict:
    group = 128 if bits == 4 else K
    per = 32 // bits
    values = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*fp32", "M": 3, "N": 4096, "K": K,
              "stride_xm": K, "stride_om": 4096, "stride_wn": K // per,
              "B_PER_SPLIT": K // 4 // int_gemv.block_inputs(bits), "stride_sn": K // group}
    meta = dict(BITS=bits, HAS_OFFSET=bits == 4, HAS_BIAS=False, BLOCK_N=block_n,
                BLOCK_K=block_k, ATOMIC=True, EVEN_K=True, EVEN_N=True, G=group,
                ROWS=rows)
    usage: dict = {}
    ops = main_loop_sass(int_gemv._int_gemv_kernel, values, meta, warps, 3, usage, "FFMA")
    weights = block_n * block_k / (32 * warps)
    total = sum(ops.values())
    return {"bits": bits, "rows": rows, "block_n": block_n, "block_k": block_k, "loop": total,
            "per_weight": round(total / weights, 2), **usage,
            "top": {op: round(n / weights, 2) for op, n in ops.most_common(8)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int_gemv_sass.json")
    args = ap.parse_args()
    cpu = __import__("torch").device("cpu")
    default = {bits: int_gemm.int_gemm_config(1, 4096, K, cpu, bits) for bits in (4, 8)}
    rows = [per_weight(bits, bn, bk) for bits in (4, 8) for bn, bk in TILES[bits]]
    for m in (2, 4):  # a few rows of x, at kiln's tiles for them
        for bits in (4, 8):
            cfg = int_gemm.int_gemm_config(m, 4096, K, cpu, bits)
            rows.append(per_weight(bits, cfg.block_n, cfg.block_k, rows=m))
    print(f"int_gemv, K {K}, sm_90 (default one-row tiles: int4 {default[4].block_n}x"
          f"{default[4].block_k}, int8 {default[8].block_n}x{default[8].block_k})")
    print(f"{'int':>4}{'x rows':>7}{'tile':>10}{'per weight':>12}{'regs':>6}{'stack':>6}  "
          "most frequent (per weight)")
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["top"].items())[:5])
        print(f"{r['bits']:>4}{r['rows']:>7}{r['block_n']:>5}x{r['block_k']:<4}"
              f"{r['per_weight']:>12}{r['registers']:>6}{r['stack_bytes']:>6}  {top}")
    with open(args.out, "w") as f:
        json.dump({"K": K, "default_tiles": {b: [c.block_n, c.block_k]
                                             for b, c in default.items()}, "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
