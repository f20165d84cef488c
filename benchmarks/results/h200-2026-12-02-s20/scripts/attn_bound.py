"""Is 1-byte decode attention bound on the SM side or the DRAM side? Same kernel, B=512 ctx 1536:
tables over the whole pool (DRAM) vs tables over 64 blocks (L2-resident), and nhd vs hnd layout."""
import torch
from triton.testing import do_bench
from kiln.kernels.attention_decode import paged_attention_decode
H, KVH, D, BS = 32, 8, 128, 16
batch, ctx = 512, 1536
bp = ctx // BS; n = batch * bp + 1
for dname, dt in [("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8)]:
    for layout in ("nhd", "hnd"):
        shape = (n, KVH, BS, D) if layout == "hnd" else (n, BS, KVH, D)
        x = torch.randn(shape, device="cuda") * 2
        k = x.round().clamp(-100, 100).to(dt) if dt == torch.int8 else x.to(dt)
        v = k.clone(); del x
        if layout == "hnd":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        ones = torch.ones(KVH, device="cuda")
        sc = dict(k_scale=ones, v_scale=ones) if dt.itemsize == 1 else {}
        for tname in ("pool", "l2"):
            if tname == "pool":
                tables = torch.randperm(n - 1, device="cuda")[: batch * bp].view(batch, bp).int()
            else:
                tables = torch.randint(0, 64, (batch, bp), device="cuda").int()
            cfgs = [(64, 4, 2)] if dt == torch.bfloat16 else [(128, 2, 2), (64, 2, 2), (64, 4, 2)]
            for bn, w, st in cfgs:
                ms = do_bench(lambda: paged_attention_decode(q, k, v, tables, lens, 0.1, block_n=bn,
                              num_warps=w, num_stages=st, num_splits=1, **sc), warmup=10, rep=50,
                              return_mode="median")
                print(f"{dname:5s} {layout} {tname:4s} {bn},{w},{st}: {ms:.3f} ms "
                      f"{2*batch*ctx*KVH*D*dt.itemsize/ms/1e6:.0f} GB/s", flush=True)
        del k, v; torch.cuda.empty_cache()
