"""One-row int4 products on Hopper: kiln.kernels.int4_gemv_tma (TMA-fed, opt-in) against
kiln's default one-row GEMV (int_gemm.int_weight_linear: the bfloat16-pairs GEMV) and
bf16 cuBLAS, on Llama-3.1-8B's decoder linears; us a call in a CUDA graph on cold weights
(int_gemv_bench.timed / weight_copies), GB/s of the weight bytes, each launch checked
against the reference (float32 of the dequantized weight).

    python benchmarks/int4_gemv_tma_bench.py OUT.json [--groups 128,32] [--sweep]

--sweep: around the default launch, one field at a time (rows a program, stages, warps,
half / twice the K splits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from int_gemv_bench import int_weight, n_copies, timed, weight_copies

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def variants(N: int, K: int, G: int, sweep: bool) -> dict:
    from kiln.kernels.int4_gemv_tma import gemv_tma_config

    base = gemv_tma_config(N, K, G)
    out = {"tma": base}
    if sweep:
        rep = dataclasses.replace
        out.update({"bn32": rep(base, block_n=32), "bn128w8": rep(base, block_n=128,
                                                                    num_warps=8),
                    "w8": rep(base, num_warps=8), "st3": rep(base, stages=3),
                    "st6": rep(base, stages=6),
                    "split/2": rep(base, split_k=max(1, base.split_k // 2)),
                    "split*2": rep(base, split_k=base.split_k * 2)})
    return out


def main() -> None:
    from kiln.kernels import int_gemm
    from kiln.kernels.int4_gemv_tma import w4_gemv_tma
    from kiln.kernels.reference import dequantize_int_weight

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--groups", default="128,32")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    results = []
    print(f"{'shape':8s}{'G':>4}  {'launch':10s}{'us':>8}{'GB/s':>8}{'vs bf16':>9}{'err':>9}",
          flush=True)
    for group in (int(g) for g in args.groups.split(",")):
        for name, (n, k) in LAYERS.items():
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            w16s = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                    for _ in range(n_copies(n * k * 2))]
            bf16 = timed([lambda w=w: x @ w.T for w in w16s])  # noqa: B023
            weight, scale, offset, nbytes = int_weight(n, k, 4, group, True)
            copies = weight_copies(weight, scale, offset, nbytes)
            want = x.float() @ dequantize_int_weight(weight, scale, offset).T
            launches = {"kiln": lambda c: int_gemm.int_weight_linear(x, *c)}  # noqa: B023
            for label, cfg in variants(n, k, group, args.sweep).items():
                launches[label] = lambda c, cfg=cfg: w4_gemv_tma(x, *c, None, cfg)  # noqa: B023
            for label, fn in launches.items():
                try:
                    got = fn(copies[0]).float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    us = timed([lambda c=c, fn=fn: fn(c) for c in copies])
                except Exception as exc:  # a launch that does not compile or run
                    print(f"{name:8s}{group:4d}  {label:10s} failed: {type(exc).__name__}: "
                          f"{str(exc)[:200]}", flush=True)
                    continue
                results.append(dict(shape=name, N=n, K=k, group=group, launch=label, us=us,
                                    gbps=nbytes / us / 1e3, bf16_us=bf16, err=err))
                print(f"{name:8s}{group:4d}  {label:10s}{us:8.1f}{nbytes / us / 1e3:8.0f}"
                      f"{bf16 / us:8.2f}x{err:9.1e}", flush=True)
            del w16s, copies
            torch.cuda.empty_cache()
    print("\na layer (qkv + o + gate_up + down), us")
    for group in sorted({r["group"] for r in results}):
        sums: dict[str, float] = {}
        for r in results:
            if r["group"] == group:
                sums[r["launch"]] = sums.get(r["launch"], 0.0) + r["us"]
        sums["bf16"] = sum(r["bf16_us"] for r in results
                           if r["group"] == group and r["launch"] == "kiln")
        print(f"G {group:3d}: " + "  ".join(f"{k} {v:.1f}" for k, v in sums.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
