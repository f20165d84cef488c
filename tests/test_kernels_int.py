"""W4A16 / W8A16 kernels (kiln/kernels/int_gemm.py) vs the torch reference.

CPU: through Triton's interpreter, in the spawned worker of tests/test_kernels.py, at odd
shapes (N and K not multiples of the tiles, K = 3 groups), group sizes 32/64/128 and per
channel, M = 1, 7, 64 (the GEMV, split-K with atomics and without, and tl.dot tiles with
one scale per tile and with gathered scales). float16 and float32 only: the
interpreter's tl.dot cannot take bf16, and it truncates float -> bf16 where torch rounds.
GPU (pytest -m gpu): Llama-3.1-8B shapes (K 4096, N 4096 / 14336; K 14336), bf16 and fp16.

Tolerance, against y32 = x @ w_x^T in float32 (w_x: the dequantized weight rounded to
x's dtype, which the tiles compute with; the one-row GEMV keeps it in float32): the sums
differ in order only, so |y - y32| <= 2e-5 * S + 1 ulp of the output dtype
+ |x| @ |w32 - w_x|^T, S = |x| @ |w_x|^T.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")

SUM_TOL = 2e-5


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exp = torch.frexp(v.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.ones_like(v), exp - 1 - mant)


def _weight(N: int, K: int, bits: int, group: int, device: str = "cpu", seed: int = 0):
    """Random storage: (weight, scale, offset or None) with group scales of varied size."""
    g = torch.Generator().manual_seed(seed)
    groups = K // (group or K)
    scale = (torch.rand(N, groups, generator=g) * 0.02 + 1e-3)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
        from kiln.kernels.reference import pack_int4

        weight = pack_int4(q)
        offset = -8 * scale + torch.randn(N, groups, generator=g) * 1e-3
    else:
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        offset = None
    return weight.to(device), scale.to(device), None if offset is None else offset.to(device)


def _check(name: str, x: torch.Tensor, y: torch.Tensor, weight, scale, offset,
           bias: torch.Tensor | None) -> None:
    from kiln.kernels import reference as ref

    w32 = ref.dequantize_int_weight(weight, scale, offset).float()
    w_x = w32.to(x.dtype).float()
    y32 = x.float() @ w_x.T
    if bias is not None:
        y32 = y32 + bias.float()
    # bf16 products on tensor cores: the MMA's adder tree aligns and truncates (measured
    # on an H200 at K = 4096: up to 1.6x of SUM_TOL, fp16 within it), so 4x there.
    tol = SUM_TOL * (4 if x.is_cuda and x.dtype == torch.bfloat16 else 1)
    # + what multiplying the float32 weight (the one-row GEMV) instead of w_x changes
    bound = tol * (x.float().abs() @ w_x.abs().T) + _ulp(y32, y.dtype) + \
        x.float().abs() @ (w32 - w_x).abs().T
    err = (y.float() - y32).abs()
    assert y.shape == y32.shape and y.dtype == x.dtype, name
    assert (err <= bound).all(), f"{name}: worst {(err / bound).max().item():.2f}x the bound"
    # the reference (the CPU path) computes the same product
    want = ref.int_weight_linear(x, weight, scale, offset, bias)
    assert (want.float() - y32).abs().le(bound).all(), name


# ---- checks (run in the interpreter worker) -----------------------------------------
def check_linear(dtype: torch.dtype, M: int, N: int, K: int, bits: int, group: int,
                 with_bias: bool, config: tuple | None) -> None:
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(N, K, bits, group)
    torch.manual_seed(M)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    cfg = int_gemm.IntGemmConfig(*config) if config else None
    y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
    _check(f"{dtype} {M}x{N}x{K} int{bits} g{group} {config}", x, y, weight, scale, offset,
           bias)


def check_functional_dispatch() -> None:
    from kiln import functional as KF

    weight, scale, offset = _weight(24, 64, 4, 32)
    x = torch.randn(2, 3, 64)
    KF._triton = lambda t: True  # CPU tensors, kernels interpreted (this worker only)
    y = KF.int_weight_linear(x, weight, scale, offset)
    assert y.shape == (2, 3, 24)
    _check("functional", x.view(6, 64), y.view(6, 24), weight, scale, offset, None)



# IntGemmConfig fields (block_m, block_n, block_k, warps, stages, split_k, group_m,
# prefetch, nibble_dots, factored, xvec, words, fixup): GEMV without and with split-K
# (atomics, or for one row the partials summed by the last split: fixup; the splits end
# inside K), each also with the next K step's loads issued first (prefetch)
# and with the scales applied once a word (factored, x as one vector a word: xvec; both
# for one row only), tl.dot tiles whose K step spans several groups (gathered scales) or
# lies in one, and int4 tiles multiplied as even-k and odd-k halves (nibble_dots; int8
# and gathered scales ignore it), or read from 32-bit words in place (words; likewise).
CONFIGS = {"auto": None, "gemv-split3": (0, 16, 32, 4, 1, 3), "gemv-1": (0, 32, 64, 4, 1, 1),
           "gemv-split3-pf": (0, 16, 32, 4, 1, 3, 8, True),
           "gemv-1-pf": (0, 32, 64, 4, 1, 1, 8, True),
           "gemv-split3-fac": (0, 16, 32, 4, 1, 3, 8, False, False, True),
           "gemv-split3-fac-xvec": (0, 16, 32, 4, 1, 3, 8, False, False, True, True),
           "gemv-1-fac-xvec-pf": (0, 32, 64, 4, 1, 1, 8, True, False, True, True),
           "gemv-split3-fixup": (0, 16, 32, 4, 1, 3, 8, False, False, False, False, False,
                                 True),
           "gemv-split3-fac-xvec-fixup": (0, 16, 32, 4, 1, 3, 8, False, False, True, True,
                                          False, True),
           "dot-gather": (16, 16, 64, 4, 1), "dot-tile": (32, 32, 32, 4, 1),
           "dot-nibbles": (16, 16, 32, 4, 1, 1, 8, False, True),
           "dot-nibbles-64": (32, 16, 64, 4, 1, 1, 8, False, True),
           "dot-words": (16, 16, 32, 4, 1, 1, 8, False, False, False, False, True),
           "dot-words-64": (32, 32, 64, 4, 1, 1, 8, False, False, False, False, True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 7, 64, 260])  # 260: dequantized, then a 16-bit GEMM
@pytest.mark.parametrize("bits,group,K", [(4, 32, 96), (4, 64, 192), (4, 128, 384),
                                          (8, 0, 99), (8, 32, 160)])
def test_int_linear_auto(interp, dtype, M, bits, group, K) -> None:  # noqa: F811
    interp(check_linear, dtype, M, 40, K, bits, group, M == 7, None)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "auto"])
@pytest.mark.parametrize("M", [1, 7, 20])
def test_int_linear_configs(interp, config, M) -> None:  # noqa: F811
    for bits, group, K in ((4, 32, 160), (8, 64, 192)):
        interp(check_linear, torch.float16, M, 40, K, bits, group, True, CONFIGS[config])


@pytest.mark.parametrize("xvec,fixup", [(False, False), (True, False), (True, True)])
def test_factored_gemv_odd_shapes(interp, xvec, fixup) -> None:  # noqa: F811
    """The factored one-row GEMV where K ends inside a K step (masked loads), per channel
    and in groups, with and without K split (atomics, or summed by the last split),
    float16 and float32."""
    for bits, group, K in ((4, 32, 96), (4, 128, 384), (8, 0, 100), (8, 32, 160)):
        for split in (1, 3):
            for dtype in (torch.float16, torch.float32):
                interp(check_linear, dtype, 1, 40, K, bits, group, True,
                       (0, 16, 64, 4, 1, split, 8, False, False, True, xvec, False, fixup))


@pytest.mark.parametrize("M", [2, 3, 4])
def test_factored_gemv_rows(interp, M) -> None:  # noqa: F811
    """The factored GEMV for a few rows (kiln.kernels.int_gemv_rows): each word used for
    every row; K ending inside a step, per channel and in groups, split or not, with and
    without bias, float16 and float32."""
    for bits, group, K in ((4, 32, 96), (4, 128, 384), (8, 0, 100), (8, 32, 160)):
        for split in (1, 3):
            for dtype in (torch.float16, torch.float32):
                interp(check_linear, dtype, M, 40, K, bits, group, split == 1,
                       (0, 16, 64, 4, 1, split, 8, False, False, True))


@pytest.mark.parametrize("M", [5, 20, 64])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (8, 0)])
def test_int_gemm_split_k(interp, M, bits, group) -> None:  # noqa: F811
    """tl.dot tiles with K split over 2 and 4 programs (decode batches of a small N),
    finished by split_k_fixup: the last part adds the bias."""
    for split in (2, 4):
        interp(check_linear, torch.float16, M, 40, 512, bits, group, True,
               (16, 16, 32, 4, 1, split))
    interp(check_linear, torch.float16, M, 40, 512, bits, group, True,
           (16, 16, 64, 4, 1, 2, 8, False, True))  # int4: with nibble_dots
    interp(check_linear, torch.float16, M, 48, 512, bits, group, True,  # words, EVEN
           (16, 16, 64, 4, 1, 2, 8, False, False, False, False, True))
    interp(check_linear, torch.float32, M, 24, 256, bits, group, False, (16, 32, 64, 4, 1, 2))


def test_launch_overrides(monkeypatch) -> None:
    """The benchmarks' launch overrides: one row and decode batches (flags optional)."""
    from kiln.kernels import int_gemm

    cpu = torch.device("cpu")
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,4,4,3,0,1,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=4, factored=True, xvec=True)
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,8,4,3,0,1,1,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True, fixup=True)
    monkeypatch.setenv("KILN_INT_GEMVN", "64,128,8,4,3,1")
    assert int_gemm.int_gemm_config(3, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True)
    monkeypatch.setenv("KILN_INT_TILES", "64,64,4,4,2,0,1")
    assert int_gemm.int_gemm_config(64, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        64, 64, 64, 4, 4, split_k=2, words=True)
    monkeypatch.setenv("KILN_INT_TILES", "32,64,4,4,1")
    assert int_gemm.int_gemm_config(16, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        32, 32, 64, 4, 4)
    assert int_gemm.int_gemm_config(65, 4096, 4096, cpu, 4).block_m == 128  # not a batch


def test_int_gemm_default_launches() -> None:
    """The launches measured fastest on an H200 at the 8B shapes (BENCHMARKS.md, fourteenth
    session): one row factored with x as vectors (int4 64 x 128 in up to 8 K splits, int8
    32 x 256 in 4); decode batches in two K splits where each keeps 8 K steps."""
    from kiln.kernels import int_gemm

    cuda = torch.device("cuda")
    cfg = int_gemm.int_gemm_config
    assert cfg(1, 4096, 4096, cuda, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True)
    assert cfg(1, 4096, 256, cuda, 4).split_k == 2  # K of two steps: two splits
    assert cfg(1, 4096, 14336, cuda, 8) == int_gemm.IntGemmConfig(
        0, 32, 256, 4, 3, split_k=4, factored=True, xvec=True)
    assert cfg(16, 4096, 4096, cuda, 4) == int_gemm.IntGemmConfig(16, 32, 64, 4, 4, split_k=2)
    assert cfg(64, 4096, 14336, cuda, 4) == int_gemm.IntGemmConfig(64, 64, 128, 4, 3, split_k=2)
    assert cfg(40, 4096, 4096, cuda, 8) == int_gemm.IntGemmConfig(64, 64, 128, 8, 3, split_k=2)
    assert cfg(64, 4096, 1024, cuda, 8).split_k == 1  # 2 x 4 K steps: too few to split
    assert cfg(300, 4096, 4096, cuda, 8).split_k == 1


def check_bias_dtype() -> None:
    """A float32 bias with 16-bit x: the many-row path casts it as the tiles do."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(24, 64, 4, 32)
    torch.manual_seed(0)
    bias = torch.randn(24).half().float()  # float32 values a 16-bit bias holds exactly
    for M in (int_gemm.DEQUANT_ROWS - 1, int_gemm.DEQUANT_ROWS):
        x = torch.randn(M, 64).half()
        y = int_gemm.int_weight_linear(x, weight, scale, offset, bias)
        _check(f"bias M={M}", x, y, weight, scale, offset, bias.half())


def test_bias_dtype(interp) -> None:  # noqa: F811
    interp(check_bias_dtype)


def check_dequantize(dtype: torch.dtype, N: int, K: int, bits: int, group: int) -> None:
    from kiln.kernels import int_gemm
    from kiln.kernels import reference as ref

    weight, scale, offset = _weight(N, K, bits, group)
    got = int_gemm.dequantize_weight(weight, scale, offset, dtype)
    want = ref.dequantize_int_weight(weight, scale, offset).float().to(dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bits,group,K", [(4, 32, 96), (4, 16, 80), (4, 128, 384),
                                          (8, 0, 99), (8, 64, 192)])
def test_dequantize_weight(interp, bits, group, K) -> None:  # noqa: F811
    """The scratch weight of the many-row path: the reference's values, rounded to x's
    dtype (N past a tile, K not a multiple of the step, groups under and over a step)."""
    for dtype in (torch.float16, torch.float32):
        interp(check_dequantize, dtype, 70, K, bits, group)


def test_functional_dispatch(interp) -> None:  # noqa: F811
    interp(check_functional_dispatch)


def test_compiles_for_hopper(monkeypatch) -> None:
    """The launches int_weight_linear makes on an H200 (132 SMs) at a Llama-3.1-8B shape
    compile for sm_90: the GEMV without spills, tl.dot tiles on tensor cores (wgmma from
    64 rows). Measured: 96-224 registers, no stack, but 8 bytes of stack for int4 at 16
    rows (mma.sync tiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    import triton

    from kiln.kernels import int_gemm
    from kiln.kernels.compile_check import compile_sm90

    N = K = 4096
    monkeypatch.setattr(int_gemm, "_num_sms", lambda device: 132)
    for M in (1, 4, 16, 64, 300):
        for bits in (4, 8):
            cfg = int_gemm.int_gemm_config(M, N, K, torch.device("cuda"), bits)
            meta = dict(BITS=bits, HAS_OFFSET=bits == 4, HAS_BIAS=True, GROUP_TILE=True,
                        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            gemv = cfg.block_m == 0
            values = {"x_ptr": "*bf16", "w_ptr": "*u8" if bits == 4 else "*i8",
                      "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16",
                      "out_ptr": "*fp32" if gemv else "*bf16", "M": 7, "N": N, "K": K,
                      "G": 128, "stride_xm": K,
                      "K_PER_SPLIT": int_gemm.split_length(K, cfg.split_k, cfg.block_k),
                      "stride_wn": K * bits // 8, "stride_sn": K // 128, "stride_om": N}
            if gemv and M == 1:
                assert cfg.split_k > 1  # a few programs per SM at N = 4096
                meta.update(ATOMIC=True)
                for key in ("M", "stride_xm", "stride_om"):
                    values.pop(key)
                values.update(w_ptr="*i32", stride_wn=K * bits // 32, part_ptr="*fp32",
                              count_ptr="*i32")
                meta.pop("GROUP_TILE")
                meta.update(GROUPS=max(1, cfg.block_k // 128), PREFETCH=cfg.prefetch,
                            FACTORED=cfg.factored, XVEC=cfg.xvec)
                values["W_PER_SPLIT"] = values["K_PER_SPLIT"] // (32 // bits)
                kernel = int_gemm._gemv1_kernel
            elif gemv:
                assert cfg.split_k > 1
                meta.update(ROWS=triton.next_power_of_2(M), ATOMIC=True)
                kernel = int_gemm._gemv_kernel
            else:  # decode batches with K split (M 16, 64), prefill without
                assert (cfg.split_k > 1) == (M <= 64), cfg
                meta.update(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, IEEE=False,
                            SPLIT_K=cfg.split_k)
                values.update(part_ptr="*fp32", count_ptr="*i32")
                kernel = int_gemm._gemm_kernel
            r = compile_sm90(kernel, values, meta, cfg.num_warps, cfg.num_stages,
                             variant=f"M{M}-int{bits}")
            assert r.stack_bytes <= (8 if (M, bits) == (16, 4) else 0), r
            if kernel is int_gemm._gemv1_kernel:  # with two K steps' words in registers
                r = compile_sm90(kernel, values, dict(meta, PREFETCH=True, FACTORED=False),
                                 cfg.num_warps, cfg.num_stages,
                                 variant=f"M{M}-int{bits}-prefetch")
                assert r.stack_bytes == 0, r
                # the splits summed by the last one (IntGemmConfig.fixup), out in bf16
                r = compile_sm90(kernel, dict(values, out_ptr="*bf16"),
                                 dict(meta, ATOMIC=False, SPLIT_K=cfg.split_k),
                                 cfg.num_warps, cfg.num_stages, variant=f"M{M}-int{bits}-fixup")
                assert r.stack_bytes == 0, r
                for xvec in (False, True):  # scales once a word (IntGemmConfig.factored)
                    r = compile_sm90(kernel, values, dict(meta, FACTORED=True, XVEC=xvec),
                                     cfg.num_warps, cfg.num_stages,
                                     variant=f"M{M}-int{bits}-factored-xvec{int(xvec)}")
                    assert r.stack_bytes == 0, r
            if not gemv:
                mma = "wgmma.mma_async" if cfg.block_m >= 64 else "mma.sync"
                assert r.instructions[mma] > 0 and r.instructions["cp.async"] > 0, r
            if not gemv and bits == 4:  # the even/odd-k products (IntGemmConfig.nibble_dots)
                r = compile_sm90(kernel, values, dict(meta, NIBBLE_DOTS=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int4-nibbles")
                assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r
                # values read in place from 32-bit words (IntGemmConfig.words)
                r = compile_sm90(kernel, dict(values, w_ptr="*i32", stride_wn=K // 8),
                                 dict(meta, WORDS=True, EVEN=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int4-words")
                assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r


def test_gemv_rows_compiles_for_hopper() -> None:
    """The few-rows factored GEMV at 2 and 4 rows, 8B shape, in the tiles the int-batch
    sweep launches: no stack on sm_90 (Triton 3.6 and 3.9: 64 x 128 int4 at 4 warps takes
    255 registers at 4 rows, so the sweep also has 8 warps; int8 32 x 256 x 4 warps spills,
    so it is launched with 8)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemv_rows
    from kiln.kernels.compile_check import compile_sm90

    K = N = 4096
    for bits, block_n, block_k, warps in ((4, 64, 128, 8), (4, 32, 128, 4), (8, 16, 256, 4),
                                          (8, 32, 256, 8)):
        per = 32 // bits
        for rows in (2, 4):
            r = compile_sm90(int_gemv_rows._gemv_rows_kernel, {
                "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
                "bias_ptr": "*bf16", "out_ptr": "*fp32", "M": 3, "N": N, "K": K, "G": 128,
                "W_PER_SPLIT": K // 8 // per, "stride_xm": K, "stride_wn": K // per,
                "stride_sn": K // 128, "stride_om": N,
            }, dict(ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, BITS=bits,
                    HAS_OFFSET=bits == 4, HAS_BIAS=True, GROUPS=max(1, block_k // 128),
                    ATOMIC=True, EVEN_K=True), warps, 3, variant=f"rows{rows}-int{bits}")
            assert r.stack_bytes == 0, r


def test_main_loop_instructions_are_counted() -> None:
    """benchmarks/int_gemv_sass.py's measure: the one-row GEMV's K loop in SASS, found and
    counted per opcode (int4: FFMAs for scale-and-offset and for the product)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from benchmarks.int_gemv_sass import per_weight

    row = per_weight(4, 32, 256)
    assert row["top"].get("FFMA", 0) >= 1 and 3 < row["per_weight"] < 20, row
    assert row["loop"] == round(row["per_weight"] * 64) or row["loop"] > 0
    # the factored K step: one logic op a value, the scale once a word (Triton 3.6: 5.9
    # vs 7.7 instructions a weight at 64 x 128, 3.9: 6.2 vs 7.7)
    for bits in (4, 8):
        plain, factored = (per_weight(bits, 64, 128, FACTORED=f) for f in (False, True))
        assert factored["per_weight"] < 0.9 * plain["per_weight"], (plain, factored)
        assert factored["top"]["LOP3"] < 1.2, factored


# ---- GPU tests ------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 0)])
def test_gpu_int_linear(N, K, bits, group) -> None:
    """Every row count through int_weight_linear."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(N, K, bits, group, "cuda")
    for M in (1, 2, 5, 8, 16, 33, 64, 300):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(M, K, device="cuda").to(dtype)
            bias = torch.randn(N, device="cuda").to(dtype) if M % 2 else None
            y = int_gemm.int_weight_linear(x, weight, scale, offset, bias)
            _check(f"{dtype} {M}x{N}x{K} int{bits} g{group}", x, y, weight, scale, offset,
                   bias)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 0)])
def test_gpu_opt_in_gemv_launches(bits, group) -> None:
    """The opt-in GEMV launches at 8B shapes: one row with the K splits summed in the
    kernel (fixup), and 2-4 rows factored (kiln.kernels.int_gemv_rows), in the tiles
    int_gemv_bench / int_batch_bench launch."""
    from kiln.kernels import int_gemm

    for N, K in ((6144, 4096), (4096, 14336)):
        weight, scale, offset = _weight(N, K, bits, group, "cuda")
        launches = [(1, int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=8, factored=True,
                                                xvec=True, fixup=True)),
                    (1, int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=32, factored=True,
                                                xvec=True, fixup=True))]
        launches += [(M, int_gemm.IntGemmConfig(0, *tile, split_k=split, factored=True))
                     for M in (2, 3, 4) for tile, split in (((64, 128, 8, 3), 8),
                                                            ((16, 256, 4, 3), 4))]
        for M, cfg in launches:
            x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
            bias = torch.randn(N, device="cuda").to(torch.bfloat16) if M % 2 else None
            y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
            _check(f"{M}x{N}x{K} int{bits} g{group} {cfg}", x, y, weight, scale, offset, bias)


@pytest.mark.gpu
@needs_gpu
def test_gpu_int_linear_in_a_cuda_graph() -> None:
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(4096, 4096, 4, 128, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = int_gemm.int_weight_linear(x, weight, scale, offset)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int_gemm.int_weight_linear(x, weight, scale, offset)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    _check("graph", x, y, weight, scale, offset, None)
    torch.testing.assert_close(y, want, rtol=0, atol=float(want.abs().max()) * 1e-2)
