"""One-row int4 GEMV (kiln.kernels.int_gemv_pairs) launches at Llama-3.1-8B shapes, on a
GPU: kiln's default ("auto") against larger K steps (more weight bytes in flight a
program: the kernel is bound by memory latency at ~40% of the copy bandwidth) and the K
loop software-pipelined, every split summed in the kernel (fixup). Microseconds a call in
a CUDA graph, weights cycled through copies (read from HBM); results printed as they come
and written to OUT.json after each shape.

    python benchmarks/int4_row_sweep.py OUT.json [--shapes gate_up,down,qkv,o]
        [--bits 4|8 --group G --offsets]

--bits 8 / --group: other layouts (int8: the float GEMV, factored, x as vectors; e.g. a
kept GGUF file's Q8_0 `--bits 8 --group 32`, Q4_0 / Q4_1 `--group 32`, K-quant mixes
`--bits 8 --group 16 --offsets`).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from int_gemv_bench import SHAPES, int_weight, timed, weight_copies

from kiln.kernels import int_gemm
from kiln.kernels.int_launch import IntGemmConfig

SMS = 132


def launches(N: int, K: int) -> list[tuple[int, int, int, int, bool]]:
    """(block_n, block_k, split_k, warps, pipelined): K splits giving about one or two
    waves of 4 programs an SM."""
    out = []
    for bn in (16, 32, 64):
        for bk in (256, 512, 1024):
            blocks = triton.cdiv(N, bn)
            splits = sorted({max(1, min(K // bk, triton.next_power_of_2(
                max(1, round(t * SMS / blocks))))) for t in (4, 8)})
            for split in splits:
                for warps in ((2, 4) if bn == 16 else (4, 8)):
                    out.append((bn, bk, split, warps, False))
                if bk == 256:
                    out.append((bn, bk, split, 4, True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shapes", default="gate_up,down,qkv,o")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group", type=int, default=128, help="0: per channel")
    ap.add_argument("--offsets", action="store_true", help="int8 with offsets (int4: always)")
    args = ap.parse_args()
    pairs = args.bits == 4
    results = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        weight, scale, offset, nbytes = int_weight(N, K, args.bits, args.group,
                                                   pairs or args.offsets)
        want = int_gemm.int_weight_linear(x.float(), weight, scale, offset)
        copies = weight_copies(weight, scale, offset, nbytes)
        layout = f"int{args.bits} g{args.group}" + (" offsets" if offset is not None else "")
        rows = []
        for launch in [None] + launches(N, K):
            cfg = launch and IntGemmConfig(
                0, launch[0], launch[1], launch[3], 3, split_k=launch[2], factored=True,
                xvec=True, fixup=launch[2] > 1, pairs=pairs, pipeline=launch[4])
            try:
                got = int_gemm.int_weight_linear(x, weight, scale, offset, config=cfg)
                err = ((got.float() - want).norm() / want.norm()).item()
                us = timed([lambda a=x, c=cfg, w=w: int_gemm.int_weight_linear(a, *w, config=c)
                            for w in copies])
            except Exception as e:  # past the card's registers or shared memory
                print(f"{name} {launch}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            r = dict(shape=name, config=str(launch or "auto"), us=us, rel_err=err, layout=layout,
                     tbps=nbytes / us / 1e6)
            rows.append(r)
            print(f"{name:8s} {r['config']:32s} {us:7.1f} us {r['tbps']:.2f} TB/s "
                  f"err {err:.1e}", flush=True)
        rows.sort(key=lambda r: r["us"])
        print(f"== {name}: auto {next(r['us'] for r in rows if r['config'] == 'auto'):.1f} us,"
              f" best {rows[0]['config']} {rows[0]['us']:.1f} us", flush=True)
        results += rows
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
