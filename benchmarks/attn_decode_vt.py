"""Attention over an e4m3 KV cache whose V blocks are stored transposed ([blocks, KV heads,
d, block_size], tokens fastest; KILN_KV_V_TRANSPOSED=1) against the usual [blocks,
block_size, KV heads, d] layout: kiln's decode and prefill kernels on both.

Why: kiln's e4m3 decode reads its cache at ~3.4 TB/s where a bf16 cache reaches 4.3, and
the compiled main loop says where the difference goes (sm_90, kiln's e4m3 launch, per
64-key tile and thread): K reaches the MMA by 8 ldmatrix loads and 64 conversions (its
reduction dim, d, is contiguous in the cache), but V, reduced over tokens that are 1 KiB
bytes apart, by 128 single-byte shared-memory loads (LDS.U8) and their addressing: 1,179
instructions a tile against 634 for a bf16 cache. With tokens fastest inside each block,
read as [blocks, d, block_size] (rows of 16 contiguous bytes) and laid out as [d, keys]
(kiln.kernels.paged.load_v_transposed), V reaches the MMA by ldmatrix too: 718
instructions a tile (`--sass`), 184 registers, no spills.

    python benchmarks/attn_decode_vt.py OUT.json [--decode 512x1536,496x256,...]
        [--prefill 1x1024,16x1000,1x8192] [--kv int8]
    python benchmarks/attn_decode_vt.py --sass     (no GPU: main-loop SASS counts, sm_90)
    python benchmarks/attn_decode_vt.py OUT.json --sweep [--decode ...] [--kv int8] [--splits 8]
        (decode launches on the transposed layout: 32-128 keys a tile, 2-8 warps, 2-4
        stages, blocks a tile ahead or not; kiln's launch was tuned on the usual layout,
        with 253 registers where the transposed loop takes 184)

Llama-3.1-8B heads (32 / 8, d 128), 16-token blocks, one split a sequence in decode (the
shapes are chosen so that the launcher picks one split too); prefill: causal prompts with
nothing cached before them. Each output is checked against the usual layout's first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import torch

from kiln.kernels.attention_decode import paged_attention_decode
from kiln.kernels.attention_prefill import paged_attention_prefill

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def make_case(lens: list[int], q_lens: list[int], kv: str = "e4m3"):
    """q, 1-byte K / V caches (e4m3 or int8; V also transposed), tables, query starts,
    lengths, per-head scales."""
    per_seq = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(per_seq) + 1
    k = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda")
    v = torch.randn_like(k)
    top = 448 if kv == "e4m3" else 127
    k_scale = (k.abs().amax(dim=(0, 1, 3)) / top).contiguous()
    v_scale = (v.abs().amax(dim=(0, 1, 3)) / top).contiguous()

    def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x / scale[:, None]
        return x.to(torch.float8_e4m3fn) if kv == "e4m3" else \
            x.round().clamp(-127, 127).to(torch.int8)

    k8, v8 = quantize(k, k_scale), quantize(v, v_scale)
    del k, v
    vt8 = v8.permute(0, 2, 3, 1).contiguous()
    order = torch.randperm(num_blocks - 1, device="cuda").int()
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32, device="cuda")
    for i, used in enumerate(per_seq):
        tables[i, :used], order = order[:used], order[used:]
    starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, k8, v8, vt8, tables, starts, seq_lens, k_scale, v_scale


def sass() -> None:
    """Main-loop SASS of the decode kernel on both layouts, compiled for sm_90 (no GPU)."""
    from kiln.kernels import attention_decode
    from kiln.kernels.compile_check import main_loop_sass

    args = {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "qk_scale": 0.1, "k_scale_ptr": "*fp32",
            "v_scale_ptr": "*fp32", "stride_qh": 128, "stride_oh": 128, "stride_kb": 16384,
            "stride_ks": 1024, "stride_kh": 128, "stride_bt": 511,
            "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv", "part_out_ptr": "*fp32",
            "part_lse_ptr": "*fp32", "window": 4096, "softcap": 72.1, "alibi_ptr": "*fp32",
            "cos_sin_ptr": "*fp32", "stride_cs": 128}
    shape = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_N": 64,
             "BLOCK_D": 128, "DOT_PREC": "tf32", "WINDOW": False, "SOFTCAP": False,
             "ALIBI": False, "ROPE_K": False, "NUM_SPLITS": 1, "PREFETCH": 1}
    for name, v_t in (("usual layout", False), ("V transposed", True)):
        counts = main_loop_sass(attention_decode._decode_kernel, args, {**shape, "V_T": v_t},
                                2, 3)
        print(f"{name}: {sum(counts.values())} instructions a 64-key tile; "
              + ", ".join(f"{op} {n}" for op, n in counts.most_common(12)))


def sweep(args: argparse.Namespace, time_calls) -> None:
    """Decode launches on the transposed layout, each checked against kiln's launch on the
    usual layout, timed by CUDA-graph replays; the best per shape printed first."""
    import itertools

    scale = HEAD_DIM ** -0.5
    launches = list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), (0, 1)))
    results = []
    for spec in filter(None, args.decode.split(",")):
        batch, ctx = (int(x) for x in spec.split("x"))
        q, k8, v8, vt8, tables, starts, lens, ks, vs = make_case([ctx] * batch, [1] * batch,
                                                                 args.kv)
        common = dict(num_splits=args.splits, k_scale=ks, v_scale=vs)
        want = paged_attention_decode(q, k8, v8, tables, lens, scale, **common).float()
        cache_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM
        rows = [dict(batch=batch, ctx=ctx, launch="kiln, usual layout", ms=1e3 * time_calls(
            partial(paged_attention_decode, q, k8, v8, tables, lens, scale, **common), [()]))]
        rows.append(dict(batch=batch, ctx=ctx, launch="kiln, V transposed", ms=1e3 * time_calls(
            partial(paged_attention_decode, q, k8, vt8, tables, lens, scale, **common), [()])))
        for block_n, warps, stages, prefetch in launches:
            name = f"{block_n} keys, {warps} warps, {stages} stages, prefetch {prefetch}"
            fn = partial(paged_attention_decode, q, k8, vt8, tables, lens, scale, **common,
                         block_n=block_n, num_warps=warps, num_stages=stages,
                         prefetch=prefetch, heads_per_program=1)
            try:
                err = (fn().float() - want).abs().max().item()
            except Exception as e:  # shared memory, registers
                print(f"{batch} x {ctx} {name}: {type(e).__name__}: {str(e)[:100]}",
                      flush=True)
                continue
            if err > 0.05:
                print(f"{batch} x {ctx} {name}: differs by {err:.3f}; not timed", flush=True)
                continue
            rows.append(dict(batch=batch, ctx=ctx, launch=name, ms=1e3 * time_calls(fn, [()])))
        rows.sort(key=lambda r: r["ms"])
        for r in rows[:12] + [r for r in rows[12:] if r["launch"].startswith("kiln")]:
            print(f"decode {batch:4d} x {ctx:5d} {r['launch']:42s} {r['ms']:.4f} ms "
                  f"({cache_bytes / r['ms'] / 1e6:5.0f} GB/s)", flush=True)
        results += rows
        del q, k8, v8, vt8
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "kv": args.kv,
                       "results": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--decode", default="512x1536,496x256,496x192,256x1024,64x8192")
    ap.add_argument("--prefill", default="1x1024,16x1000,1x8192")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kv", choices=("e4m3", "int8"), default="e4m3",
                    help="the 1-byte cache (int8: SmoothQuant engines' KV)")
    ap.add_argument("--splits", type=int, default=1,
                    help="--sweep: context splits (a power of two; the engine takes 8 at batch "
                         "1 with a 2048-token limit: attention_decode.choose_num_splits)")
    args = ap.parse_args()
    if args.sass:
        sass()
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from fp8_gemm import time_calls  # CUDA-graph replays

    if args.sweep:
        sweep(args, time_calls)
        return

    scale = HEAD_DIM ** -0.5
    results = []
    for kind, specs in (("decode", args.decode), ("prefill", args.prefill)):
        for spec in filter(None, specs.split(",")):
            batch, ctx = (int(x) for x in spec.split("x"))
            q_lens = [1 if kind == "decode" else ctx] * batch
            q, k8, v8, vt8, tables, starts, lens, ks, vs = make_case([ctx] * batch, q_lens,
                                                                     args.kv)
            if kind == "decode":
                run = {"usual": partial(paged_attention_decode, q, k8, v8, tables, lens, scale,
                                        num_splits=1, k_scale=ks, v_scale=vs),
                       "V transposed": partial(paged_attention_decode, q, k8, vt8, tables,
                                               lens, scale, num_splits=1, k_scale=ks,
                                               v_scale=vs)}
            else:
                run = {name: partial(paged_attention_prefill, q, k8, cache, tables, starts,
                                     lens, ctx, scale, k_scale=ks, v_scale=vs)
                       for name, cache in (("usual", v8), ("V transposed", vt8))}
            want = run["usual"]().float()
            err = (run["V transposed"]().float() - want).abs().max().item()
            row = dict(kind=kind, batch=batch, ctx=ctx, max_diff=err)
            cache_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM
            for name, fn in run.items():
                row[name] = ms = time_calls(fn, [()]) * 1e3
                extra = "" if name == "usual" else f"  max diff {err:.1e}"
                print(f"{kind:7s} {batch:4d} x {ctx:5d} {name:13s} {ms:.4f} ms "
                      f"({cache_bytes / ms / 1e6:5.0f} GB/s of cache){extra}", flush=True)
            row["speedup"] = row["usual"] / row["V transposed"]
            results.append(row)
            del q, k8, v8, vt8
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "kv": args.kv,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
