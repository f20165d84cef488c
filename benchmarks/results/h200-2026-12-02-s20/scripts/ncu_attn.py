"""One decode-attention call (B=512, ctx 1536) between profiler start/stop for ncu.
argv: dtype(bf16|fp8|int8) block_n warps stages [VT]"""
import sys
import torch
from kiln.kernels import attention_decode as ad
H, KVH, D, BS = 32, 8, 128, 16
dt = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[sys.argv[1]]
bn, w, st = map(int, sys.argv[2:5]); vt = len(sys.argv) > 5
batch, ctx = 512, 1536
bp = ctx // BS; n = batch * bp + 1
def mk():
    x = torch.randn(n, BS, KVH, D, device="cuda") * 2
    return x.round().clamp(-100, 100).to(dt) if dt == torch.int8 else x.to(dt)
k, v = mk(), mk()
if vt:
    v = v.permute(0, 2, 3, 1).contiguous()
tables = torch.randperm(n - 1, device="cuda")[: batch * bp].view(batch, bp).int()
lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
ones = torch.ones(KVH, device="cuda")
out = torch.empty_like(q)
extra = {"VT": True} if vt else {}
def call():
    ad._decode_kernel[(batch, KVH, 1)](q, k, v, out, out, out, tables, lens, 0.1, ones, ones,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k.stride(0), k.stride(1), k.stride(2),
        tables.stride(0), 0, 0.0, lens, lens, 0, GROUP=4, HEAD_DIM=D, BLOCK_SIZE=BS, BLOCK_G=16,
        BLOCK_N=bn, BLOCK_D=D, NUM_SPLITS=1, DOT_PREC="tf32", WINDOW=False, SOFTCAP=False,
        ALIBI=False, num_warps=w, num_stages=st, **extra)
for _ in range(3):
    call()
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20):
    call()
e.record(); torch.cuda.synchronize()
ms = s.elapsed_time(e) / 20
print(f"{sys.argv[1:]} {ms:.3f} ms {2*batch*ctx*KVH*D*dt.itemsize/ms/1e6:.0f} GB/s", flush=True)
torch.cuda.cudart().cudaProfilerStart()
call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
