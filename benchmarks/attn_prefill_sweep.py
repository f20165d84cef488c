"""Paged prefill attention over a grid of launches, against SDPA on the same shapes (one
causal prompt, K/V contiguous for SDPA), on a GPU: what issue #12's "prefill attention
>= 1.0x SDPA" needs first is the best launch per shape.

    python benchmarks/attn_prefill_sweep.py OUT.json [--lengths 4096,8192,16384]

Launch: block_m (query rows a program: tokens x the 4 query heads of a KV head), block_n
(keys a step), pipeline stages, warps, and the tile order (heavy_first: the longest
causal rows start first). Every launch's output is checked against the default launch's
before it is timed. Llama-3.1-8B heads (32 query / 8 KV, d 128), bf16 and fp8 caches.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kiln.kernels.attention_prefill import paged_attention_prefill
from kiln.kernels.bench import HEAD_DIM, HEADS, KV_HEADS, _paged, _quantized

LAUNCHES = [dict(block_m=bm, block_n=bn, num_stages=st, num_warps=w, heavy_first=h)
            for bm, bn, st, w, h in itertools.product((64, 128), (32, 64, 128), (2, 3), (4, 8),
                                                      (False, True))
            if not (bm == 64 and w == 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args()
    scale = HEAD_DIM ** -0.5
    results = []
    for n in (int(v) for v in args.lengths.split(",")):
        q, k_cache, v_cache, tables, starts = _paged([n], [n])
        qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        flops = 4 * n * (n + 1) / 2 * HEADS * HEAD_DIM
        q4 = q.view(1, n, HEADS, HEAD_DIM).transpose(1, 2)
        k4 = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=q.dtype)
        sdpa_ms = do_bench(partial(F.scaled_dot_product_attention, q4, k4, torch.randn_like(k4),
                                   is_causal=True, scale=scale, enable_gqa=True),
                           warmup=25, rep=args.rep_ms, return_mode="median")
        print(f"{n} tokens: SDPA {sdpa_ms:.4f} ms ({flops / sdpa_ms / 1e9:.0f} TFLOP/s)",
              flush=True)
        caches = {"bf16": (k_cache, v_cache, None, None)}
        (k8, ks), (v8, vs) = _quantized(k_cache, torch.float8_e4m3fn), \
            _quantized(v_cache, torch.float8_e4m3fn)
        caches["fp8"] = (k8, v8, ks, vs)
        for kv, (k, v, ks, vs) in caches.items():
            run = partial(paged_attention_prefill, q, k, v, tables, qsl, lens, n, scale,
                          k_scale=ks, v_scale=vs)
            want = run()
            rows = []
            for launch in [{}] + LAUNCHES:
                try:
                    got = run(**launch)
                    err = (got.float() - want.float()).abs().max().item()
                    ms = do_bench(partial(run, **launch), warmup=10, rep=args.rep_ms,
                                  return_mode="median")
                except Exception as e:  # past the shared memory or registers of the card
                    print(f"  {kv} {launch}: {type(e).__name__}", flush=True)
                    continue
                row = dict(tokens=n, kv=kv, launch=launch or "default", ms=ms,
                           tflops=flops / ms / 1e9, vs_sdpa=sdpa_ms / ms, max_err=err)
                rows.append(row)
                if err > 0.05:
                    print(f"  {kv} {launch}: output differs from the default by {err}")
            rows.sort(key=lambda r: r["ms"])
            default = next(r for r in rows if r["launch"] == "default")
            for r in [default] + rows[:5]:
                print(f"  {kv:4s} {str(r['launch']):90s} {r['ms']:8.4f} ms "
                      f"{r['tflops']:5.0f} TFLOP/s {r['vs_sdpa']:.2f}x SDPA", flush=True)
            results += [dict(r, sdpa_ms=sdpa_ms) for r in rows]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
