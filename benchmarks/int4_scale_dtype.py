"""Does a one-row int4 GEMV gain from 16-bit scales? Microseconds a call at Llama-3.1-8B
shapes, scales and offsets stored in float32 (kiln's layout) against float16 (the same
values rounded), through kiln's own dispatch (int_gemm.int_weight_linear, no config).

kiln stores an int4 group's scale and offset in float32: 8 bytes a group, 12.5% on top
of the weights' bytes in groups of 128 and 50% in groups of 32 (GGUF's Q4_0 / Q4_1
layouts, whose d and m are float16 in the file). In float16 that is 6.25% / 25%: a
GEMV bound by bytes would gain ~5.6% / ~17%. The pairs GEMV (kiln.kernels.int_gemv_pairs)
loads either dtype (its loader converts to float32; the float32 code is unchanged, same
SASS); the TMA GEMV (int4_gemv_tma, Gluon) reads float32 only, so time float16 with
KILN_INT4_GEMV_TMA=0 (every shape on the pairs GEMV), float32 both ways.

    python benchmarks/int4_scale_dtype.py OUT.json [--groups 128,32]
        [--dtypes float32,float16] [--shapes qkv,o,gate_up,down,head]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from int_gemv_bench import SHAPES, int_weight, timed, weight_copies

from kiln.kernels import int_gemm

ALL_SHAPES = {**SHAPES, "head": (128256, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--groups", default="128,32")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down,head")
    args = ap.parse_args()
    tma = os.environ.get("KILN_INT4_GEMV_TMA", "default")
    rows = []
    for group in (int(g) for g in args.groups.split(",")):
        for name in args.shapes.split(","):
            N, K = ALL_SHAPES[name]
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            weight, scale32, offset32, _ = int_weight(N, K, 4, group, True)
            scale32, offset32 = scale32.half().float(), offset32.half().float()
            want = int_gemm.int_weight_linear(x.float(), weight, scale32, offset32)
            for dtype in args.dtypes.split(","):
                scale, offset = scale32.to(getattr(torch, dtype)), \
                    offset32.to(getattr(torch, dtype))
                nbytes = weight.numel() + 2 * scale.numel() * scale.element_size()
                copies = weight_copies(weight, scale, offset, nbytes)
                got = int_gemm.int_weight_linear(x, weight, scale, offset)
                err = ((got.float() - want).norm() / want.norm()).item()
                us = timed([lambda a=x, w=w: int_gemm.int_weight_linear(a, *w) for w in copies])
                rows.append(dict(shape=name, group=group, dtype=dtype, tma=tma, us=us,
                                 mb=nbytes / 1e6, tbps=nbytes / us / 1e6, rel_err=err))
                print(f"g{group:<4} {name:8} {dtype:8} (KILN_INT4_GEMV_TMA={tma}) {us:8.2f} us "
                      f"{nbytes / 1e6:7.1f} MB {nbytes / us / 1e6:5.2f} TB/s err {err:.1e}",
                      flush=True)
            del copies, weight, scale32, offset32
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
