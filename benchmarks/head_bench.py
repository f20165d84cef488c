"""The LM head in integers on a GPU: bf16 cuBLAS against kiln's W8A16 / W4A16 Triton path
(kiln.functional.int_weight_linear, what IntWeightMethod runs) in the layouts a head can
hold: int8 per channel (`--quantize-lm-head int8_wo`), int8 groups of 32 (a GGUF Q8_0
head kept: what CPU builds keep and CUDA builds do not yet), int4 groups of 32 with
offsets (Q4_0 / Q4_1) and of 128 (`int4_wo --quantize-lm-head`); microseconds a call in a
CUDA graph (int_gemv_bench.timed), each variant checked against its dequantized weight.

    python benchmarks/head_bench.py OUT.json [--rows 1,8,64]
"""

from __future__ import annotations

import argparse
import json

import torch
from int_gemv_bench import timed

HEADS = {"llama-3.1-8b": (128256, 4096), "qwen2.5-7b": (152064, 3584),
         "smollm2-135m": (49152, 576)}
LAYOUTS = {"int8 per channel": (8, 0), "int8 g32 (Q8_0)": (8, 32),
           "int4 g32 offset (Q4_1)": (4, 32), "int4 g128 offset": (4, 128)}


def storage(n: int, k: int, bits: int, group: int):
    from kiln.kernels.reference import pack_int4

    groups = k // (group or k)
    if bits == 4:
        weight = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"))
        scale = torch.rand(n, groups, device="cuda") * 0.01 + 1e-3
        return weight, scale, -8 * scale
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    return weight, torch.rand(n, groups, device="cuda") * 0.01 + 1e-3, None


def main() -> None:
    from kiln import functional as KF
    from kiln.kernels.reference import dequantize_int_weight

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="1,8,64")
    args = ap.parse_args()
    results = []
    print(f"{'head':14s}{'rows':>5}  {'layout':24s}{'us':>9}{'vs bf16':>9}", flush=True)
    for name, (n, k) in HEADS.items():
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        stores = {layout: storage(n, k, *spec) for layout, spec in LAYOUTS.items()}
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = timed(lambda x=x, w=w16: torch.nn.functional.linear(x, w))
            rows = [("bf16 cuBLAS", base)]
            for layout, (weight, scale, offset) in stores.items():
                got = KF.int_weight_linear(x, weight, scale, offset).float()
                want = x.float() @ dequantize_int_weight(weight, scale, offset).float().T
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err < 2e-2, (name, m, layout, err)
                rows.append((layout, timed(lambda x=x, w=weight, s=scale, o=offset:
                                           KF.int_weight_linear(x, w, s, o))))
            for layout, us in rows:
                results.append(dict(head=name, rows=m, layout=layout, us=us, vs_bf16=base / us))
                print(f"{name:14s}{m:>5}  {layout:24s}{us:9.1f}{base / us:8.2f}x", flush=True)
        del w16, stores
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
