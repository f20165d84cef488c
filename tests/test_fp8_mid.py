"""kiln.kernels.fp8_mid (on by default; KILN_FP8_MID_TENSORWISE=0 off): FP8 linear layers
of 65-192 rows (256 where K > N) as a tensorwise _scaled_mm into float32 and a kernel that
applies the scales, against the reference W8A8 linear (per-token and static activations,
with and without bias); the scale kernel under the Triton interpreter (_scaled_mm on the
CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)


def check_mid(dtype: torch.dtype, M: int, N: int, K: int, static: bool, bias: bool) -> None:
    from kiln.kernels import fp8, fp8_mid
    from kiln.kernels import reference as ref
    from tests.test_kernels_fp8 import _fp8_weight

    torch.manual_seed(M + N)
    x = torch.randn(M, K, dtype=dtype)
    wq, ws = _fp8_weight(N, K, seed=M + N)
    in_scale = (x.abs().amax().float() / 448).reshape(1) if static else None
    b = torch.randn(N, dtype=dtype) if bias else None
    want = ref.fp8_linear(x, wq, ws, in_scale, b)
    taken, real = [], fp8_mid.tensorwise_fp8_linear
    saved = fp8_mid.ENABLED
    fp8_mid.ENABLED = True
    fp8_mid.tensorwise_fp8_linear = lambda *a, **k: taken.append(1) or real(*a, **k)
    try:
        got = fp8.fp8_linear(x, wq, ws, in_scale, b, backend="scaled_mm")
        assert fp8_mid.use(M, N, K) == bool(taken)
        top = 256 if K > N else 192
        assert fp8_mid.use(top, N, K) and not fp8_mid.use(top + 1, N, K)
        assert not fp8_mid.use(64, N, K)
        assert fp8_mid.use(256, 4096, 14336) and not fp8_mid.use(257, 4096, 14336)
        assert not fp8_mid.use(M, 28672, K)
    finally:
        fp8_mid.ENABLED, fp8_mid.tensorwise_fp8_linear = saved, real
    assert got.dtype == dtype and got.shape == (M, N)
    # The float32 sums differ from the reference's only in their order (products of two
    # e4m3 values are exact): float32 outputs agree to ~1e-6 of the largest output, 16-bit
    # ones to an ulp of it.
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err <= tol, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_mid_rows_tensorwise(interp, dtype, static, bias) -> None:  # noqa: F811
    interp(check_mid, dtype, 96, 80, 64, static, bias)
    interp(check_mid, dtype, 40, 48, 32, static, bias)  # below 65 rows: the usual path
    interp(check_mid, dtype, 200, 48, 96, static, bias)  # K > N: up to 256 rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N,K", [(4096, 4096), (4096, 14336), (6144, 4096)])
def test_gpu_mid_rows_match_rowwise(N, K) -> None:
    """At Llama-3.1-8B shapes fp8_linear's _scaled_mm backend (the tensorwise path inside
    its window, the rowwise GEMM outside) gives the rowwise GEMM's bf16 outputs to an ulp
    of the largest (the float32 sums' order may differ)."""
    from kiln.kernels import fp8
    from tests.test_kernels_fp8 import _fp8_weight

    wq, ws = _fp8_weight(N, K, "cuda", seed=N + K)
    g = torch.Generator(device="cuda").manual_seed(N + K)
    for M in (65, 128, 256):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        xq, xs = fp8.quantize_fp8_per_token(x)
        rowwise = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, N),
                                   out_dtype=torch.bfloat16)
        got = fp8.fp8_linear(fp8.FP8Act(xq, xs, x.dtype), wq, ws, backend="scaled_mm")
        err = ((got.float() - rowwise.float()).abs().max() / rowwise.float().abs().max()).item()
        assert got.dtype == torch.bfloat16 and err <= 8e-3, (M, err)
