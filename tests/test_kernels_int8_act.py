"""INT8 W8A8's per-token quantization and scaling epilogue (kiln/kernels/int8_act.py) and
the dp4a products of a few rows (kiln/kernels/int8_gemv.py) against the torch reference,
bit for bit: CPU through Triton's interpreter (the reference's CPU
rounding), GPU (pytest -m gpu) against the reference on CUDA tensors, and the kernels
compiled for sm_90 without a GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")


def _inputs(M: int, K: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 8).to(dtype)
    if M > 2:
        x[1] = 0  # a row of zeros: the minimum amax
        # amax 127 makes the scale 1: halves are ties, rounded to even (2, -4, 0, 6, -0)
        x[2, :6] = torch.tensor([2.5, -3.5, 0.5, 5.5, -0.5, 127.0])
        x[2, 6:] = 1.25
    return x.to(device)


def check_quantize(M: int, K: int, dtype: torch.dtype, strided: bool) -> None:
    from kiln.kernels import int8_act
    from kiln.kernels.reference_quant import quantize_int8_per_token as reference

    x = _inputs(M, K + 5 if strided else K, dtype)[:, :K]  # rows with a stride
    q, scale = int8_act.quantize_int8_per_token(x, rows=17)
    want_q, want_scale = reference(x)
    assert q.shape == (max(M, 17), K) and scale.shape == (M, 1)
    assert torch.equal(scale, want_scale), (scale - want_scale).abs().max()
    assert torch.equal(q[:M], want_q), (q[:M].int() - want_q.int()).abs().max()
    if M > 2:
        assert q[2, :6].tolist() == [2, -4, 0, 6, 0, 127] and scale[2].item() == 1.0


def check_scale(M: int, N: int, dtype: torch.dtype, with_bias: bool) -> None:
    from kiln.kernels import int8_act

    g = torch.Generator().manual_seed(M + N)
    acc = torch.randint(-2**20, 2**20, (M + 3, N), generator=g, dtype=torch.int32)
    x_scale = torch.rand(M, 1, generator=g) * 0.01
    w_scale = torch.rand(N, generator=g) * 0.01
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    got = int8_act.scale_int8_product(acc, x_scale, w_scale, bias, dtype)
    want = acc[:M].float() * x_scale * w_scale.view(1, -1)  # the reference's chain
    if bias is not None:
        want = want + bias.float()
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("M,K", [(1, 64), (5, 99), (20, 4096), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_per_token(interp, M, K, dtype) -> None:  # noqa: F811
    """One tile and several (K past 4096), odd K, a strided row, zero rows and ties."""
    interp(check_quantize, M, K, dtype, M == 5)


@pytest.mark.parametrize("M,N", [(1, 40), (17, 300), (40, 512)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scale_epilogue(interp, M, N, dtype) -> None:  # noqa: F811
    for with_bias in (False, True):
        interp(check_scale, M, N, dtype, with_bias)


def check_int8_gemv(M: int, N: int, K: int, block_n: int, block_w: int, split: int,
                    loop_stages: int = 1) -> None:
    from kiln.kernels import int8_gemv

    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    x[0, :4] = torch.tensor([-127, 127, -127, 127], dtype=torch.int8)  # extremes
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w[0, :4] = torch.tensor([-127, -127, 127, 127], dtype=torch.int8)
    got = int8_gemv.int8_gemv(x, w, block_n, block_w, split, loop_stages=loop_stages)
    want = torch._int_mm(torch.nn.functional.pad(x, (0, 0, 0, 17 - M)), w.t())[:M] \
        if M <= 16 else torch._int_mm(x, w.t())
    assert got.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("M", [1, 3, 16])
def test_int8_gemv_is_int_mm(interp, M) -> None:  # noqa: F811
    """Exactly torch._int_mm's int32 sums: N not a multiple of the block, K ending inside
    a step, one split and several (int32 atomics), the K loop software-pipelined or not."""
    for N, K, block_n, block_w, split in ((40, 256, 16, 8, 1), (37, 1000, 16, 16, 3),
                                          (64, 4096, 32, 32, 0)):
        interp(check_int8_gemv, M, N, K, block_n, block_w, split)
    interp(check_int8_gemv, M, 37, 1000, 16, 16, 3, 3)


def check_int8_gemm(M: int, N: int, K: int, tiles: tuple, dtype: torch.dtype,
                    with_bias: bool) -> None:
    from kiln.kernels import int8_act, int8_gemm

    g = torch.Generator().manual_seed(M * N + K)
    x_q = torch.randint(-127, 128, (M + 2, K), generator=g, dtype=torch.int8)  # rows past M
    x_q[0, :4] = torch.tensor([-127, 127, -127, 127], dtype=torch.int8)  # extremes
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w[0, :4] = torch.tensor([-127, -127, 127, 127], dtype=torch.int8)
    x_scale = torch.rand(M, 1, generator=g) * 0.01
    w_scale = torch.rand(N, generator=g) * 0.01
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    cfg = int8_gemm.Int8GemmConfig(*tiles)
    got = int8_gemm.int8_scaled_mm(x_q, x_scale, w, w_scale, bias, dtype, cfg)
    want = int8_act.scale_int8_product(torch._int_mm(x_q, w.t()), x_scale, w_scale, bias,
                                       dtype)
    assert got.shape == (M, N) and got.dtype == dtype
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("M,N,K", [(5, 40, 96), (17, 48, 64), (40, 100, 96), (70, 64, 200)])
def test_int8_gemm_is_int_mm_and_epilogue(interp, M, N, K) -> None:  # noqa: F811
    """The fused W8A8 GEMM (KILN_INT8_GEMM=triton) gives _int_mm + the scaling epilogue's
    bits: row and column tiles past M and N, K ending inside a step, grouped program
    order over several row tiles, K split over 2-3 programs (a split with no K step at
    K = 64), bias or none, fp16 / bf16 / fp32 outputs."""
    for tiles, dtype, with_bias in (((16, 32, 32, 2, 4, 2), torch.float16, True),
                                    ((32, 16, 64, 1, 4, 1), torch.bfloat16, False),
                                    ((16, 64, 32, 4, 4, 3), torch.float32, True),
                                    ((16, 32, 32, 2, 4, 2, 3), torch.bfloat16, True),
                                    ((32, 16, 32, 1, 4, 2, 2), torch.float16, False)):
        interp(check_int8_gemm, M, N, K, tiles, dtype, with_bias)


def check_fused_int8_input(dtype: torch.dtype, M: int, K: int, device: str = "cpu") -> None:
    """RMSNorm (with and without the residual add) and SiLU / GeGLU products quantized to
    int8 in the same kernel (an Int8Quant, KILN_INT8_FUSED_QUANT=1) equal, bit for bit,
    the unfused kernels' output quantized after by int8_act (rows of zeros and halves
    included; compiled norms of widths not a power of two: see below); the residual
    stream is unchanged; a W8A8 linear fed the Int8Act gives the unfused result exactly
    through both GEMM routes (the fused GEMM, _int_mm)."""
    from kiln.kernels import int8_act, int8_gemm, rms_norm, silu_mul
    from kiln.kernels.reference_quant import Int8Act, Int8Quant

    g = torch.Generator().manual_seed(5)
    x = _inputs(M, K, dtype, device)
    r = (torch.randn(M, K, generator=g) * 3).to(dtype).to(device)
    w = (torch.rand(K, generator=g) + 0.5).to(dtype).to(device)
    gate_up = (torch.randn(M, 2 * K, generator=g) * 4).to(dtype).to(device)
    gate_up[0] = 0
    quant, q8 = Int8Quant(), int8_act.quantize_int8_per_token
    sliced = {"block": (1 << (K - 1).bit_length()) // 4, "num_warps": 4}  # two passes a row
    cases = {
        "rms_norm": (rms_norm.rms_norm(x, w, 1e-5, quant), q8(rms_norm.rms_norm(x, w, 1e-5))),
        "add_rms_norm": (rms_norm.add_rms_norm(x, r, w, 1e-5, quant)[0],
                         q8(rms_norm.add_rms_norm(x, r, w, 1e-5)[0])),
        "silu_mul": (silu_mul.act_mul_quant(gate_up, quant), q8(silu_mul.silu_and_mul(gate_up))),
        "silu_mul in slices": (silu_mul.act_mul_quant(gate_up, quant, launch=sliced),
                               q8(silu_mul.silu_and_mul(gate_up))),
        "gelu_tanh_mul": (silu_mul.act_mul_quant(gate_up, quant, gelu_tanh=True),
                          q8(silu_mul.gelu_tanh_and_mul(gate_up))),
    }
    for name, (act, (q, scale)) in cases.items():
        label = f"{name} {dtype} {M}x{K}"
        assert isinstance(act, Int8Act) and act.dtype == dtype and act.q.dtype == torch.int8
        assert torch.equal(act.scale, scale), (label, (act.scale - scale).abs().max())
        if device == "cuda" and "rms" in name and K & (K - 1):
            # compiled, the norm's sum of squares may be reduced in another order when the
            # output is int8 (another register layout): at 300 x 14336 on an H200, 18 of
            # 4.3M values one step apart (FP8's fused norm: 4); none at 4096 or 8192
            off = (act.q.int() - q.int()).abs()
            assert off.max() <= 1 and (off > 0).float().mean() <= 1e-5, (label, off.sum())
        else:
            assert torch.equal(act.q, q), (label, (act.q.int() - q.int()).abs().max())
    assert torch.equal(rms_norm.add_rms_norm(x, r, w, 1e-5, quant)[1],
                       rms_norm.add_rms_norm(x, r, w, 1e-5)[1])
    weight = torch.randint(-127, 128, (48, K), generator=g, dtype=torch.int8).to(device)
    w_scale = (torch.rand(48, generator=g) * 0.01).to(device)
    act, plain = cases["silu_mul"][0], silu_mul.silu_and_mul(gate_up)
    before = os.environ.get("KILN_INT8_GEMM")
    try:
        for route in ("torch", "triton"):
            os.environ["KILN_INT8_GEMM"] = route
            got = int8_gemm.int8_linear(act, weight, w_scale, None)
            want = int8_gemm.int8_linear(plain, weight, w_scale, None)
            assert got.dtype == dtype and torch.equal(got, want), route
    finally:
        os.environ.pop("KILN_INT8_GEMM", None)
        if before is not None:
            os.environ["KILN_INT8_GEMM"] = before


@pytest.mark.parametrize("dtype,M,K", [(torch.bfloat16, 5, 96), (torch.float32, 3, 160),
                                       (torch.float16, 2, 1000)])
def test_fused_int8_input(interp, dtype, M, K) -> None:  # noqa: F811
    interp(check_fused_int8_input, dtype, M, K)


def test_fused_int8_input_compiles_for_hopper() -> None:
    """The int8 outputs of RMSNorm (with the residual add) and SiLU-mul (a 14336 row whole
    and in 4096-wide slices) at Llama-3.1-8B's shapes, sm_90: no stack."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    import triton.language as tl

    from kiln.kernels import rms_norm, silu_mul
    from kiln.kernels.compile_check import compile_sm90

    r = compile_sm90(rms_norm._rms_norm_kernel, {
        "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*i8",
        "res_out_ptr": "*bf16", "num_rows": 300, "n_cols": 4096, "stride_x": 4096,
        "stride_res": 4096, "stride_out": 4096, "stride_res_out": 4096, "eps": 1e-5,
        "scale_ptr": "*fp32", "static_scale_ptr": "*fp32"},
        {"BLOCK_R": 1, "BLOCK_N": 4096, "HAS_RESIDUAL": True, "PDL": False, "QUANT": 3,
         "Y_DTYPE": tl.bfloat16, "INTERPRET": False, "DEPENDENTS": True}, 8)
    assert r.stack_bytes == 0, r
    for block in (16384, 4096):
        r = compile_sm90(silu_mul._act_mul_quant_kernel, {
            "x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32",
            "static_scale_ptr": "*fp32", "inter": 14336, "stride_x": 28672, "stride_q": 14336},
            {"BLOCK": block, "ONE_TILE": block >= 14336, "QUANT": 3, "GELU_TANH": False,
             "INTERPRET": False, "DEPENDENTS": True}, 8, variant=f"int8-{block}")
        assert r.stack_bytes == 0, r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("M", [2, 7, 300])
def test_gpu_fused_int8_input(M) -> None:
    """check_fused_int8_input at Llama-3.1-8B's hidden size, bf16 and fp16 (300 rows: the
    SiLU-mul row of 14336 in slices by default)."""
    for dtype in (torch.bfloat16, torch.float16):
        check_fused_int8_input(dtype, M, 4096, "cuda")
        check_fused_int8_input(dtype, M, 14336, "cuda")


def test_compiles_for_hopper() -> None:
    """Both kernels at the Llama-3.1-8B shapes, sm_90: no stack."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int8_act
    from kiln.kernels.compile_check import compile_sm90

    for K, block in ((4096, 4096), (14336, 4096)):
        r = compile_sm90(int8_act._quant_int8_kernel, {
            "x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", "K": K,
            "stride_x": K, "stride_q": K}, {"BLOCK_K": block, "ONE_TILE": K <= block,
                                              "INTERPRET": False}, 8, variant=f"K{K}")
        assert r.stack_bytes == 0, r
    r = compile_sm90(int8_act._scale_int8_kernel, {
        "acc_ptr": "*i32", "x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16",
        "out_ptr": "*bf16", "M": 512, "N": 28672, "stride_acc": 28672, "stride_out": 28672},
        {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 256}, 4)
    assert r.stack_bytes == 0, r
    # the fused W8A8 GEMM at kiln's tile choices: int8 mma.sync / wgmma, no stack
    from kiln.kernels import int8_gemm

    # (o at 4 rows and down at 24 and 64 split K; gate_up at 16 takes 128-column tiles, at 1024
    # 128-row ones)
    for M, N, K in ((4, 4096, 4096), (16, 28672, 4096), (24, 4096, 14336), (64, 4096, 14336),
                    (256, 4096, 4096), (1024, 4096, 4096)):
        cfg = int8_gemm.gemm_config(M, N, K)
        r = compile_sm90(int8_gemm._int8_gemm_kernel, {
            "x_ptr": "*i8", "x_scale_ptr": "*fp32", "w_ptr": "*i8", "w_scale_ptr": "*fp32",
            "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*i32", "count_ptr": "*i32",
            "M": M, "N": N, "K": K, "stride_x": K, "stride_w": K, "stride_out": N},
            {"HAS_BIAS": False, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
             "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "EVEN_K": True,
             "SPLIT_K": cfg.split_k, "INTERPRET": False},
            cfg.num_warps, cfg.num_stages, variant=f"M{M}N{N}K{K}")
        mma = "mma.sync" if M <= 32 else "wgmma.mma_async"  # 16 / 32-row tiles: mma.sync
        assert r.stack_bytes == 0 and r.instructions[mma] > 0, r
    # the dp4a products: one dp4a (IDP) a word pair, ~0.7 instructions a weight at 1 row
    from kiln.kernels import int8_gemv
    from kiln.kernels.compile_check import main_loop_sass

    for rows, block_n, block_w in ((1, 64, 32), (4, 64, 32), (16, 64, 16)):
        values = {"x_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*i32", "M": 3, "N": 4096,
                  "W": 1024, "W_PER_SPLIT": 128, "stride_xm": 1024, "stride_wn": 1024,
                  "stride_om": 4096}
        meta = dict(ROWS=rows, BLOCK_N=block_n, BLOCK_W=block_w, ATOMIC=True,
                    INTERPRET=False)
        r = compile_sm90(int8_gemv._int8_gemv_kernel, values, meta, 4, 3,
                         variant=f"rows{rows}")
        assert r.stack_bytes == 0, r
        ops = main_loop_sass(int8_gemv._int8_gemv_kernel, values, meta, 4, 3)
        weights = block_n * block_w * 4 / 128
        assert ops["IDP"] == rows * weights / 4, ops
        if rows == 1:
            assert sum(ops.values()) / weights < 1.0, ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("M", [1, 16, 17, 512])
def test_gpu_int8_linear_fused_is_the_reference(M, monkeypatch) -> None:
    """The fused kernels (default) give the same bits as the torch chain
    (KILN_INT8_FUSED=0) on the GPU, bf16 and fp16."""
    from kiln import functional as KF

    for dtype in (torch.bfloat16, torch.float16):
        x = _inputs(M, 4096, dtype, "cuda")
        g = torch.Generator().manual_seed(1)
        weight = torch.randint(-127, 128, (6144, 4096), generator=g, dtype=torch.int8).cuda()
        w_scale = (torch.rand(6144, generator=g) * 0.01).cuda()
        bias = torch.randn(6144, generator=g).to(dtype).cuda()
        monkeypatch.setenv("KILN_INT8_FUSED", "0")
        want = KF.int8_linear(x, weight, w_scale, bias)
        monkeypatch.delenv("KILN_INT8_FUSED")
        got = KF.int8_linear(x, weight, w_scale, bias)
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gpu_int8_gemv_is_int_mm(M, monkeypatch) -> None:
    """The dp4a products (by default at one row, KILN_INT8_GEMV=1 up to 16) give the bits of
    _int_mm (KILN_INT8_GEMV=0) at the 8B shapes."""
    from kiln import functional as KF

    for N, K in ((6144, 4096), (4096, 14336)):
        x = _inputs(M, K, torch.bfloat16, "cuda")
        g = torch.Generator().manual_seed(2)
        weight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).cuda()
        w_scale = (torch.rand(N, generator=g) * 0.01).cuda()
        bias = torch.randn(N, generator=g).to(torch.bfloat16).cuda()
        monkeypatch.setenv("KILN_INT8_GEMV", "0")
        want = KF.int8_linear(x, weight, w_scale, bias)
        for mode, pipeline in (("1", "0"), ("", "0"), ("1", "1")):
            monkeypatch.setenv("KILN_INT8_GEMV", mode)
            monkeypatch.setenv("KILN_INT_PIPELINE", pipeline)  # the K loop pipelined
            got = KF.int8_linear(x, weight, w_scale, bias)
            assert torch.equal(got, want), (mode, (got.float() - want.float()).abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("M", [2, 16, 17, 32, 40, 49, 100, 296, 512, 4096])
def test_gpu_int8_gemm_is_the_torch_path(M, monkeypatch) -> None:
    """The fused W8A8 GEMM (the Hopper default from 2 rows on) gives the bits of
    _int_mm + the scaling epilogue (KILN_INT8_GEMM=torch) at the 8B shapes, bf16 and fp16,
    with and without bias."""
    from kiln import functional as KF

    for (N, K), dtype in (((6144, 4096), torch.bfloat16), ((4096, 14336), torch.float16)):
        x = _inputs(M, K, dtype, "cuda")
        g = torch.Generator().manual_seed(3)
        weight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).cuda()
        w_scale = (torch.rand(N, generator=g) * 0.01).cuda()
        for bias in (None, torch.randn(N, generator=g).to(dtype).cuda()):
            monkeypatch.setenv("KILN_INT8_GEMM", "torch")
            want = KF.int8_linear(x, weight, w_scale, bias)
            monkeypatch.setenv("KILN_INT8_GEMM", "triton")
            got = KF.int8_linear(x, weight, w_scale, bias)
            assert torch.equal(got, want), (got.float() - want.float()).abs().max()
