"""Decode attention over a paged KV cache: cache layout x dtype x launch config, on one GPU.

    python benchmarks/attn_decode_sweep.py out.json                    # bf16 and e4m3
    KILN_E4M3_NATIVE=0 python benchmarks/attn_decode_sweep.py out_int.json # e4m3 only, each
    KILN_E4M3_NATIVE=k python benchmarks/attn_decode_sweep.py out_k.json   # e4m3 conversion
    SWEEP_MAXNREG=0,168,128 python benchmarks/attn_decode_sweep.py out.json  # register caps
    SWEEP_CONFIGS="64,2,2;64,2,4" ...                          # (block_n, stages, warps) only
    SWEEP_SHAPES="496x192;496x128" SWEEP_LAYOUTS=nhd ...      # other shapes, one layout
    SWEEP_PREFETCH=0,1 ...                                    # the kernel's PREFETCH
    SWEEP_HEADS=1,2,4 ...                   # KV heads a program (attention_decode_heads)
    SWEEP_DTYPES=bf16,fp8,int8 ...                            # cache dtypes (int8 too)
    SWEEP_SPLITS=8 SWEEP_SHAPES="1x256;1x512" ...   # context splits as the engine takes them
                                      # at batch 1 with a 2048-token limit (default: from ctx)
    SWEEP_BS=64 ...                         # tokens a cache block (kiln build --block-size)
    SWEEP_TIMER=do_bench ...      # time Python-launched calls, as sessions before the 33rd did

Each launch is timed in a CUDA graph that calls it over copies of the cache (>= 512 MB in
all, so no call finds its K/V in L2), as the engine's decode graphs call it: launched from
Python one by one (triton's do_bench), a call takes at least its CPU launch time, so
kernels shorter than that were timed by the CPU (the likely reason the 33rd session's
sweep timed 1 x 16,000 keys slower than 1 x 32,000 at every launch, ~100 us against ~52).

SWEEP_MAXNREG adds a register cap (ptxas maxnreg; 0 = none) to every 1-byte-cache config:
1-byte caches are latency-bound at 255 registers a thread (BENCHMARKS.md, twentieth
session), and a cap fits more programs an SM at the price of spills.

Layouts: `nhd` = [blocks, block_size, kv_heads, d] (a token's heads side by side) and
`hnd` = the same indices over memory laid out [blocks, kv_heads, block_size, d] (a block of
one head contiguous), passed to the kernel as a transposed view. Block tables are random
permutations (a fragmented pool). Prints the best config per (shape, layout, dtype) and
writes every timing as JSON. GB/s counts the K and V bytes of the contexts once.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from functools import partial

import torch
from fp8_gemm import time_calls
from triton.testing import do_bench

from kiln.kernels.attention_decode import (
    choose_num_splits,
    decode_config,
    paged_attention_decode,
)

HEADS, KV_HEADS, D = 32, 8, 128
BS = int(os.environ.get("SWEEP_BS", "16"))  # tokens a cache block (the engine's default: 16)
SHAPES = [(512, 1536), (256, 1024), (64, 8192), (1, 1024)]
# SWEEP_SHAPES="496x192;496x128": other (batch, context) pairs (e.g. 128 / 128's decode)
if os.environ.get("SWEEP_SHAPES"):
    SHAPES = [tuple(int(x) for x in s.split("x"))
              for s in os.environ["SWEEP_SHAPES"].split(";")]
LAYOUTS = os.environ.get("SWEEP_LAYOUTS", "nhd,hnd").split(",")
# SWEEP_PREFETCH="0,1": this PREFETCH for every config (default: decode_config's)
PREFETCH = [int(p) for p in os.environ["SWEEP_PREFETCH"].split(",")] \
    if os.environ.get("SWEEP_PREFETCH") else [None]
# SWEEP_CONFIGS="64,2,2;128,2,2": only these (block_n, stages, warps), for a short run
CONFIGS = [tuple(int(x) for x in c.split(",")) for c in os.environ["SWEEP_CONFIGS"].split(";")] \
    if os.environ.get("SWEEP_CONFIGS") else \
    list(itertools.product((32, 64, 128), (2, 3, 4), (2, 4, 8)))
CAPS = [int(c) for c in os.environ.get("SWEEP_MAXNREG", "0").split(",")]
TIMER = os.environ.get("SWEEP_TIMER", "graph")
COPY_BYTES = 512 << 20  # K/V bytes a graph's calls read in all (H200's L2: 50 MB)
HEADS_PER = [int(h) for h in os.environ.get("SWEEP_HEADS", "1").split(",")]
# SWEEP_SPLITS=8: that many context splits (the engine's count follows from its static
# context limit, not the context: choose_num_splits); default: the launcher's for ctx
SPLITS = int(os.environ.get("SWEEP_SPLITS", "0")) or None


def make(batch: int, ctx: int, layout: str, dtype: torch.dtype):
    blocks_per = -(-ctx // BS)
    n = batch * blocks_per + 1
    shape = (n, KV_HEADS, BS, D) if layout == "hnd" else (n, BS, KV_HEADS, D)
    k = torch.randn(shape, device="cuda").to(dtype)
    v = torch.randn(shape, device="cuda").to(dtype)
    if layout == "hnd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    tables = torch.randperm(n - 1, device="cuda")[: batch * blocks_per].view(batch, blocks_per)
    tables = tables.to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v, tables, lens


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "attn_decode_sweep.json"
    mode = os.environ.get("KILN_E4M3_NATIVE", "1")  # see kiln.kernels.paged
    dtypes = {"fp8": torch.float8_e4m3fn} if mode != "1" else {"bf16": torch.bfloat16,
                                                               "fp8": torch.float8_e4m3fn}
    if os.environ.get("SWEEP_DTYPES"):  # e.g. "bf16,fp8,int8"
        every = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
        dtypes = {n: every[n] for n in os.environ["SWEEP_DTYPES"].split(",")}
    rows = []
    ones = torch.ones(KV_HEADS, device="cuda")
    for (batch, ctx), layout, (name, dt) in itertools.product(SHAPES, LAYOUTS, dtypes.items()):
        nbytes = 2 * batch * ctx * KV_HEADS * D * dt.itemsize
        copies = min(256, -(-COPY_BYTES // nbytes)) if TIMER == "graph" else 1
        sets = [make(batch, ctx, layout, dt) for _ in range(copies)]
        scales = dict(k_scale=ones, v_scale=ones) if dt.itemsize == 1 else {}
        best = None
        caps = CAPS if dt.itemsize == 1 else [0]
        for (block_n, stages, warps), cap, pre, per in itertools.product(CONFIGS, caps,
                                                                          PREFETCH, HEADS_PER):
            try:
                fn = partial(paged_attention_decode, scale=0.088,
                             block_n=block_n, num_stages=stages, num_warps=warps,
                             max_registers=cap, prefetch=pre, heads_per_program=per,
                             num_splits=SPLITS, **scales)
                ms = time_calls(fn, sets) * 1e3 if TIMER == "graph" else \
                    do_bench(partial(fn, *sets[0]), warmup=10, rep=60, return_mode="median")
            except Exception as e:  # noqa: BLE001 -- out of shared memory etc.
                print(f"  skip {block_n},{stages},{warps},{cap}: {type(e).__name__}")
                continue
            row = dict(batch=batch, ctx=ctx, layout=layout, dtype=name, e4m3_mode=mode,
                       splits=SPLITS, block_size=BS,
                       block_n=block_n, stages=stages, warps=warps, maxnreg=cap,
                       prefetch=decode_config(dt, D)[3] if pre is None else pre,
                       heads_per_program=per, ms=ms,
                       gbps=nbytes / ms / 1e6)
            rows.append(row)
            print(f"  B={batch} ctx={ctx} {layout} {name} {block_n},{stages},{warps} "
                  f"maxnreg={cap} prefetch={row['prefetch']} heads={per}: "
                  f"{ms * 1e3:.1f} us ({row['gbps']:.0f} GB/s)", flush=True)
            if best is None or ms < best["ms"]:
                best = row
        if best is None:
            print(f"B={batch:4d} ctx={ctx:5d} {layout} {name}: no config ran", flush=True)
            continue
        width = -(-ctx // BS) * BS  # what kiln launches for this cache and width
        splits = SPLITS or choose_num_splits(batch, KV_HEADS, width, torch.device("cuda"))
        n, stages, warps, pre = decode_config(
            dt, D, split_tokens=-(-width // splits) if splits > 1 else None, context=width)
        default = next((r for r in rows[::-1] if (r["batch"], r["ctx"], r["layout"],
                        r["dtype"], r["block_n"], r["stages"], r["warps"], r["maxnreg"],
                        r["prefetch"], r["heads_per_program"]) ==
                        (batch, ctx, layout, name, n, stages, warps, 0, pre, 1)), None)
        shown = "n/a" if default is None else \
            f"{default['ms']:.3f} ms ({default['gbps']:.0f} GB/s)"
        print(f"B={batch:4d} ctx={ctx:5d} {layout} {name} (e4m3 mode {mode}): "
              f"kiln's config {shown}  best {best['ms']:.3f} ms ({best['gbps']:.0f} GB/s) "
              f"at n={best['block_n']} stages={best['stages']} warps={best['warps']} "
              f"maxnreg={best['maxnreg'] or 'none'} prefetch={best['prefetch']} "
              f"heads/program={best['heads_per_program']}",
              flush=True)
        sets = None
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
