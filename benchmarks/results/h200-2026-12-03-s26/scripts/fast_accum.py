"""_scaled_mm at mid batch sizes: rowwise (kiln's scheme) with and without use_fast_accum,
tensorwise, tensorwise to float32 then the scales applied by torch (GEMM alone, CUDA-graph
timing from benchmarks/fp8_gemm.py)."""
import sys
import torch
sys.path.insert(0, "benchmarks")
from fp8_gemm import make_weights, time_calls, SHAPES  # noqa: E402
from kiln.kernels import fp8  # noqa: E402


def rw(x, w, sa, sb, fast):
    return torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                            use_fast_accum=fast)


def tw_f32(x, w, sa, sb, one):
    y = torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * sa * sb).to(torch.bfloat16)


for N, K in SHAPES:
    w8 = make_weights(N, K, max(2, (512 << 20) // (N * K) + 1), fp8.FP8)
    one = torch.ones(1, device="cuda")
    for M in (64, 128, 192, 256, 384, 512):
        xq, xs = fp8.quantize_fp8_per_token(torch.randn(M, K, device="cuda"))
        out = [f"{N:6d} {K:6d} {M:4d}"]
        for name, fn, args in (
                ("rowwise", rw, [(xq, w, xs, s.view(1, N), False) for w, s in w8]),
                ("rowwise fast", rw, [(xq, w, xs, s.view(1, N), True) for w, s in w8]),
                ("tensor", rw, [(xq, w, one, one, False) for w, s in w8]),
                ("tensor fast", rw, [(xq, w, one, one, True) for w, s in w8]),
                ("tensor f32+scale", tw_f32, [(xq, w, xs, s.view(1, N), one) for w, s in w8])):
            try:
                out.append(f"{name} {time_calls(fn, args) * 1e6:7.2f}")
            except Exception as e:
                out.append(f"{name} ERR {str(e)[:60]}")
        print(" | ".join(out), flush=True)
    del w8
