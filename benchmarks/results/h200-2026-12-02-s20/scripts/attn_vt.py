"""Experiment: e4m3 decode attention variants (V^T cache layout, V words + cvt, fp8 MMA)."""
import itertools, json, sys
import torch
from functools import partial
from triton.testing import do_bench
from kiln.kernels import attention_decode as ad
from kiln.kernels.attention_decode import paged_attention_decode

H, KVH, D, BS = 32, 8, 128, 16
rows = []
orig = ad._decode_kernel

def run(q, k, v, tables, lens, flags, block_n, warps, stages, bg=None):
    ones = torch.ones(KVH, device="cuda")
    if flags:
        kern = orig
        # call kernel directly with extra constexprs
        num_seqs = q.shape[0]
        out = torch.empty_like(q)
        grid = (num_seqs, KVH, 1)
        kern[grid](q, k, v, out, out, out, tables, lens, 0.088 * 1.4426950408889634, ones, ones,
                   q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                   k.stride(0), k.stride(1), k.stride(2), tables.stride(0), 0, 0.0, lens, lens, 0,
                   GROUP=4, HEAD_DIM=D, BLOCK_SIZE=BS, BLOCK_G=bg or 16, BLOCK_N=block_n, BLOCK_D=D,
                   NUM_SPLITS=1, DOT_PREC="tf32", WINDOW=False, SOFTCAP=False, ALIBI=False,
                   num_warps=warps, num_stages=stages, **flags)
        return out
    return paged_attention_decode(q, k, v, tables, lens, 0.088, block_n=block_n, num_warps=warps,
                                  num_stages=stages, k_scale=ones, v_scale=ones, num_splits=1)

for batch, ctx in [(512, 1536), (256, 1024), (64, 8192)]:
    blocks_per = -(-ctx // BS)
    n = batch * blocks_per + 1
    k = (torch.randn(n, BS, KVH, D, device="cuda") * 2).to(torch.float8_e4m3fn)
    v = (torch.randn(n, BS, KVH, D, device="cuda") * 2).to(torch.float8_e4m3fn)
    vt = v.permute(0, 2, 3, 1).contiguous()  # [n, KVH, D, BS]
    tables = torch.randperm(n - 1, device="cuda")[: batch * blocks_per].view(batch, blocks_per).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    ref = run(q, k, v, tables, lens, {}, 64, 2, 2)
    nbytes = 2 * batch * ctx * KVH * D
    variants = {"base": ({}, v), "VT": ({"VT": True}, vt), "WCVT": ({"WCVT": True}, v),
                "VT+F8MMA": ({"VT": True, "F8MMA": True}, vt),
                "VT+F8MMA bg64": ({"VT": True, "F8MMA": True, "_bg": 64}, vt)}
    for name, (flags, vv) in variants.items():
        flags = dict(flags); bg = flags.pop("_bg", None)
        best = None
        for block_n, warps, stages in itertools.product((64, 128), (2, 4), (2, 3)):
            if bg and warps != 4:
                continue
            try:
                fn = partial(run, q, k, vv, tables, lens, flags, block_n, warps, stages, bg)
                out = fn()
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
            except Exception as e:
                print(f"  {name} {block_n},{warps},{stages}: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            row = dict(batch=batch, ctx=ctx, variant=name, block_n=block_n, warps=warps, stages=stages,
                       ms=ms, gbps=nbytes / ms / 1e6, rel_err=err)
            rows.append(row)
            if best is None or ms < best["ms"]:
                best = row
        if best:
            print(f"B={batch} ctx={ctx} {name:14s} best {best['ms']:.3f} ms {best['gbps']:.0f} GB/s "
                  f"n={best['block_n']} w={best['warps']} s={best['stages']} err={best['rel_err']:.2e}", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
