"""Prefill attention at the prompt mixes an engine step holds (several prompts at once, or
one alone), default launch against a few others: whether the best launch depends on how
many programs the grid has (one 1k prompt: 256 programs; 16 of them: 4,096).

    python benchmarks/attn_prefill_batch.py OUT.json
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
from triton.testing import do_bench

from kiln.kernels.attention_prefill import paged_attention_prefill
from kiln.kernels.bench import HEAD_DIM, HEADS, _paged, _quantized

CASES = [(1, 1024), (1, 2048), (2, 1024), (4, 1024), (16, 1024), (1, 4096), (4, 4096)]
LAUNCHES = [{}, {"num_warps": 8}, {"block_n": 128, "num_stages": 2, "num_warps": 8},
            {"block_m": 64, "block_n": 64, "num_stages": 2, "num_warps": 4}]


def main() -> None:
    scale = HEAD_DIM ** -0.5
    rows = []
    for prompts, n in CASES:
        q, k_cache, v_cache, tables, starts = _paged([n] * prompts, [n] * prompts)
        qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
        lens = torch.full((prompts,), n, dtype=torch.int32, device="cuda")
        flops = prompts * 4 * n * (n + 1) / 2 * HEADS * HEAD_DIM
        (k8, ks), (v8, vs) = _quantized(k_cache, torch.float8_e4m3fn), \
            _quantized(v_cache, torch.float8_e4m3fn)
        for kv, (k, v, a, b) in {"bf16": (k_cache, v_cache, None, None),
                                 "fp8": (k8, v8, ks, vs)}.items():
            run = partial(paged_attention_prefill, q, k, v, tables, qsl, lens, n, scale,
                          k_scale=a, v_scale=b)
            want = run()
            line = []
            for launch in LAUNCHES:
                err = (run(**launch).float() - want.float()).abs().max().item()
                ms = do_bench(partial(run, **launch), warmup=10, rep=40, return_mode="median")
                rows.append(dict(prompts=prompts, tokens=n, kv=kv, launch=launch or "default",
                                 ms=ms, tflops=flops / ms / 1e9, max_err=err))
                line.append(f"{ms * 1e3:7.1f}")
            print(f"{prompts:2d} x {n:5d} {kv:4s} us: " + " ".join(line), flush=True)
    print("launches:", LAUNCHES)
    with open(sys.argv[1], "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
