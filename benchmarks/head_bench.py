"""The LM head in integers on a GPU: bf16 cuBLAS against kiln's W8A16 / W4A16 Triton path
(kiln.functional.int_weight_linear, what IntWeightMethod runs) in the layouts a head can
hold: int8 per channel (`--quantize-lm-head int8_wo`), int8 groups of 32 (a GGUF Q8_0
head kept: what CPU builds keep and CUDA builds do not yet), int4 groups of 32 with
offsets (Q4_0 / Q4_1) and of 128 (`int4_wo --quantize-lm-head`); microseconds a call in a
CUDA graph (int_gemv_bench.timed), each variant checked against its dequantized weight.

    python benchmarks/head_bench.py OUT.json [--rows 1,8,64] [--layers] [--only g32,g16]
        [--cold]

--layers: the same layouts on Llama-3.1-8B's decoder linears (a kept GGUF's layers: Q4_0
/ Q4_1 as int4 g32, Q8_0 as int8 g32, K-quant mixes as int8 g16 with offsets), and the
layer's sum (the four linears) per layout. --only: the layouts whose names hold one of
these words (bf16 always). --cold: each timing cycles through copies of the weight (256
MB in all, as int_gemv_bench does), so weights that fit the L2 cache (an H100's 50 MB:
the 8B's o and qkv, in bf16 too) are read from HBM; without it (the 47th and 48th
sessions' tables) one weight is read again and again.
"""

from __future__ import annotations

import argparse
import json

import torch
from int_gemv_bench import int_weight, n_copies, timed, weight_copies

HEADS = {"llama-3.1-8b": (128256, 4096), "qwen2.5-7b": (152064, 3584),
         "smollm2-135m": (49152, 576)}
# --layers: Llama-3.1-8B's decoder linears, as a kept GGUF file's layers hold them
LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
LAYOUTS = {"int8 per channel": (8, 0), "int8 g32 (Q8_0)": (8, 32),
           "int8 g16 offset (K mix)": (8, 16), "int4 g32 offset (Q4_1)": (4, 32),
           "int4 g128 offset": (4, 128)}


def main() -> None:
    from kiln import functional as KF
    from kiln.kernels.reference import dequantize_int_weight

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--layers", action="store_true", help="the 8B decoder's linears")
    ap.add_argument("--only", default="", help="layouts whose names hold one of these words")
    ap.add_argument("--cold", action="store_true", help="weights read from HBM (copies)")
    args = ap.parse_args()
    words = [w for w in args.only.split(",") if w]
    shapes = LAYERS if args.layers else HEADS
    results = []
    print(f"{'shape':14s}{'rows':>5}  {'layout':24s}{'us':>9}{'vs bf16':>9}", flush=True)
    for name, (n, k) in shapes.items():
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        stores = {layout: int_weight(n, k, bits, group, "offset" in layout)
                  for layout, (bits, group) in LAYOUTS.items() if k % (group or k) == 0
                  and (not words or any(w in layout for w in words))}
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16s = [w16] + [w16.clone() for _ in range(
                n_copies(w16.numel() * 2) - 1 if args.cold else 0)]
            base = timed([lambda x=x, w=w: torch.nn.functional.linear(x, w) for w in bf16s])
            del bf16s
            rows = [("bf16 cuBLAS", base)]
            for layout, (weight, scale, offset, nbytes) in stores.items():
                got = KF.int_weight_linear(x, weight, scale, offset).float()
                want = x.float() @ dequantize_int_weight(weight, scale, offset).float().T
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err < 2e-2, (name, m, layout, err)
                copies = weight_copies(weight, scale, offset, nbytes) if args.cold else \
                    [(weight, scale, offset)]
                rows.append((layout, timed([lambda x=x, c=c: KF.int_weight_linear(x, *c)
                                            for c in copies])))
                del copies
            for layout, us in rows:
                results.append(dict(head=name, rows=m, layout=layout, us=us, vs_bf16=base / us))
                print(f"{name:14s}{m:>5}  {layout:24s}{us:9.1f}{base / us:8.2f}x", flush=True)
        del w16, stores
        torch.cuda.empty_cache()
    if args.layers:  # a decoder layer: its four linears summed
        sums: dict[tuple[int, str], float] = {}
        for r in results:
            sums[r["rows"], r["layout"]] = sums.get((r["rows"], r["layout"]), 0.0) + r["us"]
        for (m, layout), us in sums.items():
            base = sums[m, "bf16 cuBLAS"]
            results.append(dict(head="layer", rows=m, layout=layout, us=us, vs_bf16=base / us))
            print(f"{'layer':14s}{m:>5}  {layout:24s}{us:9.1f}{base / us:8.2f}x", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
