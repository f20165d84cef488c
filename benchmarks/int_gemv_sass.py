"""Instructions per weight in the main loop of the one-row integer GEMV, without a GPU.

    python benchmarks/int_gemv_sass.py [--out int_gemv_sass.json]

The batch-1 INT4 / INT8 GEMV streams its weights at 0.8-1.4 TB/s on an H200 where bf16
reaches 3.4-4.3 (BENCHMARKS.md): it is bound by instruction issue, not by memory. So the
number to drive down is SASS instructions per weight in the K loop, which this counts by
compiling the kernel for sm_90 (kiln.kernels.compile_check.main_loop_sass) at the
Llama-3.1-8B shape (K 4096, groups of 128 for int4, per channel for int8), for the launch
int_gemm_config picks and for other tiles. Every thread of a 4-warp program handles
BLOCK_N * BLOCK_K / 128 weights a loop iteration.
"""

from __future__ import annotations

import argparse
import json

from kiln.kernels import int_gemm
from kiln.kernels.compile_check import main_loop_sass

K = 4096
TILES = [(32, 256), (64, 128), (128, 64), (256, 32), (512, 32)]  # (BLOCK_N, BLOCK_K)


def per_weight(bits: int, block_n: int, block_k: int, warps: int = 4, **flags: bool) -> dict:
    """flags: the kernel's variants (FACTORED, XVEC, PREFETCH)."""
    group = 128 if bits == 4 else K
    per = 32 // bits
    values = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*fp32", "part_ptr": "*fp32",
              "count_ptr": "*i32", "N": 4096, "K": K,
              "W_PER_SPLIT": K // 4 // per, "stride_wn": K // per, "stride_sn": K // group}
    meta = dict(BITS=bits, HAS_OFFSET=bits == 4, HAS_BIAS=False, BLOCK_N=block_n,
                BLOCK_K=block_k, ATOMIC=True, EVEN_K=True,
                GROUPS=max(1, block_k // group), G=group, **flags)
    ops = main_loop_sass(int_gemm._gemv1_kernel, values, meta, warps, 3)
    weights = block_n * block_k / (32 * warps)
    total = sum(ops.values())
    return {"bits": bits, "block_n": block_n, "block_k": block_k,
            "variant": "+".join(k.lower() for k, v in flags.items() if v) or "plain", "loop": total,
            "per_weight": round(total / weights, 2),
            "top": {op: round(n / weights, 2) for op, n in ops.most_common(8)}}


def pairs_per_weight(rows: int, block_n: int, block_k: int, warps: int = 4) -> dict:
    """The int4 GEMV in bfloat16 pairs (kiln.kernels.int_gemv_pairs) at `rows` rows:
    instructions a weight and row."""
    from kiln.kernels import int_gemv_pairs

    values = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*fp32", "N": 4096, "K": K,
              "W_PER_SPLIT": K // 4 // 8, "stride_wn": K // 8, "stride_sn": K // 128}
    meta = dict(G=128, HAS_OFFSET=True, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k,
                ATOMIC=True, EVEN_K=True, GROUPS=1, INTERPRET=False)
    if rows == 1:
        kernel = int_gemv_pairs._gemv1_pairs_kernel
        values.update(part_ptr="*fp32", count_ptr="*i32")
        meta["SPLIT_K"] = 1
    else:
        kernel = int_gemv_pairs._gemv_pairs_rows_kernel
        values.update(M=rows, stride_xm=K // 2, stride_om=4096)
        meta["ROWS"] = rows
    ops = main_loop_sass(kernel, values, meta, warps, 3)
    weights = block_n * block_k / (32 * warps) * rows
    return {"bits": 4, "block_n": block_n, "block_k": block_k, "variant": f"pairs-{rows}row",
            "loop": sum(ops.values()), "per_weight": round(sum(ops.values()) / weights, 2),
            "top": {op: round(n / weights, 2) for op, n in ops.most_common(8)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int_gemv_sass.json")
    args = ap.parse_args()
    default = int_gemm.int_gemm_config(1, 4096, K, __import__("torch").device("cpu"))
    rows = [per_weight(bits, bn, bk, **flags) for bits in (4, 8) for bn, bk in TILES
            for flags in ({}, {"FACTORED": True}, {"FACTORED": True, "XVEC": True})]
    # bfloat16 pairs (per weight and row), kiln's int4 default at one row since the
    # eighteenth session
    rows += [pairs_per_weight(r, bn, bk) for r in (1, 2, 4) for bn, bk in ((32, 256), (64, 128))]
    import triton

    print(f"one-row GEMV, K {K}, sm_90, Triton {triton.__version__} (default tile "
          f"{default.block_n}x{default.block_k})")
    print(f"{'int':>4}{'tile':>10}{'variant':>15}{'per weight':>12}  most frequent (per weight)")
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in list(r["top"].items())[:5])
        print(f"{r['bits']:>4}{r['block_n']:>5}x{r['block_k']:<4}{r['variant']:>15}"
              f"{r['per_weight']:>12}  {top}")
    with open(args.out, "w") as f:
        json.dump({"K": K, "triton": triton.__version__,
                   "default_tile": [default.block_n, default.block_k], "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
