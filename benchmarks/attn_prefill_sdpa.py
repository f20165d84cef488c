"""Prompt attention, kiln's Triton kernel against each of SDPA's backends, on one GPU
(issue #12's "prefill attention >= 1.0x SDPA").

    python benchmarks/attn_prefill_sdpa.py OUT.json [--cases 4096,8192,32768,16x1000,8192@24576]
        [--kv e4m3]

A case is one prompt of N tokens ("8192"), P prompts of N tokens in one step ("16x1000":
a 1000 / 1000 prefill step), or a chunk of N tokens over a cached prefix of M ("8192@24576":
chunked prefill of a 32k prompt). Llama-3.1-8B heads (32 query / 8 KV, d 128), bf16, K / V
in a paged cache of 16-token blocks in shuffled order. Each variant is checked against the
first before it is timed (do_bench median, ms) and TFLOP/s counts the causal half:

- `sdpa BACKEND, contiguous`: torch SDPA forced to one backend (flash, cudnn, efficient)
  and left to choose (default), on contiguous K / V (no paging; whole prompts only, SDPA's
  causal mask is top-left);
- `flash op, contiguous`: `aten._flash_attention_forward` over packed sequences, causal
  aligned to each context's end (so it also times chunks over a cached prefix);
- `kiln triton, paged`: kiln's Triton prefill kernel;
- `kiln sdpa, paged`: kiln.kernels.attention_sdpa (the default): whole prompts' own K / V
  gathered by the step's slot mapping, then SDPA (cuDNN) per run of equal lengths; a chunk
  over a cached prefix as two cuDNN calls (prefix, own) merged by their log-sum-exps
  (`kiln sdpa, K / V repeated`: the same with K / V heads repeated to the query heads).

With --kv e4m3 the paged cache holds e4m3 values with a scale a KV head (FP8 KV engines;
the contiguous lines get the same values in bf16).

The 39th session's FlashAttention-2 path over gathered paged K / V was timed here in the
40th (0.83x of the Triton kernel at 8k, TTFT +6.6%) and removed.
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
    slots = torch.cat([(tables[i, :used].long()[:, None] * BLOCK + torch.arange(
        BLOCK, device=dev)).flatten()[s - n:s]
        for i, (s, n, used) in enumerate(zip(seq_lens, q_lens, blocks))])
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables, seq_lens=torch.tensor(seq_lens, device=dev).int(),
        query_start_loc=torch.tensor(starts, device=dev).int(), query_starts_host=starts,
        seq_lens_host=list(seq_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return q, k_all, v_all, k_cache, v_cache, meta


def variants(q_lens, seq_lens, kv: str = "bf16"):
    from kiln.kernels.attention_prefill import paged_attention_prefill

    q, k_all, v_all, k_cache, v_cache, meta = setup(q_lens, seq_lens)
    scale = HEAD_DIM ** -0.5
    scales = {}
    if kv == "e4m3":
        one = torch.ones(KV_HEADS, device="cuda")
        scales = dict(k_scale=one * 0.02, v_scale=one * 0.02)
        k_cache = (k_cache * 50).to(torch.float8_e4m3fn)
        v_cache = (v_cache * 50).to(torch.float8_e4m3fn)
        k_all = [(k * 50).to(torch.float8_e4m3fn).to(q.dtype) * 0.02 for k in k_all]
        v_all = [(v * 50).to(torch.float8_e4m3fn).to(q.dtype) * 0.02 for v in v_all]
    k_cat, v_cat = torch.cat(k_all), torch.cat(v_all)
    cu_k = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist(), device="cuda").int()
    out = {}
    if q_lens == seq_lens and len(set(q_lens)) == 1:  # SDPA: whole prompts of one length
        b, n = len(q_lens), q_lens[0]

        def sdpa(backend):
            from torch.nn.attention import sdpa_kernel

            def call():
                return F.scaled_dot_product_attention(
                    q.view(b, n, HEADS, HEAD_DIM).transpose(1, 2),
                    k_cat.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2),
                    v_cat.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2),
                    is_causal=True, scale=scale, enable_gqa=True
                ).transpose(1, 2).reshape(b * n, HEADS, HEAD_DIM)

            if backend is None:
                return call

            def forced():
                with sdpa_kernel(backend):
                    return call()
            return forced
        from torch.nn.attention import SDPBackend
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("default", None)):
            out[f"sdpa {name}, contiguous"] = sdpa(backend)

    def flash_op():
        return torch.ops.aten._flash_attention_forward(
            q, k_cat, v_cat, meta.query_start_loc, cu_k, max(q_lens), max(seq_lens), 0.0,
            True, False, scale=scale)[0]
    out["flash op, contiguous"] = flash_op
    from kiln.kernels import attention_sdpa

    out["kiln sdpa, paged"] = partial(attention_sdpa.paged_attention_sdpa, q, k_cache, v_cache,
                                      meta, scale, **scales)
    if q_lens != seq_lens:  # chunks over a cached prefix: cuDNN given K / V heads repeated

        def repeated():
            attention_sdpa.CUDNN_GQA = False
            try:
                return attention_sdpa.paged_attention_sdpa(q, k_cache, v_cache, meta, scale,
                                                           **scales)
            finally:
                attention_sdpa.CUDNN_GQA = True
        out["kiln sdpa, K / V repeated"] = repeated
    out["kiln triton, paged"] = partial(
        paged_attention_prefill, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
        meta.seq_lens, meta.max_query_len, scale, **scales)
    flops = sum(4 * HEADS * HEAD_DIM * n * (s - n / 2) for n, s in zip(q_lens, seq_lens))
    return out, flops


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
        fns, flops = variants(q_lens, seq_lens, args.kv)
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
        base = {r["variant"]: r["ms"] for r in results if r["case"] == case}
        kiln = base.get("kiln triton, paged")
        for name, ms in base.items():
            if kiln and name != "kiln triton, paged":
                print(f"{case:>12} kiln triton, paged       {ms / kiln:.2f}x of {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
