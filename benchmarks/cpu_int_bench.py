"""kiln's CPU integer GEMM (kiln/kernels/cpu_int.c) against the float32 GEMMs a
dequantized engine runs, over one decode step's linears of a model shape.

    python benchmarks/cpu_int_bench.py [--rows 1 2 4 8 16 32 64] [--repeats 7] [--out F]
    KILN_CPU_INT_ISA=avx2 python benchmarks/cpu_int_bench.py ...   # the AVX2 build

The default shape is SmolLM2-135M as its GGUF (Q4_1) stores it: 30 layers of int4 group-32
QKV / O / gate-up / down with offsets, and the Q8_0 LM head as int8 group 32. Each variant
runs every layer once a step, steps back to back as decoding runs them (the weights stream
from memory; the first step warms up); the table gives the median ms a step, the spread,
and the kernel's speedup over oneDNN.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kiln import functional as KF
from kiln.kernels import cpu_int
from kiln.kernels.reference_quant import dequantize_int_weight, pack_int4

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def make(n: int, k: int, bits: int, group: int) -> dict:
    groups = k // group
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        weight, offset = pack_int4(q), -torch.rand(n, groups) * 0.05
    else:
        weight, offset = torch.randint(-127, 128, (n, k), dtype=torch.int8), None
    scale = torch.rand(n, groups) * 0.01
    w = dequantize_int_weight(weight, scale, offset).contiguous()
    return {"tiled": cpu_int.TiledWeight(weight, scale, offset), "float": w,
            "packed": KF.pack_cpu_weight(w), "k": k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="cpu_int_bench.json")
    args = ap.parse_args()
    if not cpu_int.available():
        raise SystemExit("kiln's CPU integer GEMM is not available here (see "
                         "kiln/kernels/cpu_int.py: AVX-512F or AVX2, and a C compiler)")
    torch.manual_seed(0)
    shapes = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    print(f"making {LAYERS} layers of int4 weights and their float32 copies ...", flush=True)
    layers = [make(n, k, 4, 32) for _ in range(LAYERS) for n, k in shapes]
    layers.append(make(VOCAB, HIDDEN, 8, 32))
    variants = {
        "kernel": lambda lay, x: lay["tiled"](x),
        "onednn": lambda lay, x: KF.linear(x, lay["float"], None, lay["packed"]),
        "plain": lambda lay, x: torch.nn.functional.linear(x, lay["float"]),
    }
    results = []
    print(f"{'rows':>5}{'kernel ms':>11}{'oneDNN ms':>11}{'plain ms':>10}{'speedup':>9}  "
          "(median of repeats, min-max)")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (HIDDEN, INTER)}
        for lay in layers[:4]:  # same values as the float32 GEMM, up to the order of sums
            ref = xs[lay["k"]].double() @ lay["float"].double().T
            err = (lay["tiled"](xs[lay["k"]]).double() - ref).abs().max().item()
            bound = (xs[lay["k"]] @ lay["float"].T).double().sub(ref).abs().max().item()
            assert err <= 8 * bound + 1e-5, (m, err, bound)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, fn in variants.items():  # steps back to back, as decoding runs them
            for repeat in range(args.repeats + 1):
                start = time.perf_counter()
                for lay in layers:
                    fn(lay, xs[lay["k"]])
                if repeat:  # the first pass warms up
                    times[name].append((time.perf_counter() - start) * 1e3)
        row = {"rows": m}
        for name, ts in times.items():
            row[name] = {"median_ms": round(statistics.median(ts), 2),
                         "min_ms": round(min(ts), 2), "max_ms": round(max(ts), 2)}
        row["speedup_vs_onednn"] = round(row["onednn"]["median_ms"] /
                                         row["kernel"]["median_ms"], 2)
        results.append(row)
        k, o, p = (row[n] for n in variants)
        print(f"{m:>5}{k['median_ms']:>11.2f}{o['median_ms']:>11.2f}{p['median_ms']:>10.2f}"
              f"{row['speedup_vs_onednn']:>8.2f}x  kernel {k['min_ms']:.1f}-{k['max_ms']:.1f}, "
              f"oneDNN {o['min_ms']:.1f}-{o['max_ms']:.1f}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "isa": cpu_int.isa(),
                   "shape": "SmolLM2-135M Q4_1 + Q8_0 head",
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
