"""Batch-1 W4A16 / W8A16 GEMV launches at Llama-3.1-8B shapes against bf16 cuBLAS, on a
GPU: time per call (inside a CUDA graph, as decode runs) and the weight bytes read per
second; each shape with the kernel before the K-major 4-bit storage ("old", its default
launch, benchmarks/int_gemv_legacy.py), kiln's own choice ("auto") and a small grid of
launch configs (block_n, block_k, split_k (0: kiln's rule), warps, stages); and kiln's
choice for 2 and 4 rows of x against cuBLAS.

    python benchmarks/int_gemv_bench.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GRID = {4: ["64,512,0,4,3", "128,256,0,4,3", "64,256,0,4,3", "32,512,0,4,3", "128,512,0,8,3",
            "64,512,0,4,1", "64,512,2,4,3", "64,512,8,4,3"],
        8: ["64,256,0,4,3", "128,256,0,4,3", "32,256,0,4,3", "64,512,0,8,3", "128,128,0,4,3"]}


def timed(fn, reps: int = 20, rounds: int = 10) -> float:
    """Median microseconds per call, `reps` calls captured in one graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.int_gemv_legacy import gemv1_old, pack_int4_old
    from kiln.kernels import int_gemm
    from kiln.kernels.reference import dequantize_int_weight, pack_int4

    out_path = sys.argv[1] if len(sys.argv) > 1 else "int_gemv.json"
    results = []

    def record(name, N, K, kind, cfg, us, nbytes, err=None):
        results.append(dict(shape=name, N=N, K=K, kind=kind, config=cfg, us=us,
                            gbps=nbytes / us / 1e3, rel_err=err))
        tail = "" if err is None else f" err {err:.1e}"
        print(f"{name:8s} {kind:5s} {cfg:14s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s{tail}",
              flush=True)

    for name, (N, K) in SHAPES.items():
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        record(name, N, K, "bf16", "cublas", timed(lambda: x @ w16.T), N * K * 2)  # noqa: B023
        for bits in (4, 8):
            if bits == 4:
                q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
                weight, old_weight = pack_int4(q).cuda(), pack_int4_old(q).cuda()
                scale = torch.rand(N, K // 128, device="cuda") * 0.01
                offset = -8 * scale
            else:
                weight = old_weight = torch.randint(-127, 128, (N, K), dtype=torch.int8,
                                                    device="cuda")
                scale = torch.rand(N, 1, device="cuda") * 0.01
                offset = None
            nbytes = weight.numel() * weight.element_size() + scale.numel() * 4 * (
                2 if offset is not None else 1)
            want = x.float() @ dequantize_int_weight(weight, scale, offset).T

            def rel(got):
                return ((got.float() - want).norm() / want.norm()).item()  # noqa: B023

            kind = f"int{bits}"
            old = lambda: gemv1_old(x, old_weight, scale, offset)  # noqa: B023, E731
            record(name, N, K, kind, "old", timed(old), nbytes, rel(old()))
            for cfg in ["auto"] + GRID[bits]:
                if cfg == "auto":
                    os.environ.pop("KILN_INT_GEMV1", None)
                else:
                    os.environ["KILN_INT_GEMV1"] = cfg
                try:
                    fn = lambda: int_gemm.int_weight_linear(x, weight, scale, offset)  # noqa: B023, E731
                    err = rel(fn())
                    us = timed(fn)
                except Exception as e:  # a config past the hardware's limits
                    print(f"{name:8s} {kind} {cfg}: {type(e).__name__}: {e}"[:200], flush=True)
                    continue
                record(name, N, K, kind, cfg, us, nbytes, err)
            os.environ.pop("KILN_INT_GEMV1", None)
            for rows in (2, 4):  # a few rows of x (small batches, speculation)
                xr = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
                want_r = xr.float() @ dequantize_int_weight(weight, scale, offset).T
                fn = lambda: int_gemm.int_weight_linear(xr, weight, scale, offset)  # noqa: B023, E731
                err = ((fn().float() - want_r).norm() / want_r.norm()).item()
                record(name, N, K, kind, f"auto-M{rows}", timed(fn), nbytes, err)
                if bits == 4:
                    w_r = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                    record(name, N, K, "bf16", f"cublas-M{rows}",
                           timed(lambda: xr @ w_r.T), N * K * 2)  # noqa: B023
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    best, per_layer = {}, {}
    for r in results:
        key = (r["shape"], r["kind"])
        one_row = r["config"] not in ("old", "cublas") and "-M" not in r["config"]
        if one_row and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
        if r["config"].split("-")[0] in ("old", "auto", "cublas"):
            k = (r["kind"], r["config"])
            per_layer[k] = per_layer.get(k, 0.0) + r["us"]
    print("\nbest new config per shape:")
    for (shape, kind), r in best.items():
        print(f"{shape:8s} {kind:5s} {r['config']:14s} {r['us']:8.1f} us {r['gbps']:7.0f} GB/s")
    print("\nper layer (qkv + o + gate_up + down), us (-M2 / -M4: 2 / 4 rows of x):")
    for (kind, cfg), us in per_layer.items():
        print(f"{kind:5s} {cfg:9s} {us:8.1f}")


if __name__ == "__main__":
    main()
