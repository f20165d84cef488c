"""Probe: do a decode step's GEMMs and its decode attention overlap on one GPU?

FP8 1000 / 1000 spends its decode steps about half in decode attention (bound by reading
the KV cache) and a third in FP8 GEMMs (bound by tensor-core FLOPs at ~500 rows); kiln
runs them one after another, so the floor in BENCHMARKS.md adds them up. Splitting a
step's batch in two halves and running one half's attention beside the other half's
GEMMs (two streams, NanoFlow-style nano-batches) could beat that floor, but only if the
two kinds of kernel really share the card. This measures it before anything is built:
per decoder layer of Llama-3.1-8B (FP8 W8A8 + e4m3 KV cache, or bf16 for both; random
values),

    gemms(rows)  the layer's four GEMMs (qkv, o, gate_up, down) at `rows` rows
    attn(rows)   decode attention of `rows` sequences at a `ctx`-token context

and times, each as a CUDA graph replayed many times:
    serial     gemms(B) then attn(B) on one stream (what a step does today; the attention
               over both halves' caches)
    halves     gemms(B/2), attn(B/2), gemms(B/2), attn(B/2) on one stream
    overlap    halves, each half's attention on a second stream beside the other half's
               GEMMs (layer L's second half beside layer L + 1's first; fork / join by
               events), as a two-half nano-batched step would run

    python benchmarks/overlap_probe.py OUT.json [--rows 512] [--ctx 1536,256] [--layers 8]
        [--formats fp8,bf16]

overlap / serial < 1 is what nano-batching could gain at best (it ignores the extra
small kernels and the split's own costs). On an H200 (twenty-third session) it came out
at 1.06-1.23x (slower than serial) for FP8 and bf16 at 256 and 1536 tokens, and kiln's
nano-batched steps were slower end to end: removed (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from fp8_gemm import time_calls  # benchmarks/ is on the path when run as a script

from kiln.kernels.attention_decode import paged_attention_decode
from kiln.kernels.fp8 import scaled_mm_fp8_linear
from kiln.kernels.fp8_quant import FP8Act, quantize_fp8_per_token

H, INTER, Q_HEADS, KV_HEADS, D, BLOCK = 4096, 14336, 32, 8, 128, 16
DEVICE = "cuda"
SHAPES = [(6144, H), (H, H), (2 * INTER, H), (H, INTER)]  # (N, K): qkv, o, gate_up, down


def weight(n: int, k: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(n, k, device=DEVICE) * 0.02
    if not fp8:
        return w.to(torch.bfloat16), None
    scale = w.abs().amax(dim=1) / 448.0
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale.float().contiguous()


def activations(rows: int, fp8: bool) -> dict:
    x = torch.randn(rows, H, device=DEVICE, dtype=torch.bfloat16)
    inter = torch.randn(rows, INTER, device=DEVICE, dtype=torch.bfloat16)
    if fp8:
        x, inter = (FP8Act(*quantize_fp8_per_token(t), torch.bfloat16) for t in (x, inter))
    return dict(x=x, inter=inter)


class Layer:
    """One layer's weights (FP8 W8A8 or bf16), its GEMM inputs for the whole batch and for
    each half, and each half's KV cache (e4m3 or bf16)."""

    def __init__(self, rows: int, ctx: int, fp8: bool) -> None:
        self.fp8 = fp8
        self.weights = [weight(n, k, fp8) for n, k in SHAPES]
        self.whole = activations(rows, fp8)
        self.halves = [dict(activations(rows // 2, fp8), **self._cache(rows // 2, ctx))
                       for _ in range(2)]

    def _cache(self, rows: int, ctx: int) -> dict:
        blocks = -(-ctx // BLOCK)
        cache = torch.randn(rows * blocks, BLOCK, KV_HEADS, D, device=DEVICE) * 0.5
        dtype = torch.float8_e4m3fn if self.fp8 else torch.bfloat16
        scales = torch.ones(KV_HEADS, device=DEVICE) if self.fp8 else None
        return dict(
            q=torch.randn(rows, Q_HEADS, D, device=DEVICE, dtype=torch.bfloat16),
            k=cache.to(dtype), v=cache.flip(0).to(dtype), scales=scales,
            tables=torch.randperm(rows * blocks, device=DEVICE, dtype=torch.int32).view(rows, -1),
            lens=torch.full((rows,), ctx, device=DEVICE, dtype=torch.int32))

    def gemms(self, part: dict) -> None:
        for (w, ws), (_n, k) in zip(self.weights, SHAPES):
            x = part["inter"] if k == INTER else part["x"]
            if self.fp8:
                scaled_mm_fp8_linear(x, w, ws)
            else:
                torch.nn.functional.linear(x, w)

    @staticmethod
    def attn(half: dict) -> None:
        paged_attention_decode(half["q"], half["k"], half["v"], half["tables"], half["lens"],
                               D ** -0.5, k_scale=half["scales"], v_scale=half["scales"])


def variants(layers: list[Layer]) -> dict[str, float]:
    second = torch.cuda.Stream()

    def serial() -> None:
        for layer in layers:  # the whole batch's GEMMs, then attention (both halves' caches)
            layer.gemms(layer.whole)
            for h in layer.halves:
                layer.attn(h)

    def halves() -> None:
        for layer in layers:
            for h in layer.halves:
                layer.gemms(h)
                layer.attn(h)

    def overlap() -> None:
        # each half's attention beside the other half's GEMMs: attn(a, L) with gemms(b, L),
        # attn(b, L) with gemms(a, L + 1), as a two-half pipeline over the layers would run
        main = torch.cuda.current_stream()
        layers[0].gemms(layers[0].halves[0])
        for i, layer in enumerate(layers):
            a, b = layer.halves
            for attn_half, gemm_layer, gemm_half in (
                    (a, layer, 1), (b, layers[i + 1] if i + 1 < len(layers) else None, 0)):
                second.wait_stream(main)
                with torch.cuda.stream(second):
                    layer.attn(attn_half)
                if gemm_layer is not None:
                    gemm_layer.gemms(gemm_layer.halves[gemm_half])
                main.wait_stream(second)

    def gemms_only() -> None:
        for layer in layers:
            layer.gemms(layer.whole)

    def attn_only() -> None:
        for layer in layers:
            for h in layer.halves:
                layer.attn(h)

    return {name: time_calls(fn, [()]) * 1e3 for name, fn in (
        ("gemms", gemms_only), ("attn", attn_only), ("serial", serial), ("halves", halves),
        ("overlap", overlap))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", default="1536,256")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--formats", default="fp8,bf16")
    args = ap.parse_args()
    results = []
    for fmt, ctx in itertools.product(args.formats.split(","),
                                      (int(c) for c in args.ctx.split(","))):
        layers = [Layer(args.rows, ctx, fmt == "fp8") for _ in range(args.layers)]
        t = variants(layers)
        row = dict(format=fmt, rows=args.rows, ctx=ctx, layers=args.layers, **t,
                   overlap_vs_serial=t["overlap"] / t["serial"],
                   ideal=max(t["gemms"], t["attn"]) / t["serial"])
        results.append(row)
        print(f"{fmt} rows {args.rows} ctx {ctx} ({args.layers} layers, ms): "
              f"gemms {t['gemms']:.3f} "
              f"attn {t['attn']:.3f} serial {t['serial']:.3f} halves {t['halves']:.3f} "
              f"overlap {t['overlap']:.3f} -> {row['overlap_vs_serial']:.3f}x serial "
              f"(perfect overlap {row['ideal']:.3f}x)", flush=True)
        del layers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
