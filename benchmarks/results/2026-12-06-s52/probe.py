"""One w4_wgmma launch per process (an illegal instruction poisons the context): G, M,
split, a_regs, ws from argv; prints ok / the error and the relative error."""
import sys

import torch

from kiln.kernels import int_wgmma
from kiln.kernels.reference import dequantize_int_weight, pack_int4

G, M, split, a_regs, ws = (int(v) for v in sys.argv[1:6])
N, K = 1024, 4096
q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8)
scale = torch.rand(N, K // G, device="cuda") * 0.02
offset = -8 * scale
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = pack_int4(q)
want = x.float() @ dequantize_int_weight(w, scale, offset).to(torch.bfloat16).float().T
try:
    got = int_wgmma.w4_wgmma(x, w, scale, offset, None, int_wgmma.WgmmaConfig(
        split_k=split, a_regs=bool(a_regs), ws=bool(ws))).float()
    torch.cuda.synchronize()
    print(sys.argv[1:6], "ok", f"{((got - want).abs().max() / want.abs().max()).item():.1e}")
except Exception as exc:
    print(sys.argv[1:6], "FAILED", type(exc).__name__, str(exc)[:80])
