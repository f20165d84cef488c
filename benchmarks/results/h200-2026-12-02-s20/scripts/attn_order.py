"""Decode attention: block-table locality and grid order (B=512 ctx 1536, and B=64 ctx 8192)."""
import sys, json
import torch
from triton.testing import do_bench
from kiln.kernels import attention_decode as ad
H, KVH, D, BS = 32, 8, 128, 16
rows = []
for batch, ctx in [(512, 1536), (64, 8192)]:
    bp = ctx // BS; n = batch * bp + 1
    for dname, dt in [("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8)]:
        def mk():
            x = torch.randn(n, BS, KVH, D, device="cuda") * 2
            return x.round().clamp(-100, 100).to(dt) if dt == torch.int8 else x.to(dt)
        k, v = mk(), mk()
        vt = v.permute(0, 2, 3, 1).contiguous() if dt != torch.int8 else None
        q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        ones = torch.ones(KVH, device="cuda")
        out = torch.empty_like(q)
        for tname in ("random", "sequential"):
            if tname == "random":
                tables = torch.randperm(n - 1, device="cuda")[: batch * bp].view(batch, bp).int()
            else:
                tables = torch.arange(batch * bp, device="cuda").view(batch, bp).int()
            configs = [(64, 4, 2)] if dt == torch.bfloat16 else [(128, 2, 2), (64, 2, 2), (64, 4, 2)]
            for head_first in (False, True):
                for use_vt in ((False, True) if vt is not None else (False,)):
                    for bn, w, st in configs:
                        vv = vt if use_vt else v
                        grid = (KVH, batch, 1) if head_first else (batch, KVH, 1)
                        def call():
                            ad._decode_kernel[grid](q, k, vv, out, out, out, tables, lens, 0.1, ones, ones,
                                q.stride(0), q.stride(1), out.stride(0), out.stride(1), k.stride(0), k.stride(1),
                                k.stride(2), tables.stride(0), 0, 0.0, lens, lens, 0, GROUP=4, HEAD_DIM=D,
                                BLOCK_SIZE=BS, BLOCK_G=16, BLOCK_N=bn, BLOCK_D=D, NUM_SPLITS=1, DOT_PREC="tf32",
                                WINDOW=False, SOFTCAP=False, ALIBI=False, num_warps=w, num_stages=st,
                                HEAD_FIRST=head_first, **({"VT": True} if use_vt else {}))
                        try:
                            ms = do_bench(call, warmup=10, rep=50, return_mode="median")
                        except Exception as e:
                            print("fail", dname, bn, w, st, type(e).__name__, str(e)[:80]); continue
                        gbps = 2 * batch * ctx * KVH * D * dt.itemsize / ms / 1e6
                        r = dict(batch=batch, ctx=ctx, dtype=dname, tables=tname, head_first=head_first, vt=use_vt,
                                 block_n=bn, warps=w, stages=st, ms=ms, gbps=gbps)
                        rows.append(r)
                        print(f"B={batch} ctx={ctx} {dname:5s} {tname:10s} head_first={head_first:d} vt={use_vt:d} "
                              f"{bn},{w},{st}: {ms:.3f} ms {gbps:.0f} GB/s", flush=True)
        del k, v, vt
        torch.cuda.empty_cache()
json.dump(rows, open(sys.argv[1], "w"), indent=1)
