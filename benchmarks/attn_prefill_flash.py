"""Prompt attention, kiln's paths against SDPA's flash backend, on one GPU (issue #12's
"prefill attention >= 1.0x SDPA").

    python benchmarks/attn_prefill_flash.py OUT.json [--cases 4096,8192,32768,16x1000,8192@24576]
        [--kv e4m3]

A case is one prompt of N tokens ("8192"), P prompts of N tokens in one step ("16x1000":
a 1000 / 1000 prefill step), or a chunk of N tokens over a cached prefix of M ("8192@24576":
chunked prefill of a 32k prompt). Llama-3.1-8B heads (32 query / 8 KV, d 128), bf16, K / V
in a paged cache of 16-token blocks in shuffled order. Each variant is checked against the
first before it is timed (do_bench median, ms) and TFLOP/s counts the causal half:

- `sdpa flash, contiguous`: torch SDPA forced to the flash backend on contiguous K / V
  (no paging; whole prompts only, SDPA's causal mask is top-left);
- `flash op, contiguous`: the op kiln's flash path calls, on the same contiguous K / V;
- `kiln triton, paged`: kiln's Triton prefill kernel (the default);
- `kiln flash, paged`: kiln.kernels.attention_flash (KILN_PREFILL_FLASH=1), the gather of
  each layer included, the step's plan made once (as for 32 layers) and timed apart.

With --kv e4m3 the paged cache holds e4m3 values with a scale a KV head (FP8 KV engines;
the contiguous lines get the same values in bf16, so they time what the gather's
dequantization feeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def parse(case: str) -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens) of a case."""
    if "@" in case:
        n, prefix = (int(x) for x in case.split("@"))
        return [n], [n + prefix]
    count, _, n = case.rpartition("x")
    return [int(n)] * int(count or 1), [int(n)] * int(count or 1)


def setup(q_lens: list[int], seq_lens: list[int], dev: str = "cuda"):
    from kiln.layers.attention import AttentionMetadata

    dt = torch.bfloat16
    blocks = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(blocks)
    k_all = [torch.randn(s, KV_HEADS, HEAD_DIM, device=dev, dtype=dt) for s in seq_lens]
    v_all = [torch.randn_like(k) for k in k_all]
    order = torch.randperm(num_blocks, device=dev).int()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=dev)
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    for i, (s, used) in enumerate(zip(seq_lens, blocks)):
        tables[i, :used], order = order[:used], order[used:]
        slots = (tables[i, :used].long()[:, None] * BLOCK
                 + torch.arange(BLOCK, device=dev)).flatten()[:s]
        k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = k_all[i]
        v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots] = v_all[i]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, device=dev, dtype=dt)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long, device=dev),
        block_tables=tables, seq_lens=torch.tensor(seq_lens, device=dev).int(),
        query_start_loc=torch.tensor(starts, device=dev).int(), query_starts_host=starts,
        seq_lens_host=list(seq_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return q, k_all, v_all, k_cache, v_cache, meta


def variants(q_lens, seq_lens, kv: str = "bf16"):
    from kiln.kernels import attention_flash
    from kiln.kernels.attention_prefill import paged_attention_prefill

    q, k_all, v_all, k_cache, v_cache, meta = setup(q_lens, seq_lens)
    scale = HEAD_DIM ** -0.5
    scales = {}
    if kv == "e4m3":
        one = torch.ones(KV_HEADS, device="cuda")
        scales = dict(k_scale=one * 0.01, v_scale=one * 0.01)
        k_cache = (k_cache * 100).to(torch.float8_e4m3fn)
        v_cache = (v_cache * 100).to(torch.float8_e4m3fn)
        k_all = [(k * 100).to(torch.float8_e4m3fn).to(q.dtype) * 0.01 for k in k_all]
        v_all = [(v * 100).to(torch.float8_e4m3fn).to(q.dtype) * 0.01 for v in v_all]
    k_cat, v_cat = torch.cat(k_all), torch.cat(v_all)
    cu_k = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist(), device="cuda").int()
    out = {}
    if q_lens == seq_lens and len(set(q_lens)) == 1:  # SDPA: whole prompts of one length
        b, n = len(q_lens), q_lens[0]

        def sdpa():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    q.view(b, n, HEADS, HEAD_DIM).transpose(1, 2),
                    k_cat.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2),
                    v_cat.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2),
                    is_causal=True, scale=scale, enable_gqa=True
                ).transpose(1, 2).reshape(b * n, HEADS, HEAD_DIM)
        out["sdpa flash, contiguous"] = sdpa
    out["flash op, contiguous"] = partial(
        attention_flash._attend, q, k_cat, v_cat, meta.query_start_loc, cu_k, max(q_lens),
        max(seq_lens), scale, None, None)
    out["kiln triton, paged"] = partial(
        paged_attention_prefill, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
        meta.seq_lens, meta.max_query_len, scale, **scales)
    out["kiln flash, paged"] = partial(attention_flash.paged_attention_flash, q, k_cache,
                                       v_cache, meta, scale, **scales)

    def plan():
        meta.host_cache.clear()
        attention_flash.plan(meta, BLOCK, 0, None, q.device)
    flops = sum(4 * HEADS * HEAD_DIM * n * (s - n / 2) for n, s in zip(q_lens, seq_lens))
    return out, flops, plan


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--cases", default="1024,4096,8192,32768,16x1000,8192@24576")
    ap.add_argument("--kv", choices=["bf16", "e4m3"], default="bf16")
    args = ap.parse_args()
    results = []
    for case in args.cases.split(","):
        q_lens, seq_lens = parse(case)
        fns, flops, plan = variants(q_lens, seq_lens, args.kv)
        first = None
        for name, fn in fns.items():
            try:
                got = fn().float()
            except Exception as e:  # e.g. an op this torch lacks
                print(f"{case:>12} {name:<24} {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            if first is None:
                first = got
            err = (got - first).abs().max().item()
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            row = dict(case=case, kv=args.kv, variant=name, ms=ms, tflops=flops / ms / 1e9,
                       max_diff=err)
            results.append(row)
            print(f"{case:>12} {name:<24} {ms:9.4f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"(max |diff| {err:.3f})", flush=True)
        plan_ms = do_bench(plan, warmup=5, rep=50, return_mode="median")
        results.append(dict(case=case, variant="kiln flash plan (once a step)", ms=plan_ms))
        print(f"{case:>12} {'flash plan, once a step':<24} {plan_ms:9.4f} ms", flush=True)
        base = {r["variant"]: r["ms"] for r in results if r["case"] == case}
        ref = base.get("sdpa flash, contiguous") or base.get("flash op, contiguous")
        for name in ("kiln triton, paged", "kiln flash, paged"):
            if ref and name in base:
                print(f"{case:>12} {name:<24} {ref / base[name]:.2f}x of "
                      f"{'SDPA' if 'sdpa flash, contiguous' in base else 'the flash op'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
