"""Integer-weight linears at prompt sizes (65-512 rows, below and at DEQUANT_ROWS) on a
GPU: kiln's choice (int_gemm.int_weight_linear) against the weight dequantized into a
bf16 scratch then cuBLAS (the path from DEQUANT_ROWS rows), Hopper's Gluon int4 kernel
(kiln.kernels.int_wgmma: its rule's launch, 64- and 256-row blocks, 128 weight rows a
program in 2 stages, half and twice the rule's K splits), Triton tiles (int4 magic, int8 on digit
planes) and bf16 cuBLAS, on Llama-3.1-8B's decoder linears; us a call in a CUDA graph
on cold weights (int_gemv_bench.timed), each checked against the float32 reference.

    python benchmarks/int_prefill_bench.py OUT.json [--rows 65,128,256] [--kinds 4:128,4:32,8:0]

Batch-1 latency's 128-token prompt runs at 128 rows: its TTFT is this table's 128 row
times 32 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from int_gemv_bench import SHAPES, int_weight, n_copies, timed, weight_copies


def main() -> None:
    from kiln.kernels import int_gemm, int_launch

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="65,128,256")
    ap.add_argument("--kinds", default="4:128,4:32,8:0", help="bits:group (0: a channel)")
    args = ap.parse_args()
    wgmma = int_launch.wgmma_module()
    results, table = [], {}
    for M in (int(v) for v in args.rows.split(",")):
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w16s = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                    for _ in range(n_copies(N * K * 2))]
            us = timed([lambda a=x, w=w: a @ w.T for w in w16s])
            results.append(dict(M=M, shape=name, kind="bf16", launch="cublas", us=us))
            table.setdefault((M, "bf16", "cublas"), []).append(us)
            del w16s
            for kind in args.kinds.split(","):
                bits, group = (int(v) for v in kind.split(":"))
                weight, scale, offset, nbytes = int_weight(N, K, bits, group)
                want = int_gemm.int_weight_linear(x.float(), weight, scale, offset)
                copies = weight_copies(weight, scale, offset, nbytes)
                launches = {
                    "kiln": lambda a, w, s, o: int_gemm.int_weight_linear(a, w, s, o),
                    "dequant": lambda a, w, s, o: a @ int_gemm.dequantize_weight(
                        w, s, o, a.dtype).T}
                if bits == 4 and wgmma is not None and wgmma.wgmma_eligible(x, weight, scale):
                    launches["gluon"] = lambda a, w, s, o: wgmma.w4_wgmma(a, w, s, o, None)
                    # the rule's launch (past 64 rows: 128-row blocks, 64 weight rows a
                    # program, 4 stages) against 64-row blocks (the 54th session's), 128
                    # weight rows a program, and half / twice the rule's K splits
                    rule = wgmma.wgmma_config(M, N, K)
                    # 256-row blocks (wgmma's widest N; 2 stages: a third would pass the
                    # shared memory; sm_90 compile: 237 registers, no spills) for 129-255
                    for label, change in (("64rows", dict(block_m=64, stages=3)),
                                          ("256rows", dict(block_m=256, stages=2)),
                                          ("n128s2", dict(block_n=128, stages=2)),
                                          ("split/2", dict(split_k=max(1, rule.split_k // 2))),
                                          ("split*2", dict(split_k=rule.split_k * 2))):
                        cfg = dataclasses.replace(rule, **change)
                        launches["gluon" + label] = \
                            lambda a, w, s, o, c=cfg: wgmma.w4_wgmma(a, w, s, o, None, c)
                # Triton tiles kiln has for decode batches, at prompt rows (untimed there):
                # int4 transposed + magic (16-64 rows' default before Gluon), int8 on x's
                # digit planes (int8 tensor cores; 17-64 rows' default)
                tiles = {"magic64": int_gemm.IntGemmConfig(64, 64, 128, 4, 3, split_k=2,
                                                           swap=True, magic=True),
                         "magic128": int_gemm.IntGemmConfig(128, 64, 128, 8, 3, swap=True,
                                                            magic=True)} if bits == 4 else {
                    "digits64": int_gemm.IntGemmConfig(64, 64, 128, 4, 3, digits=True),
                    "digits128": int_gemm.IntGemmConfig(128, 128, 128, 8, 3, digits=True)}
                for label, cfg in tiles.items():
                    launches[label] = lambda a, w, s, o, c=cfg: int_gemm.int_weight_linear(
                        a, w, s, o, config=c)
                for launch, fn in launches.items():
                    try:
                        got = fn(x, weight, scale, offset)
                        err = ((got.float() - want).norm() / want.norm()).item()
                        us = timed([lambda c=c, f=fn, a=x: f(a, *c) for c in copies], reps=8,
                                   rounds=5)
                    except Exception as exc:  # past the shared memory
                        print(f"M {M:4d} {name:8s} {launch}: {type(exc).__name__}", flush=True)
                        continue
                    print(f"M {M:4d} {name:8s} int{bits} g{group:<4d} {launch:8s} {us:8.1f} us"
                          f"  err {err:.1e}", flush=True)
                    results.append(dict(M=M, shape=name, kind=kind, launch=launch, us=us,
                                        err=err))
                    table.setdefault((M, kind, launch), []).append(us)
                del copies
    print("\na layer (qkv + o + gate_up + down), us")
    for (M, kind, launch), v in table.items():
        print(f"M {M:4d} {kind:6s} {launch:8s} {sum(v):8.1f}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
