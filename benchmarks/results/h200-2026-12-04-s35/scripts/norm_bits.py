"""35th session, call 11: how often the fused RMSNorm + quantization differs from the
unfused norm quantized after (int8 and FP8), by width and dtype (M = 300)."""
import torch

from kiln.kernels import fp8, int8_act, rms_norm
from kiln.kernels.reference_quant import FP8Quant, Int8Quant

for dtype in (torch.bfloat16, torch.float16):
    for K in (4096, 8192, 14336):
        g = torch.Generator(device="cuda").manual_seed(K)
        x = (torch.randn(300, K, device="cuda", generator=g) * 3).to(dtype)
        r = (torch.randn(300, K, device="cuda", generator=g) * 3).to(dtype)
        w = (torch.rand(K, device="cuda", generator=g) + 0.5).to(dtype)
        plain = rms_norm.add_rms_norm(x, r, w, 1e-5)[0]
        a8 = rms_norm.add_rms_norm(x, r, w, 1e-5, Int8Quant())[0]
        q8, s8 = int8_act.quantize_int8_per_token(plain)
        af = rms_norm.add_rms_norm(x, r, w, 1e-5, FP8Quant())[0]
        qf, sf = fp8.quantize_fp8_per_token(plain)
        d8 = (a8.q.int() - q8.int()).abs()
        df = (af.q.view(torch.uint8).int() - qf.view(torch.uint8).int()).abs()
        print(f"{dtype} K={K}: int8 {int((d8 > 0).sum())} differ (max {int(d8.max())}, "
              f"scales equal {torch.equal(a8.scale, s8)}); fp8 {int((df > 0).sum())} differ "
              f"(scales equal {torch.equal(af.scale, sf)}) of {300 * K}", flush=True)
