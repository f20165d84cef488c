"""W4A16 at decode batches on Hopper: kiln.kernels.int_wgmma's Gluon kernel (warpgroup
MMA, the K loop laid out by hand) against kiln's Triton path (int_gemm.int_weight_linear,
what int4 engines run today) and bf16 cuBLAS, on Llama-3.1-8B's decoder linears; us a
call in a CUDA graph on cold weights (int_gemv_bench.timed / weight_copies), each launch
checked against the reference GEMM (float32 of the bf16-rounded dequantized weight).

    python benchmarks/int_wgmma_bench.py OUT.json [--rows 1,8,16,32,64] [--groups 128,32]
        [--sweep] [--gemv-tma]

(--bits 8, the int8 version: removed with it in the 54th session; its sweep is in
benchmarks/results/2026-12-06-s54/s53a-w8-rows.log.)
--gemv-tma: one row through kiln.kernels.int4_gemv_tma (the TMA-fed GEMV; --rows
ignored), "kiln" then being the default one-row GEMV; --sweep: rows a program, warps,
stages, half / twice the K splits. (A tensor-core GEMV, "mma", timed here in the 58th
session's tree: 1.5-2x slower than the pairs GEMV, removed in the 59th; BENCHMARKS.md.)

--sweep: around the default launch, one field at a time (the other rows a program of 64
/ 128, 2 / 4 stages, the exact dequantization, half / twice the K splits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from int_gemv_bench import int_weight, n_copies, timed, weight_copies

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def variants(M: int, N: int, K: int, sweep: bool, group: int, gemv: bool) -> dict:
    from kiln.kernels.int4_gemv_tma import gemv_tma_config
    from kiln.kernels.int_wgmma import wgmma_config

    rep = dataclasses.replace
    if gemv:
        base = gemv_tma_config(N, K, group)
        return {"tma": base} | ({
            "bn32": rep(base, block_n=32), "bn128w8": rep(base, block_n=128, num_warps=8),
            "w8": rep(base, num_warps=8), "st3": rep(base, stages=3),
            "st6": rep(base, stages=6), "split/2": rep(base, split_k=max(1, base.split_k // 2)),
            "split*2": rep(base, split_k=base.split_k * 2)} if sweep else {})
    base = wgmma_config(M, N, K)
    out = {"wgmma": base}
    if sweep:
        out.update({"bn" + str(192 - base.block_n): rep(base, block_n=192 - base.block_n),
                    "st2": rep(base, stages=2), "st4": rep(base, stages=4),
                    "exact": rep(base, fast=False),
                    "split/2": rep(base, split_k=max(1, base.split_k // 2)),
                    "split*2": rep(base, split_k=base.split_k * 2)})
    return out


def main() -> None:
    from kiln.kernels import int_gemm
    from kiln.kernels.int4_gemv_tma import w4_gemv_tma
    from kiln.kernels.int_wgmma import w4_wgmma
    from kiln.kernels.reference import dequantize_int_weight

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="1,8,16,32,64")
    ap.add_argument("--groups", default="128,32")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--gemv-tma", action="store_true")
    args = ap.parse_args()
    launch = w4_gemv_tma if args.gemv_tma else w4_wgmma
    if args.gemv_tma:
        args.rows = "1"
    groups = args.groups
    results = []
    print(f"{'shape':8s}{'G':>4}{'rows':>5}  {'launch':10s}{'us':>8}{'vs bf16':>9}{'err':>9}",
          flush=True)
    for group in (int(g) for g in groups.split(",")):
        for name, (n, k) in LAYERS.items():
            w16s = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                    for _ in range(n_copies(n * k * 2))]
            weight, scale, offset, nbytes = int_weight(n, k, 4, group, True)
            copies = weight_copies(weight, scale, offset, nbytes)
            w_ref = dequantize_int_weight(weight, scale, offset).to(torch.bfloat16).float()
            for m in (int(v) for v in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = x.float() @ w_ref.T
                scale_ref = want.abs().max().item()
                bf16 = timed([lambda w=w: x @ w.T for w in w16s])  # noqa: B023
                row = dict(shape=name, N=n, K=k, group=group, rows=m)
                launches = {"kiln": lambda c: int_gemm.int_weight_linear(x, *c)}  # noqa: B023
                for label, cfg in variants(m, n, k, args.sweep, group, args.gemv_tma).items():
                    launches[label] = lambda c, cfg=cfg: launch(x, *c, None, cfg)  # noqa: B023
                for label, fn in launches.items():
                    try:
                        got = fn(copies[0]).float()
                        err = ((got - want).abs().max() / scale_ref).item()
                        us = timed([lambda c=c, fn=fn: fn(c) for c in copies])
                    except Exception as exc:  # a launch that does not compile or run
                        print(f"{name:8s}{group:4d}{m:5d}  {label:10s} failed: "
                              f"{type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        continue
                    results.append(dict(row, launch=label, us=us, bf16_us=bf16, err=err))
                    print(f"{name:8s}{group:4d}{m:5d}  {label:10s}{us:8.1f}{bf16 / us:8.2f}x"
                          f"{err:9.1e}", flush=True)
            del w16s, copies
            torch.cuda.empty_cache()
    # a layer's four linears: kiln today, the wgmma default and bf16, per rows and group
    print("\na layer (qkv + o + gate_up + down), us")
    for group in sorted({r["group"] for r in results}):
        for m in sorted({r["rows"] for r in results}):
            sums = {}
            for r in results:
                if r["group"] == group and r["rows"] == m:
                    sums.setdefault(r["launch"], 0.0)
                    sums[r["launch"]] += r["us"]
                    sums.setdefault("bf16", 0.0)
            sums["bf16"] = sum(r["bf16_us"] for r in results if r["group"] == group and
                               r["rows"] == m and r["launch"] == "kiln")
            print(f"G {group:3d} rows {m:3d}: " + "  ".join(f"{k} {v:.1f}" for k, v in
                                                            sums.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
