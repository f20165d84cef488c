"""FP8 W8A8 linear on the GPU: bf16 F.linear vs the torch._scaled_mm path vs the Triton path,
at Llama-3.1-8B shapes, each fp8 path timed with its activation quantization included.

    python benchmarks/fp8_gemm.py [--out fp8_gemm.json] [--ms 1,2,4] [--sweep]
    python benchmarks/fp8_gemm.py --grid [--swap] [--ms 1,16] [--out grid.json]
    python benchmarks/fp8_gemm.py --scaling [--ms 512,16384]   # rowwise vs tensorwise scales

Times are per call, from CUDA-graph replays of many calls that cycle through enough weight
copies (>= 512 MB) that no call finds its weight in the 50 MB L2: what a decode step sees.
GB/s: weight bytes (1 per fp8 weight, 2 per bf16 one) over time, the figure of merit at
small M (ceiling: ~4,264 GB/s copy bandwidth measured on this H200); TFLOP/s: 2*M*N*K over
time, the one at large M. --sweep times every Triton launch configuration in
`sweep_configs` as well and prints the best per (shape, M): how kiln.kernels.fp8's
gemm_config table and dispatch rule were chosen. --grid times the decode tile (16 rows)
over a grid of launches (rows a program, K step, stages, split-K) on an input that comes
quantized (as the fused RMSNorm and SiLU*mul kernels hand it over), GEMM alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from kiln.kernels import fp8
from kiln.kernels import reference as ref

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
ROTATE_BYTES = 512 << 20
ERR_MS = (1, 64)  # where --sweep also measures each config's float32 error


def sweep_configs(M: int) -> list[fp8.GemmConfig]:
    """Candidates around what gemm_config picks (its choice is timed as "triton" anyway)."""
    G = fp8.GemmConfig
    out: list[fp8.GemmConfig] = []
    if M <= 16:  # mma.sync (fp8 widened to f16) tiles of 16 rows
        out += [G(16, 32, 256, 4, 4), G(16, 32, 256, 4, 4, pdl=True),
                G(16, 32, 512, 4, 4, prefetch=2048, pdl=True),
                G(16, 64, 512, 4, 4, prefetch=2048, pdl=True)]
        if M == 1:  # quantization fused into the GEMM (one launch)
            out += [G(16, 32, 256, 4, 4, fuse_quant=True),
                    G(16, 64, 512, 4, 4, fuse_quant=True, prefetch=2048)]
    if 16 < M <= 64:  # wgmma tiles of 64 rows
        out += [G(64, 32, 256, 4, 4), G(64, 32, 256, 4, 4, prefetch=1024, pdl=True),
                G(64, 128, 128, 4, 4, group_m=8, pdl=True), G(64, 64, 256, 4, 4, group_m=8)]
    if 64 < M <= 256:
        out += [G(64, 128, 128, 4, 4, group_m=8, pdl=True), G(64, 64, 256, 4, 4, group_m=8),
                G(128, 128, 128, 8, 4, group_m=8, pdl=True)]
    return out


def grid_configs() -> list[fp8.GemmConfig]:
    G = fp8.GemmConfig
    out = []
    for block_n in (16, 32, 64):
        for block_k in (256, 512):
            for stages in (3, 5):
                for split in (1, 2, 4, 8):
                    out.append(G(16, block_n, block_k, 4, stages, pdl=True, split_k=split))
    out += [G(16, 16, 256, 2, 4, pdl=True, split_k=s) for s in (1, 2, 4)]
    out += [G(16, 64, 256, 8, 4, pdl=True, split_k=s) for s in (1, 2, 4)]
    out += [G(16, 32, 512, 4, 4, prefetch=2048, pdl=True, split_k=s) for s in (1, 2, 4)]
    return out


def swap_grid_configs(M: int) -> list[fp8.GemmConfig]:
    """kiln.kernels.fp8_swap's launches for M tokens (a tile of 16, 32 or 64): weight rows a
    program (the wgmma's M), K step, pipeline depth, split-K (--grid --swap)."""
    G = fp8.GemmConfig
    tokens = 16 if M <= 16 else 32 if M <= 32 else 64
    return [G(tokens, rows, block_k, 4, stages, pdl=True, split_k=split, swap=True)
            for rows in (64, 128) for block_k in (64, 128, 256) for stages in (4, 6, 8, 10, 12)
            for split in (1, 2, 4)]


def run_grid(ms: list[int], shapes: list[tuple[int, int]], swap: bool = False) -> list[dict]:
    """GEMM alone on an already quantized input, every grid_configs launch; prints the
    best three per (shape, M) next to the current gemm_config choice."""
    results = []
    for N, K in shapes:
        w8 = make_weights(N, K, max(2, math.ceil(ROTATE_BYTES / (N * K))), fp8.FP8)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            act = fp8.FP8Act(*fp8.quantize_fp8_per_token(x), torch.bfloat16)
            y_ref = ref.fp8_linear(x.float(), w8[0][0], w8[0][1], None, None)
            current = fp8.gemm_config(M, N, K)
            rows = []
            for cfg in [current] + (swap_grid_configs(M) if swap else grid_configs()):
                try:
                    fn = functools.partial(fp8.triton_fp8_linear, config=cfg)
                    t = time_calls(fn, [(act, w, s) for w, s in w8])
                    y = fn(act, w8[0][0], w8[0][1]).float()
                    err = ((y - y_ref).abs().amax(1) / y_ref.abs().amax(1)).max().item()
                except Exception as e:  # a config that does not compile or fit
                    print(f"   {cfg.tag()}: {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                rec = dict(N=N, K=K, M=M, method=f"grid {cfg.tag()}", us=t * 1e6,
                           weight_GBps=N * K / t / 1e9, TFLOPs=2.0 * M * N * K / t / 1e12,
                           rel_err=err, current=cfg == current)
                results.append(rec)
                rows.append(rec)
            rows.sort(key=lambda r: r["us"])
            now = next(r for r in rows if r["current"])
            print(f"{N}x{K} M={M}: current {now['method'][5:]} {now['us']:.2f} us "
                  f"({now['weight_GBps']:.0f} GB/s); best " + ", ".join(
                      f"{r['method'][5:]} {r['us']:.2f} us ({r['weight_GBps']:.0f} GB/s, "
                      f"err {r['rel_err']:.0e})" for r in rows[:3]), flush=True)
        del w8
        torch.cuda.empty_cache()
    return results


def time_calls(fn, args_list: list[tuple], reps: int = 20) -> float:
    """Seconds per call: one CUDA graph calls fn(*args) for every args in args_list."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in args_list[:2]:  # compile / autotune / cuBLAS handles outside the capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in args_list:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps / len(args_list))
    del graph
    return sorted(times)[1]


def make_weights(N: int, K: int, copies: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws = []
    for _ in range(copies):
        w = torch.randn(N, K, device="cuda", generator=g) * 0.02
        if dtype == fp8.FP8:
            scale = w.abs().amax(1) / fp8.FP8_MAX
            ws.append(((w / scale[:, None]).to(fp8.FP8), scale.float()))
        else:
            ws.append((w.to(dtype), None))
    return ws


def row(record: dict) -> str:
    return (f"{record['N']:6d} {record['K']:6d} {record['M']:5d} {record['method']:24s} "
            f"{record['us']:9.2f} us {record['weight_GBps']:8.0f} GB/s "
            f"{record['TFLOPs']:7.1f} TFLOP/s")


def run(ms: list[int], shapes: list[tuple[int, int]], sweep: bool, static: bool) -> list[dict]:
    results = []
    print(f"{'N':>6} {'K':>6} {'M':>5} {'method':24s} {'time':>12} {'weights':>13} "
          f"{'rate':>15}", flush=True)
    for N, K in shapes:
        copies8 = max(2, math.ceil(ROTATE_BYTES / (N * K)))
        copies16 = max(2, math.ceil(ROTATE_BYTES / (2 * N * K)))
        w8 = make_weights(N, K, copies8, fp8.FP8)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            in_scale = (x.abs().amax() / 448).float().reshape(1) if static else None
            flops = 2.0 * M * N * K

            def record(method: str, seconds: float, wbytes: int, shape=(N, K, M, flops),
                       **extra) -> None:
                rec = dict(N=shape[0], K=shape[1], M=shape[2], method=method, us=seconds * 1e6,
                           weight_GBps=wbytes / seconds / 1e9,
                           TFLOPs=shape[3] / seconds / 1e12, **extra)
                results.append(rec)
                print(row(rec), flush=True)

            w16 = make_weights(N, K, copies16, torch.bfloat16)
            record("bf16 F.linear", time_calls(F.linear, [(x, w) for w, _ in w16]), 2 * N * K)
            del w16
            args8 = [(x, w, s, in_scale) for w, s in w8]
            record("quantize only", time_calls(fp8._quantize, [(x, in_scale)] * len(w8)), 0)
            for backend in ("scaled_mm", "triton", None):
                t = time_calls(functools.partial(fp8.fp8_linear, backend=backend), args8)
                name = backend or "auto"
                if backend == "triton":
                    name += " " + fp8.gemm_config(M, N, K).tag()
                record(name, t, N * K)
            if sweep:
                best = None
                w_ref = w8[0][0].float()
                y_ref = ref.fp8_linear(x.float(), w8[0][0], w8[0][1], in_scale, None, w_ref)
                for cfg in sweep_configs(M):
                    try:
                        t = time_calls(functools.partial(fp8.triton_fp8_linear, config=cfg),
                                       args8)
                        err = float("nan")
                        if M in ERR_MS and not cfg.fuse_quant:  # float32 out: the sum's error
                            y = fp8.triton_fp8_linear(x.float(), w8[0][0], w8[0][1], in_scale,
                                                      config=cfg)
                            err = ((y - y_ref).abs().amax(1) / y_ref.abs().amax(1)).max().item()
                    except Exception as e:  # a config that does not compile or fit
                        print(f"   {cfg.tag()}: {type(e).__name__} {str(e)[:120]}", flush=True)
                        continue
                    record(f"sweep {cfg.tag()} p{cfg.promote_k} err {err:.1e}", t, N * K,
                           rel_err=err)
                    if best is None or t < best[0]:
                        best = (t, cfg)
                del w_ref
                if best is not None:
                    print(f"   best triton: {best[1].tag()} {best[0] * 1e6:.2f} us", flush=True)
        del w8
        torch.cuda.empty_cache()
    return results


def summary(results: list[dict]) -> None:
    """One line per (shape, M): us of each method and which the dispatch picked."""
    by = {}
    for r in results:
        if r["method"].startswith("sweep"):
            continue
        by.setdefault((r["N"], r["K"], r["M"]), {})[r["method"].split(" ")[0]] = r
    print(f"\n{'N':>6} {'K':>6} {'M':>5} {'bf16':>9} {'quant':>7} {'scaled_mm':>10} "
          f"{'triton':>9} {'auto':>9}   auto GB/s  TFLOP/s   (times in us)")
    for (N, K, M), d in by.items():
        us = {k: d[k]["us"] for k in d}
        print(f"{N:6d} {K:6d} {M:5d} {us.get('bf16', 0):9.2f} {us.get('quantize', 0):7.2f} "
              f"{us.get('scaled_mm', 0):10.2f} {us.get('triton', 0):9.2f} "
              f"{us.get('auto', 0):9.2f}   {d['auto']['weight_GBps']:8.0f} "
              f"{d['auto']['TFLOPs']:8.1f}")


def probe() -> None:
    """What torch._scaled_mm accepts with rowwise scales here, and the copy bandwidth."""
    w, ws = make_weights(256, 512, 1, fp8.FP8)[0]
    for M in (1, 64):
        xq, xs = fp8.quantize_fp8_per_token(torch.randn(M, 512, device="cuda"))
        for out in (torch.bfloat16, torch.float16, torch.float32):
            for bias in (None, torch.bfloat16, out):
                try:
                    b = None if bias is None else torch.zeros(256, device="cuda", dtype=bias)
                    torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=b,
                                     out_dtype=out)
                    ok = "ok"
                except Exception as e:
                    ok = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"probe _scaled_mm rowwise M={M} out={out} bias={bias}: {ok}")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_calls(dst.copy_, [(src,)] * 4)
    print(f"probe device copy: {2 * src.numel() / t / 1e9:.0f} GB/s (read + write)", flush=True)


def _scaled(x, w, scale_a, scale_b):
    return torch._scaled_mm(x, w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def _mm(x, w):
    return torch.mm(x, w.t())


def run_scaling(ms: list[int], shapes: list[tuple[int, int]]) -> list[dict]:
    """The GEMM alone (inputs quantized beforehand), torch._scaled_mm with rowwise scales (a
    scale per token and per weight row: kiln's default scheme) against tensorwise ones (one
    scale each: static activations over per-tensor weights, as TensorRT-LLM's FP8
    checkpoints hold), and bf16 torch.mm: whether per-tensor scaling buys GEMM speed."""
    results = []
    for N, K in shapes:
        copies = max(2, math.ceil(ROTATE_BYTES / (N * K)))
        w8 = make_weights(N, K, copies, fp8.FP8)
        w16 = [(w.to(torch.bfloat16) * 0.02, None) for w, _ in w8[:max(2, copies // 2)]]
        one = torch.ones(1, device="cuda")
        for M in ms:
            xq, xs = fp8.quantize_fp8_per_token(torch.randn(M, K, device="cuda"))
            x16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            variants = {  # name: (function, its argument tuples, one a weight copy)
                "rowwise": (_scaled, [(xq, w, xs, s.view(1, N)) for w, s in w8]),
                "tensorwise": (_scaled, [(xq, w, one, one) for w, _ in w8]),
                "bf16 mm": (_mm, [(x16, w) for w, _ in w16]),
            }
            for name, (fn, args) in variants.items():
                try:
                    t = time_calls(fn, args)
                except Exception as e:
                    print(f"{N} {K} {M} {name}: {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                rec = dict(N=N, K=K, M=M, method=name, us=t * 1e6,
                           weight_GBps=N * K * (2 if name == "bf16 mm" else 1) / t / 1e9,
                           TFLOPs=2.0 * M * N * K / t / 1e12)
                results.append(rec)
                print(row(rec), flush=True)
        del w8, w16
        torch.cuda.empty_cache()
    return results


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fp8_gemm.json")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="all", help="all or N:K,N:K")
    ap.add_argument("--sweep", action="store_true", help="also time every Triton config")
    ap.add_argument("--static", action="store_true", help="static input scale")
    ap.add_argument("--probe", action="store_true", help="only probe _scaled_mm and copy GB/s")
    ap.add_argument("--scaling", action="store_true",
                    help="_scaled_mm rowwise vs tensorwise vs bf16, GEMM alone")
    ap.add_argument("--grid", action="store_true",
                    help="the decode tile over a grid of launches, GEMM alone (default --ms 1)")
    ap.add_argument("--swap", action="store_true",
                    help="with --grid: the swapped-operand launches (kiln.kernels.fp8_swap)")
    args = ap.parse_args(argv)
    if args.probe:
        probe()
        return
    ms = [int(m) for m in args.ms.split(",")]
    shapes = SHAPES if args.shapes == "all" else [
        tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    start = time.time()
    if args.scaling:
        results = run_scaling(ms, shapes)
    elif args.grid:
        results = run_grid([1] if args.ms == ",".join(map(str, MS)) else ms, shapes, args.swap)
    else:
        results = run(ms, shapes, args.sweep, args.static)
        summary(results)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       static=args.static, results=results), f, indent=1)
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
