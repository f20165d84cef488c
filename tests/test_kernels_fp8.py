"""FP8 W8A8 kernels (kiln/kernels/fp8.py) vs the torch reference.

CPU: through Triton's interpreter, in the spawned worker of tests/test_kernels.py (see its
docstring for why). The interpreter runs fp8 tl.dot (operands widened to float16, exact)
and fp8 loads/stores, but its float32 -> e4m3 conversion rounds ties away from zero, so
under TRITON_INTERPRET the kernels round with integer arithmetic instead; the hardware
conversion they use on a GPU is checked by the gpu tests. Also on the CPU: the Triton
launches fp8_linear makes at Llama-3.1-8B shapes compile for sm_90.

GPU (pytest -m gpu): quantization bit for bit, and fp8_linear on both backends at
Llama-3.1-8B shapes. Tolerance of the GEMM, against the reference's float32 result y32
before its cast: the products x_q * w_q are exact in float32 everywhere; they are summed
in another order (CPU, and the Triton kernel's mma.sync tiles of 16 rows: float32
accumulation), or by Hopper's fp8 tensor-core instruction (wgmma: the Triton kernel's
tiles of 64+ rows and _scaled_mm), which adds within each group of products with a
shorter mantissa than float32 before the float32 accumulator takes the group's sum. So
|y - y32| <= TOL * S + 1 ulp of the output dtype, S = (|x_q| @ |w_q|^T) * x_scale * w_scale
the sum of the magnitudes, TOL = EXACT_TOL (2e-5) for float32 accumulation and
FP8_MMA_TOL (5e-4) for the fp8 tensor-core paths (the worst seen on an H200: 2.5e-3 of a
row's largest |y|, about 1.2e-4 S, on the row holding the value 448).
(For random data S is ~15-25 times the largest |y| of a row at K = 4096..14336.)
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")

EXACT_TOL = 2e-5
FP8_MMA_TOL = 5e-4
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3.1-8B (N, K)
SPECIALS = [0.0, -0.0, 1e-30, -1e-30, 448.0, -3.0, 0.5, 2.0 ** -10, 3 * 2.0 ** -11]


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of float32 values v in `dtype` (normal range; its smallest normal below)."""
    info = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exp = torch.frexp(v.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.ones_like(v), exp - 1 - mant)


def _abs_sum(x: torch.Tensor, w_float: torch.Tensor, ws: torch.Tensor,
             in_scale: torch.Tensor | None) -> torch.Tensor:
    """S = (|x_q| @ |w_q|^T) * x_scale * w_scale: the bound the sum's error scales with."""
    from kiln.kernels import reference as ref

    if in_scale is None:
        x_q, x_scale = ref.quantize_fp8_per_token(x.float())
    else:
        x_q, x_scale = ref.quantize_fp8(x.float(), in_scale), in_scale.view(1, 1)
    return (x_q.float().abs() @ w_float.abs().T) * x_scale * ws.view(1, -1)


def _check_linear(name: str, y: torch.Tensor, y32: torch.Tensor, S: torch.Tensor,
                  acc_tol: float) -> None:
    """|y - y32| <= acc_tol * S + one ulp of y's dtype at y32."""
    assert y.shape == y32.shape, (name, y.shape, y32.shape)
    assert not y.isnan().any(), f"{name}: NaN"
    err = (y.float() - y32).abs()
    allowed = acc_tol * S + _ulp(y32, y.dtype)
    worst = (err / S.clamp_min(1e-30)).max().item()
    assert (err <= allowed).all(), (
        f"{name}: {(err > allowed).sum().item()} of {err.numel()} outside the tolerance, "
        f"worst error {worst:.2e} of S")


def _fp8_weight(N: int, K: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, device=device, generator=g) * 0.02
    w[0] = 0  # an all-zero weight row
    scale = (w.abs().amax(1) / 448.0).clamp_min(1e-12)
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale.float()


def _activations(M: int, K: int, dtype: torch.dtype, device: str = "cpu",
                 seed: int = 1) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero row, a few special values."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=g)
    x = x * torch.logspace(-4, 3, M, device=device)[:, None] if M > 1 else x
    x[0, :len(SPECIALS)] = torch.tensor(SPECIALS, device=device)
    if M > 2:
        x[2] = 0
    return x.to(dtype)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


# ---- checks (run in the interpreter worker) -----------------------------------------
def check_quantize(dtype: torch.dtype, M: int, K: int) -> None:
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    x = _activations(M, K, dtype)
    q, s = fp8.quantize_fp8_per_token(x)
    rq, rs = ref.quantize_fp8_per_token(x)
    assert s.dtype == torch.float32 and s.shape == (M, 1) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(s, rs), (s - rs).abs().max()
    assert torch.equal(_bits(q), _bits(rq)), (_bits(q) != _bits(rq)).sum()
    for scale in (0.01, 3e-7):  # the second one saturates most values
        st = torch.tensor([scale])
        assert torch.equal(_bits(fp8.quantize_fp8_static(x, st)),
                           _bits(ref.quantize_fp8(x, st)))


def check_e4m3_rounding() -> None:
    """Every rounding case of float32 -> e4m3fn: ties, subnormals, saturation, -0."""
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite()].unique()
    mids = (e4m3[1:] + e4m3[:-1]) / 2  # exact ties
    eps = torch.finfo(torch.float32).eps
    v = torch.cat([e4m3, mids, mids * (1 + eps), mids * (1 - eps), -mids,
                   torch.linspace(-500, 500, 100_001), torch.linspace(-0.02, 0.02, 40_001),
                   torch.tensor([-0.0, 1e-38, 3e38, -3e38])])
    one = torch.tensor([1.0])
    q = fp8.quantize_fp8_static(v.view(1, -1), one)
    assert torch.equal(_bits(q)[0], _bits(ref.quantize_fp8(v, one))), "e4m3 rounding"


def check_linear(dtype: torch.dtype, M: int, N: int, K: int, static: bool, with_bias: bool,
                 config: tuple) -> None:
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    w, ws = _fp8_weight(N, K)
    x = _activations(M, K, dtype) * (0.5 if static else 1)
    in_scale = torch.tensor([0.004]) if static else None
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = fp8.triton_fp8_linear(x, w, ws, in_scale, bias, config=fp8.GemmConfig(*config))
    assert y.dtype == dtype
    y32 = ref.fp8_linear(x.float(), w, ws, in_scale, None if bias is None else bias.float())
    # the interpreter's dot is a float32 matmul: only the order of the sums differs
    _check_linear(f"{dtype} {M}x{N}x{K} {config}", y, y32, _abs_sum(x, w.float(), ws, in_scale),
                  EXACT_TOL)


def check_functional_dispatch() -> None:
    """kiln.functional's CUDA branch: 3-D x, both entry points, the auto backend."""
    from kiln import functional as KF
    from kiln.kernels import reference as ref

    w, ws = _fp8_weight(48, 64)
    x = _activations(6, 64, torch.float32).view(2, 3, 64)
    KF._triton = lambda t: True  # CPU tensors, kernels interpreted (this worker only)
    y = KF.fp8_linear(x, w, ws)
    assert y.shape == (2, 3, 48)
    _check_linear("functional", y.view(6, 48), ref.fp8_linear(x.view(6, 64), w, ws),
                  _abs_sum(x.view(6, 64), w.float(), ws, None), EXACT_TOL)
    q, s = KF.quantize_fp8_per_token(x.view(6, 64))
    rq, rs = ref.quantize_fp8_per_token(x.view(6, 64))
    assert torch.equal(_bits(q), _bits(rq)) and torch.equal(s, rs)


def check_fused_moe_fp8(dtype: torch.dtype, tokens: int, experts: int, top_k: int,
                        block_m: int | None, device: str = "cpu") -> float:
    """FP8 experts: kernels.moe (per-token input quantization, SiLU*mul quantizing per pair,
    two e4m3 grouped GEMMs) against the reference's per-expert loop. Returns the largest
    difference relative to the largest |output|.

    The products are exact on both sides and the sums differ only in order; on the CPU
    float16 stands in for bfloat16 (the interpreter truncates float32 -> bfloat16, where
    torch and the GPU round to nearest)."""
    from kiln.kernels import reference as ref
    from kiln.kernels.moe import fused_moe

    torch.manual_seed(0)
    hidden, inter = 96, 80  # not multiples of the tiles
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    x[0, 3] = 40.0  # an outlier: the token's scale comes from it
    w13, s13 = _fp8_weight(experts * 2 * inter, hidden)
    w2, s2 = _fp8_weight(experts * hidden, inter)
    w13, s13 = w13.view(experts, 2 * inter, hidden).to(device), s13.view(experts, -1).to(device)
    w2, s2 = w2.view(experts, hidden, inter).to(device), s2.view(experts, -1).to(device)
    weights, ids = ref.moe_route(torch.randn(tokens, experts, device=device), top_k, True)
    ids[0] = torch.arange(top_k)  # at least one expert with a single pair, one unused
    got = fused_moe(x, w13, w2, weights, ids, block_m=block_m, w13_scale=s13, w2_scale=s2)
    want = ref.fused_moe(x, w13, w2, weights, ids, s13, s2)
    assert got.shape == want.shape and got.dtype == dtype
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    # A float32 sum's last bit can still move a stored 16-bit value by an ulp, and that one
    # e4m3 rounding of the down GEMM's input. Quantizing the activations at all moves the
    # output by ~5% of its largest value, missing a scale by far more.
    bound = 2e-5 if dtype == torch.float32 else 2e-3
    assert err <= bound, (dtype, tokens, err)
    return err


def check_fused_norm_act_quant(dtype: torch.dtype, M: int, K: int, device: str = "cpu"
                               ) -> None:
    """RMSNorm (with and without the residual add) and SiLU / GeGLU products quantized in
    the same kernel equal, bit for bit, the unfused kernels' output quantized after; and
    an FP8 linear fed the fused FP8Act gives the unfused result exactly."""
    from kiln.kernels import fp8, rms_norm, silu_mul
    from kiln.kernels import reference as ref

    g = torch.Generator(device=device).manual_seed(2)
    x = _activations(M, K, dtype, device)
    r = (torch.randn(M, K, device=device, generator=g) * 3).to(dtype)
    w = (torch.rand(K, device=device, generator=g) + 0.5).to(dtype)
    gate_up = (torch.randn(M, 2 * K, device=device, generator=g) * 4).to(dtype)
    for static in (None, torch.tensor([0.02], device=device)):
        quant = ref.FP8Quant(static)

        def unfused(y, static=static):
            return ((fp8.quantize_fp8_per_token(y)) if static is None else
                    (fp8.quantize_fp8_static(y, static), static.view(1, 1).expand(M, 1)))

        cases = {
            "rms_norm": (rms_norm.rms_norm(x, w, 1e-5, quant),
                         unfused(rms_norm.rms_norm(x, w, 1e-5))),
            "add_rms_norm": (rms_norm.add_rms_norm(x, r, w, 1e-5, quant)[0],
                             unfused(rms_norm.add_rms_norm(x, r, w, 1e-5)[0])),
            "silu_mul": (silu_mul.act_mul_quant(gate_up, quant),
                         unfused(silu_mul.silu_and_mul(gate_up))),
            "gelu_tanh_mul": (silu_mul.act_mul_quant(gate_up, quant, gelu_tanh=True),
                              unfused(silu_mul.gelu_tanh_and_mul(gate_up))),
        }
        for name, (act, (q, s)) in cases.items():
            label = f"{name} {dtype} {M}x{K} {'static' if static is not None else 'dynamic'}"
            assert isinstance(act, ref.FP8Act) and act.dtype == dtype, label
            assert torch.equal(act.scale, s), (label, (act.scale - s).abs().max())
            assert torch.equal(_bits(act.q), _bits(q)), (label, (_bits(act.q) != _bits(q)).sum())
        # the residual stream comes out as without quantization
        assert torch.equal(rms_norm.add_rms_norm(x, r, w, 1e-5, quant)[1],
                           rms_norm.add_rms_norm(x, r, w, 1e-5)[1])
        wq, ws = _fp8_weight(32, K, device)
        act = cases["add_rms_norm"][0]
        plain = rms_norm.add_rms_norm(x, r, w, 1e-5)[0]
        backends = ("triton", "scaled_mm") if device == "cuda" and K % 16 == 0 else ("triton",)
        for backend in backends:
            y_fused = fp8.fp8_linear(act, wq, ws, static, backend=backend)
            y_plain = fp8.fp8_linear(plain, wq, ws, static, backend=backend)
            assert y_fused.dtype == dtype and torch.equal(y_fused, y_plain), backend
        assert torch.equal(ref.fp8_linear(act, wq, ws, static), ref.fp8_linear(plain, wq, ws,
                                                                               static))


# ---- CPU tests ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K", [(5, 96), (2, 9000)])
def test_fused_norm_act_quant(interp, dtype, M, K) -> None:  # noqa: F811
    interp(check_fused_norm_act_quant, dtype, M, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K", [(5, 300), (3, 20000), (1, 64)])
def test_quantize_matches_reference_bitwise(interp, dtype, M, K) -> None:  # noqa: F811
    interp(check_quantize, dtype, M, K)


def test_e4m3_rounding_matches_torch(interp) -> None:  # noqa: F811
    interp(check_e4m3_rounding)


# GemmConfig fields: the decode tile with quantization fused (M <= 16: ROWS rows padded;
# M = 35: whole tiles) and not, a grouped large-M order; K is not always a multiple of
# BLOCK_K; split-K over 2 programs where K divides into 2 x BLOCK_K (M = 1 and 35; at
# K = 200 it falls back to one); the swapped-operand kernel (kiln.kernels.fp8_swap: M up to
# the token tile, 16, 32 or 64, else the unswapped tile), alone and split. (Prefetch and PDL
# are compiled out under the interpreter.)
CONFIGS = [(16, 32, 64, 4, 2, True), (16, 16, 128, 4, 2, False), (32, 16, 32, 4, 2, False, 2),
           (16, 16, 16, 4, 2, False, 1, 128, 0, False, 2),
           (16, 16, 64, 4, 2, False, 1, 128, 0, False, 1, True),
           (16, 32, 32, 4, 2, False, 1, 128, 0, False, 2, True),
           (64, 16, 32, 4, 2, False, 1, 128, 0, False, 1, True),
           (32, 16, 64, 4, 2, False, 1, 128, 0, False, 1, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 48, 256), (5, 40, 200), (35, 64, 96)])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("config", CONFIGS, ids=["fused", "quant-kernel", "grouped", "split-k",
                                                  "swap", "swap-split-k", "swap-64",
                                                  "swap-32"])
def test_triton_fp8_linear(interp, dtype, M, N, K, static, config) -> None:  # noqa: F811
    interp(check_linear, dtype, M, N, K, static, M % 2 == 1, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 4, 2, None), (37, 8, 2, 16),
                                                          (20, 6, 3, 64)])
def test_fused_moe_fp8(interp, dtype, tokens, experts, top_k, block_m) -> None:  # noqa: F811
    """FP8 experts' grouped GEMMs vs the reference (a decode batch, a prefill one)."""
    interp(check_fused_moe_fp8, dtype, tokens, experts, top_k, block_m)


def test_functional_dispatch(interp) -> None:  # noqa: F811
    interp(check_functional_dispatch)


def test_compiles_for_hopper() -> None:
    """The launches fp8_linear makes at Llama-3.1-8B shapes compile for sm_90 into the code
    meant: no spills, tensor-core dots (wgmma for tiles of 64+ rows), async copies."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import fp8, fp8_swap
    from kiln.kernels.compile_check import compile_sm90

    seen = set()
    for N, K in SHAPES:
        for M in (1, 2, 7, 16, 32, 64, 128, 300, 4096):
            cfg = fp8.gemm_config(M, N, K, swap_ok=True)  # an H100 / H200's launches
            swap = cfg.swap and M <= cfg.block_m
            meta = fp8_swap.swap_constexprs(cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k,
                                            M, N, K, True, True, False) if swap else \
                fp8.kernel_constexprs(cfg, M, K, static=False, has_bias=True)
            key = (cfg, swap, meta.get("ROWS"), meta["BLOCK_K"], meta.get("PREFETCH"),
                   meta["SPLIT_K"])
            if key in seen:
                continue
            seen.add(key)
            r = compile_sm90(fp8_swap._fp8_swap_kernel if swap else fp8._fp8_gemm_kernel, {
                "x_ptr": "*bf16" if cfg.fuse_quant else "*fp8e4nv", "xs_ptr": "*fp32",
                "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                "part_ptr": "*fp32", "count_ptr": "*i32", "M": 7, "N": N, "K": K,
                "stride_xm": K, "stride_wn": K, "stride_om": N,
            }, meta, cfg.num_warps, cfg.num_stages, variant=cfg.tag())
            assert r.stack_bytes == 0, r
            assert r.instructions["cp.async"] > 0, r
            mma = "wgmma.mma_async" if cfg.block_m >= 64 or swap else "mma.sync"
            assert r.instructions[mma] > 0, r
    r = compile_sm90(fp8._quant_kernel, {
        "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
        "static_scale_ptr": "*fp32", "K": 14336, "stride_x": 14336, "stride_q": 14336,
    }, {"STATIC": False, "BLOCK_K": 16384, "ONE_TILE": True, "PDL": True, "INTERPRET": False}, 8)
    assert r.stack_bytes == 0 and r.instructions["ld.global.v4"] > 0, r


# ---- GPU tests ------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
_WEIGHTS: dict = {}


def _gpu_weight(N: int, K: int):
    """(e4m3 weight, scale, weight.float()) per shape, made once for the module."""
    if (N, K) not in _WEIGHTS:
        _WEIGHTS.clear()  # one shape at a time: 28672x4096 float32 is 470 MB
        w, ws = _fp8_weight(N, K, "cuda")
        _WEIGHTS[(N, K)] = (w, ws, w.float())
    return _WEIGHTS[(N, K)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", [(1, 4096), (7, 14336), (300, 4096), (3, 20000)])
def test_gpu_fused_norm_act_quant(dtype, M, K) -> None:
    check_fused_norm_act_quant(dtype, M, K, "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_gpu_act_mul_quant_in_slices(dtype, static) -> None:
    """From 128 rows act_mul_quant takes a Llama-3.1-8B row (14336) in 4096-wide slices
    (two passes): the bits of one whole-row tile, and of SiLU*mul quantized after."""
    from kiln.kernels import fp8, silu_mul
    from kiln.kernels import reference as ref

    gate_up = (torch.randn(160, 2 * 14336, device="cuda") * 4).to(dtype)
    quant = ref.FP8Quant(torch.tensor([0.02], device="cuda") if static else None)
    sliced = silu_mul.act_mul_quant(gate_up, quant)
    whole = silu_mul.act_mul_quant(gate_up, quant, launch={"block": 16384, "num_warps": 8})
    y = silu_mul.silu_and_mul(gate_up)
    q = fp8.quantize_fp8_static(y, quant.static_scale) if static else \
        fp8.quantize_fp8_per_token(y)[0]
    for act in (sliced, whole):
        assert torch.equal(_bits(act.q), _bits(q)), (_bits(act.q) != _bits(q)).sum()
    assert torch.equal(sliced.scale, whole.scale)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K", [(1, 4096), (7, 14336), (300, 4096), (3, 20000)])
def test_gpu_quantize_bitwise(dtype, M, K) -> None:
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    x = _activations(M, K, dtype, "cuda")
    q, s = fp8.quantize_fp8_per_token(x)
    rq, rs = ref.quantize_fp8_per_token(x)
    assert torch.equal(s, rs)
    assert torch.equal(_bits(q), _bits(rq)), (_bits(q) != _bits(rq)).sum().item()
    st = torch.tensor([0.01], device="cuda")
    assert torch.equal(_bits(fp8.quantize_fp8_static(x, st)), _bits(ref.quantize_fp8(x, st)))
    # every rounding case of the hardware conversion
    v = torch.linspace(-500, 500, 1_000_001, device="cuda")
    v = torch.cat([v, torch.linspace(-0.02, 0.02, 100_001, device="cuda")]).view(1, -1)
    one = torch.ones(1, device="cuda")
    assert torch.equal(_bits(fp8.quantize_fp8_static(v, one)), _bits(ref.quantize_fp8(v, one)))


def _gpu_linear_case(backend: str, dtype: torch.dtype, N: int, K: int, M: int, static: bool,
                     with_bias: bool) -> None:
    from kiln.kernels import fp8, fp8_swap
    from kiln.kernels import reference as ref

    w, ws, wf = _gpu_weight(N, K)
    x = _activations(M, K, dtype, "cuda", seed=M)
    in_scale = (x.float().abs().amax() / 300).reshape(1) if static else None
    bias = (torch.randn(N, device="cuda") * 0.1).to(dtype) if with_bias else None
    y = fp8.fp8_linear(x, w, ws, in_scale, bias, backend=backend)
    assert y.dtype == dtype and y.shape == (M, N)
    y32 = ref.fp8_linear(x.float(), w, ws, in_scale, None if bias is None else bias.float(), wf)
    cfg = fp8.gemm_config(M, N, K, fp8_swap.wgmma_device(w))  # fp8 wgmma sums less exactly
    exact = backend == "triton" and cfg.block_m < 64 and not (cfg.swap and M <= cfg.block_m)
    _check_linear(f"{backend} {dtype} M={M} N={N} K={K} static={static} bias={with_bias}",
                  y, y32, _abs_sum(x, wf, ws, in_scale), EXACT_TOL if exact else FP8_MMA_TOL)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 7, 32, 64, 300])
def test_gpu_fp8_linear(backend, N, K, M) -> None:
    """Both backends, dynamic and static, with and without bias, bf16 and fp16."""
    for dtype in (torch.bfloat16, torch.float16):
        for static in (False, True):
            for with_bias in (False, True):
                _gpu_linear_case(backend, dtype, N, K, M, static, with_bias)


# launches benchmarks/fp8_gemm.py --sweep times beyond what gemm_config picks: quantization
# fused into the GEMM (with and without the L2 prefetch), PDL on other tiles, split-K
GPU_CONFIGS = [(16, 32, 256, 4, 4, True), (16, 32, 512, 4, 4, True, 1, 128, 2048),
               (16, 32, 256, 4, 4, False, 1, 128, 0, True),
               (64, 32, 256, 4, 4, False, 1, 128, 1024, True),
               (64, 64, 256, 4, 4, False, 8, 128, 0, True),
               (16, 32, 256, 4, 4, False, 1, 128, 0, True, 4),
               (16, 16, 512, 4, 4, False, 1, 128, 1024, True, 2),
               (16, 64, 256, 4, 6, False, 1, 128, 0, True, 2, True),
               (16, 128, 128, 4, 8, False, 1, 128, 0, True, 1, True)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gpu_triton_configs(config) -> None:
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    cfg = fp8.GemmConfig(*config)
    for N, K in ((6144, 4096), (4096, 14336)):
        w, ws, wf = _gpu_weight(N, K)
        for M in (1, 5, 16, 64):
            x = _activations(M, K, torch.bfloat16, "cuda", seed=M)
            bias = torch.randn(N, device="cuda").to(torch.bfloat16)
            for in_scale in (None, (x.float().abs().amax() / 300).reshape(1)):
                y = fp8.triton_fp8_linear(x, w, ws, in_scale, bias, config=cfg)
                y32 = ref.fp8_linear(x.float(), w, ws, in_scale, bias.float(), wf)
                _check_linear(f"{cfg.tag()} M={M} N={N} K={K} static={in_scale is not None}",
                              y, y32, _abs_sum(x, wf, ws, in_scale),
                              FP8_MMA_TOL if cfg.block_m >= 64 or (cfg.swap and M <= cfg.block_m)
                              else EXACT_TOL)


@pytest.mark.gpu
@needs_gpu
def test_gpu_auto_dispatch_and_graph() -> None:
    """The default backend at every benchmarked M, also replayed from a CUDA graph."""
    from kiln.kernels import fp8
    from kiln.kernels import reference as ref

    w, ws, wf = _gpu_weight(4096, 4096)
    for M in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        x = _activations(M, 4096, torch.bfloat16, "cuda", seed=M)
        y32 = ref.fp8_linear(x.float(), w, ws, None, None, wf)
        S = _abs_sum(x, wf, ws, None)
        _check_linear(f"auto M={M}", fp8.fp8_linear(x, w, ws), y32, S, FP8_MMA_TOL)
        static_x = torch.empty_like(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fp8.fp8_linear(static_x, w, ws)
        static_x.copy_(x)
        graph.replay()
        _check_linear(f"graph M={M}", y, y32, S, FP8_MMA_TOL)
