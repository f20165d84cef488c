"""W8A8 (SmoothQuant) products of a few rows at Llama-3.1-8B shapes, on a GPU: torch._int_mm
with the rows padded to 17 (what int8_linear runs by default) against the dp4a kernel
(kiln/kernels/int8_gemv.py, KILN_INT8_GEMV=1) over a grid of launches (block_n, block_w
words a step, K splits, warps, loop stages), microseconds a call in a CUDA graph with the
weight read from HBM (int_gemv_bench's copies), and bf16 cuBLAS at the same rows for scale.

    python benchmarks/int8_gemv_bench.py OUT.json [--rows 1,4,16]
"""

from __future__ import annotations

import argparse
import json

import torch
from int_gemv_bench import SHAPES, n_copies, timed

# (block_n, block_w, split_k (0: kiln's choice), warps[, loop stages: the K loop
# software-pipelined, KILN_INT_PIPELINE's])
LAUNCHES = [(64, 32, 0, 4), (32, 64, 0, 4), (64, 32, 8, 4), (64, 32, 16, 4), (128, 16, 8, 4),
            (32, 32, 16, 4), (64, 64, 8, 8), (16, 64, 8, 2), (64, 32, 0, 4, 3), (64, 32, 0, 4, 4),
            (64, 32, 8, 4, 3), (32, 64, 8, 4, 3), (64, 64, 8, 8, 3)]


def main() -> None:
    from kiln.kernels import int8_gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="1,4,16")
    args = ap.parse_args()
    results = []
    for M in (int(v) for v in args.rows.split(",")):
        for name, (N, K) in SHAPES.items():
            copies = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
                      for _ in range(n_copies(N * K))]
            x = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
            padded = torch.nn.functional.pad(x, (0, 0, 0, max(0, 17 - M)))
            want = torch._int_mm(padded, copies[0].t())[:M]
            x16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w16s = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                    for _ in range(n_copies(N * K * 2))]
            rows = [("bf16 cublas", timed([lambda a=x16, w=w: a @ w.T for w in w16s])),
                    ("int_mm (17 rows)", timed([lambda a=padded, w=w: torch._int_mm(a, w.t())
                                                for w in copies]))]
            for bn, bw, split, warps, *stages in LAUNCHES:
                ls = stages[0] if stages else 1
                got = int8_gemv.int8_gemv(x, copies[0], bn, bw, split, warps, ls)
                assert torch.equal(got, want), (name, M, bn, bw, split, ls)
                rows.append((f"dp4a {bn},{bw},{split},{warps},{ls}", timed(
                    [lambda w=w, a=(bn, bw, split, warps, ls): int8_gemv.int8_gemv(
                        x, w, *a) for w in copies])))  # noqa: B023
            for config, us in rows:
                results.append(dict(M=M, shape=name, config=config, us=us,
                                    gbps=N * K / us / 1e3))
                print(f"M {M:2d} {name:8s} {config:22s} {us:8.1f} us {N * K / us / 1e3:7.0f} "
                      "GB/s of int8 weight", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    print("\nper layer (qkv + o + gate_up + down), us: int_mm / best dp4a launch / bf16")
    for M in sorted({r["M"] for r in results}):
        sel = [r for r in results if r["M"] == M]
        total = {k: sum(r["us"] for r in sel if r["config"] == k)
                 for k in ("int_mm (17 rows)", "bf16 cublas")}
        best = sum(min(r["us"] for r in sel if r["shape"] == s and r["config"][:4] == "dp4a")
                   for s in SHAPES)
        print(f"M {M:2d}: {total['int_mm (17 rows)']:7.1f} / {best:7.1f} / "
              f"{total['bf16 cublas']:7.1f}")


if __name__ == "__main__":
    main()
