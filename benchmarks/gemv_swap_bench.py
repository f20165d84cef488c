"""The swapped 16-bit decode linear (kiln.kernels.gemv_swap) against what a bf16 decode
step runs today, at Llama-3.1-8B shapes, one H100 / H200:

    python benchmarks/gemv_swap_bench.py [out.json] [--ms 1] [--grid] [--budget 300]

Per (layer, M), us a call from CUDA-graph replays over enough weight copies (>= 512 MB)
that no call finds its weight in L2 (benchmarks/fp8_gemm.time_calls):
- cublas: F.linear alone; unfused: the kernel before it too (kiln's add+RMSNorm for QKV
  and gate-up, SiLU*mul for down), as a decode step runs them;
- swap: the swapped GEMV alone (default launch, then --grid's launches, best three shown);
- fused: the swapped GEMV with that kernel in its prologue (default launch and the
  plain grid's best three); fused-prepass: the norm's sums of squares in a pass before
  the GEMM rather than beside it (gemv_swap's late_norm=False), default launch.
So "fused vs unfused" is what a layer would save; each swap result is checked against
F.linear of the same (unfused) input: max |diff| / max |ref| per row is printed as err.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from fp8_gemm import ROTATE_BYTES, make_weights, time_calls

from kiln.kernels import gemv_swap as gs
from kiln.kernels import rms_norm, silu_mul

DEVICE = "cuda"  # "cpu" for a dry run under TRITON_INTERPRET=1
LAYERS = {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, None),
          "gate_up": (28672, 4096, "norm"), "down": (4096, 14336, "silu")}


def grid() -> list[gs.SwapConfig]:
    out = []
    for bw, bk in ((64, 128), (128, 128), (64, 256), (128, 64), (256, 64)):
        for stages in (4, 6, 8, 12):
            if bw * bk * 2 * stages > 200 * 1024:  # shared memory of the weight ring
                continue
            for split in (1, 2, 4):
                out.append(gs.SwapConfig(bw, bk, 4, stages, split))
    return out


def err_of(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().amax(1) / ref.float().abs().amax(1)).max().item()


def prologue_fns(pro: str | None, x, r, nw):
    """(unfused(w), fused(w, cfg), a): the kernel before the GEMM plus F.linear, the same
    in the swapped GEMV's prologue, and the GEMM's (unfused) input."""
    if pro == "norm":
        def unfused(w):
            return F.linear(rms_norm.add_rms_norm(x, r, nw, 1e-5)[0], w)

        def fused(w, cfg, late=True):
            return gs.gemv_swap(x, w, residual=r, norm_weight=nw, eps=1e-5, config=cfg,
                                late_norm=late)[0]
        return unfused, fused, rms_norm.add_rms_norm(x, r, nw, 1e-5)[0]
    if pro == "silu":
        def unfused(w):
            return F.linear(silu_mul.silu_and_mul(x), w)

        def fused(w, cfg, late=True):
            return gs.gemv_swap(x, w, act=gs.ACT_SILU, config=cfg)
        return unfused, fused, silu_mul.silu_and_mul(x)
    return None, None, x


def bench_case(name: str, ws: list[torch.Tensor], M: int, with_grid: bool,
               budget: float) -> list[dict]:
    """Every timing of one (layer, M); prints the summary line."""
    N, K, pro = LAYERS[name]
    g = torch.Generator(device=DEVICE).manual_seed(M)
    x = torch.randn(M, 2 * K if pro == "silu" else K, device=DEVICE, generator=g,
                    dtype=torch.bfloat16)
    r = torch.randn(M, K, device=DEVICE, generator=g, dtype=torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(K, device=DEVICE, generator=g)).to(torch.bfloat16)
    unfused, fused, a = prologue_fns(pro, x, r, nw)
    ref = F.linear(a, ws[0])
    rows: list[dict] = []
    calls = [(w,) for w in ws]

    def record(method, fn, cfg=None, check=None):
        try:
            t = time_calls(fn, calls)
            e = err_of(check(), ref) if check else 0.0
        except Exception as exc:  # a launch that does not compile or fit
            print(f"   {method}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
            return
        rows.append(dict(layer=name, N=N, K=K, M=M, method=method, us=t * 1e6,
                         GBps=2 * N * K / t / 1e9, err=e, config=cfg.tag() if cfg else None))

    record("cublas", lambda w: F.linear(a, w))
    if unfused:
        record("unfused", unfused)
    default = gs.swap_config(M, N, K)
    configs = [default] + ([c for c in grid() if c != default] if with_grid else [])
    t0 = time.time()
    for cfg in configs:
        if cfg is not default and time.time() - t0 > budget:
            print("   grid budget spent", flush=True)
            break
        record(f"swap {cfg.tag()}", lambda w, c=cfg: gs.gemv_swap(a, w, config=c), cfg,
               lambda c=cfg: gs.gemv_swap(a, ws[0], config=c))
    swaps = sorted((r for r in rows if r["method"].startswith("swap")), key=lambda r: r["us"])
    if fused:
        best = {r["config"] for r in swaps[:3]}
        for cfg in [default] + [c for c in configs if c.tag() in best and c != default]:
            record(f"fused {cfg.tag()}", lambda w, c=cfg: fused(w, c), cfg,
                   lambda c=cfg: fused(ws[0], c))
        if pro == "norm":  # the norm's sums of squares in a pass before the GEMM instead
            record("fused-prepass", lambda w: fused(w, default, False), None,
                   lambda: fused(ws[0], default, False))
    fuseds = sorted((r for r in rows if r["method"].startswith("fused")), key=lambda r: r["us"])
    line = [f"{name:8s} M={M}: " + ", ".join(f"{r['method']} {r['us']:.2f}" for r in rows
                                             if r["config"] is None)]
    for label, best_rows in (("swap", swaps), ("fused", fuseds)):
        if best_rows:
            line.append(f"{label} " + ", ".join(f"{r['config']} {r['us']:.2f} "
                                                f"(err {r['err']:.0e})" for r in best_rows[:3]))
    print("; ".join(line), flush=True)
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="gemv_swap.json")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the grid")
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    start = time.time()
    results = []
    layers = args.layers.split(",")
    for name in layers:
        N, K, _ = LAYERS[name]
        ws = [w for w, _ in make_weights(N, K, max(2, math.ceil(ROTATE_BYTES / (2 * N * K))),
                                         torch.bfloat16)]
        for M in [int(m) for m in args.ms.split(",")]:
            results += bench_case(name, ws, M, args.grid, args.budget / len(layers))
        del ws
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after each layer: a cut run keeps what it timed
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           results=results), f, indent=1)
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
