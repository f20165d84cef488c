"""Batch-1 W4A16 / W8A16 GEMV launches at Llama-3.1-8B shapes against bf16 cuBLAS, on a
GPU: time per call (inside a CUDA graph, as decode runs, each call on another copy of
the weight so that it comes from HBM, not L2) and the weight bytes read per second; each
shape over a small grid of launch configs (block_n, block_k, split_k, warps, stages, and
whether the next K step's loads are issued first: a sixth field 1; the scales applied
once a word: a seventh; x read as one vector a word: an eighth; the K splits summed by
the last one instead of float32 atomics: a ninth; integer dp4a products on x's digit
planes: a tenth; the K loop software-pipelined: an eleventh; int4 products in bfloat16
pairs, kiln.kernels.int_gemv_pairs: a twelfth) and kiln's own choice ("auto").

    python benchmarks/int_gemv_bench.py OUT.json [--pairs]

--pairs: int4 only, kiln's choice against the pairs GEMV over its launches.
"""

from __future__ import annotations

import json
import os
import sys

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


# Weights of a shape are cycled through copies of at least this many bytes in all, so
# that every call reads HBM as decode does, not the 50 MB L2 (one int4 QKV is 14 MB:
# timed alone, the same copy stays in L2 and the kernel looks faster than it runs).
COLD_BYTES = 256 * 2**20


def n_copies(nbytes: int) -> int:
    return max(1, min(32, -(-COLD_BYTES // nbytes)))


def timed(fn, reps: int = 20, rounds: int = 10) -> float:
    """Median microseconds per call, `reps` calls captured in one graph; fn: one
    callable, or a list called in turn (each on its own copy of the weight)."""
    fns = fn if isinstance(fn, list) else [fn]
    reps = max(reps, len(fns))
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def weight_copies(weight, scale, offset, nbytes: int) -> list:
    """(weight, scale, offset) and clones of it, COLD_BYTES in all."""
    return [(weight, scale, offset)] + [
        (weight.clone(), scale.clone(), None if offset is None else offset.clone())
        for _ in range(n_copies(nbytes) - 1)]


def int_weight(N: int, K: int, bits: int, group: int | None = None,
               offsets: bool | None = None):
    """Random CUDA storage (weight, scale, offset, bytes): int4 in groups of 128 with
    offsets, int8 per channel (group: another group size, 0 per channel; offsets: with or
    without, by default int4's)."""
    from kiln.kernels.reference import pack_int4

    group = (128 if bits == 4 else K) if group is None else group or K
    offsets = bits == 4 if offsets is None else offsets
    if bits == 4:
        weight = pack_int4(torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda"))
    else:
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    scale = torch.rand(N, K // group, device="cuda") * 0.01
    offset = -8 * scale if offsets else None
    nbytes = weight.numel() * weight.element_size() + scale.numel() * 4 * (
        2 if offset is not None else 1)
    return weight, scale, offset, nbytes


def main() -> None:
    from kiln.kernels import int_gemm

    args = [a for a in sys.argv[1:] if a != "--pairs"]
    out_path = args[0] if args else "int_gemv.json"
    pairs = "--pairs" in sys.argv
    results = []
    for name, (N, K) in SHAPES.items():
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w16s = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                for _ in range(n_copies(N * K * 2))]
        us = timed([lambda w=w: x @ w.T for w in w16s])  # noqa: B023 (called at once)
        results.append(dict(shape=name, N=N, K=K, kind="bf16", config="cublas", us=us,
                            gbps=N * K * 2 / us / 1e3))
        print(f"{name:8s} bf16 cublas {us:8.1f} us {N * K * 2 / us / 1e3:7.0f} GB/s", flush=True)
        for bits in (4,) if pairs else (4, 8):
            weight, scale, offset, nbytes = int_weight(N, K, bits)
            want = int_gemm.int_weight_linear(x.float(), weight, scale, offset)
            copies = weight_copies(weight, scale, offset, nbytes)
            # the plain kernel (the default before the fourteenth session; with prefetch),
            # then the factored one around the measured best (64 x 128, 8 K splits): more
            # splits, stages, warps, and the K splits summed in the kernel (ninth field,
            # fixup: no zeroing and no cast launch) instead of by atomics
            configs = ["auto", "32,256,4,4,3", "32,256,4,4,3,1"]
            configs += [f"{c},1,{xv},{fix}" for c in (
                "64,128,8,4,3,0", "64,128,16,4,3,0", "64,128,8,4,4,0", "64,128,8,8,3,0",
                "64,128,8,4,3,1", "32,256,4,4,3,0", "32,256,8,4,3,0", "32,128,8,4,3,0",
                "64,256,8,4,3,0", "128,128,8,8,3,0") for xv, fix in ((1, 0), (1, 1))]
            # one K step a program (the most loads in flight: 64 x 128 at K 4096 is 32
            # splits, 2,048 programs), summed by atomics or by the last split
            configs += [f"{c},0,1,1,{fix}" for c in ("64,128,32,4,3", "32,256,16,4,3",
                                                     "64,128,64,4,3") for fix in (0, 1)]
            # the K loop software-pipelined (an eleventh field: the words copied by cp.async
            # stages - 1 steps ahead; slower at every shape and launch of seven in the
            # seventeenth session), kiln's two launches pipelined, for the A/B
            configs += [f"{c},0,1,1,{fix},0,1" for c, fix in (("64,128,8,4,3", 0),
                                                              ("32,256,4,4,3", 1))]
            # integer dp4a products on x's three digit planes (kiln.kernels.int_gemv_digits,
            # a tenth field: one more launch a call for the digits; ~2x slower unpipelined,
            # sixteenth session), plain and pipelined
            configs += [f"{c},0,0,0,0,1,{p}" for c in ("64,128,8,4,3", "128,128,8,8,3")
                        for p in (0, 1)]
            # one K split (no atomics, zeroing or cast launches; untimed)
            configs += [f"{c},0,1,1,0" for c in ("32,256,1,4,3", "32,128,1,4,3", "16,256,1,4,3")]
            if pairs:  # int4 products in bfloat16 pairs (a twelfth field), by K atomics or
                # fixup; the eighteenth session's best, then untimed: K loops
                # software-pipelined (cp.async, the eleventh field), one K split (no
                # atomics, zeroing or cast launches), 8 warps
                configs = ["auto"] + [f"{c},0,1,1,{fix},0,{pipe},1" for c, fix, pipe in (
                    ("32,256,4,4,3", 0, 0), ("32,256,4,4,3", 1, 0), ("64,128,16,4,3", 1, 0),
                    ("64,256,8,4,3", 1, 0), ("128,128,8,8,3", 1, 0), ("32,256,4,4,3", 0, 1),
                    ("32,256,4,4,4", 0, 1), ("32,256,4,4,3", 1, 1), ("64,128,16,4,3", 1, 1),
                    ("64,128,8,4,4", 1, 1), ("64,128,8,8,3", 0, 1), ("32,256,1,4,3", 0, 0),
                    ("32,128,1,4,3", 0, 0), ("16,256,1,4,3", 0, 0), ("32,256,1,4,3", 0, 1),
                    ("64,128,8,8,3", 0, 0), ("64,128,8,8,3", 1, 0), ("32,256,4,8,3", 0, 0),
                    ("64,128,16,8,3", 1, 0))]
            for cfg in configs:
                os.environ.pop("KILN_INT_GEMV1", None)
                if cfg != "auto":
                    os.environ["KILN_INT_GEMV1"] = cfg
                try:
                    got = int_gemm.int_weight_linear(x, weight, scale, offset)
                    err = ((got.float() - want).norm() / want.norm()).item()
                    us = timed([lambda c=c: int_gemm.int_weight_linear(x, *c)  # noqa: B023
                                for c in copies])
                except Exception as e:  # a config past the hardware's limits
                    print(f"{name:8s} int{bits} {cfg}: {type(e).__name__}", flush=True)
                    continue
                results.append(dict(shape=name, N=N, K=K, kind=f"int{bits}", config=cfg,
                                    us=us, gbps=nbytes / us / 1e3, rel_err=err))
                print(f"{name:8s} int{bits} {cfg:14s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s"
                      f" err {err:.1e}", flush=True)
            os.environ.pop("KILN_INT_GEMV1", None)
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    best = {}
    for r in results:
        key = (r["shape"], r["kind"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per shape:")
    for (shape, kind), r in best.items():
        print(f"{shape:8s} {kind:5s} {r['config']:14s} {r['us']:8.1f} us {r['gbps']:7.0f} GB/s")


if __name__ == "__main__":
    main()
