"""A first check of kiln.kernels.int4_gemv_mma on a GPU (the 58th session's last seconds of
device time): its error against the reference, then, time left, us a call against the pairs
GEMV at gate_up's shape."""
from functools import partial

import torch

from kiln.kernels import int4_gemv_mma as m
from kiln.kernels import int_gemm
from kiln.kernels.reference import dequantize_int_weight, pack_int4

for N, K in ((4096, 4096), (28672, 4096)):
    q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8)
    w, s = pack_int4(q), torch.rand(N, K // 128, device="cuda") * 0.02
    o = -8 * s + 0.001
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ dequantize_int_weight(w, s, o).T
    for cfg in (None, m.GemvMmaConfig(4, 4, 1), m.GemvMmaConfig(4, 1, 2)):
        got = m.w4_gemv_mma(x, w, s, o, None, cfg).float()
        print(N, K, cfg, "err", ((got - want).abs().max() / want.abs().max()).item(), flush=True)
    cfg2 = m.gemv_mma_config(N, K, tiles=2)
    args = (x, w, s, o)
    for name, fn in (("pairs", partial(int_gemm.int_weight_linear, *args)),
                     ("mma", partial(m.w4_gemv_mma, *args, None)),
                     ("mma-t2", partial(m.w4_gemv_mma, *args, None, cfg2))):
        fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            fn()
        b.record()
        torch.cuda.synchronize()
        print(N, K, name, "us (hot, L2)", round(a.elapsed_time(b) * 1000 / 50, 1), flush=True)
