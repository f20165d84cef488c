"""The one-row int4 GEMV with the residual add + RMSNorm after it in its epilogue
(kiln.kernels.int_gemv_epilogues.int4_add_norm, opt-in KILN_INT_ADD_NORM=1): the bits of
the unfused route (the same GEMV, then kiln's add + RMSNorm kernel) under the Triton
interpreter and on a GPU at the 8B's o and down shapes; the layers' route to it
(RowLinear.deferred -> PendingLinear -> reduce_add_norm); an int4 engine's greedy tokens
with it on the GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_int4_glu import LAUNCHES, compile_epilogue
from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _weight

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")
EPS = 1e-5


def check_add_norm(N: int, K: int, group: int, launch: str, with_offset: bool,
                   device: str = "cpu") -> None:
    """Twice in a row (the row's counter is zeroed again for the next call): the unfused
    route's next residual bit for bit, and its norm within one bfloat16 step (its sum of
    squares is taken in another order)."""
    from kiln.kernels import int_gemm, rms_norm
    from kiln.kernels.int_gemv_epilogues import int4_add_norm

    if launch:
        os.environ["KILN_INT_GEMV1"] = launch
    try:
        weight, scale, offset = _weight(N, K, 4, group, device, seed=K + N)
        offset = offset if with_offset else None
        torch.manual_seed(N)
        x = torch.randn(1, K, device=device).to(torch.bfloat16)
        residual = torch.randn(1, N, device=device).to(torch.bfloat16)
        norm_weight = torch.randn(N, device=device).to(torch.bfloat16)
        stored = int_gemm.int_weight_linear(x, weight, scale, offset, None)
        want, want_res = rms_norm.add_rms_norm(stored, residual, norm_weight, EPS)
        for _ in range(2):
            poison = torch.full_like(residual, float("nan"))  # the memory res_out may reuse:
            del poison  # a norm read before every block stored its rows is then NaN
            got = int4_add_norm(x, weight, scale, offset, residual, norm_weight, EPS)
            assert got is not None, (N, K, group, launch)
            normed, res = got
            assert torch.equal(res, want_res), (N, K, group, launch)
            assert normed.shape == want.shape and normed.dtype == want.dtype
            step = want.float().abs().clamp_min(1e-3) * 2.0 ** -7  # one bf16 step
            assert ((normed.float() - want.float()).abs() <= step).all(), (N, K, launch)
    finally:
        os.environ.pop("KILN_INT_GEMV1", None)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_int4_add_norm_epilogue(interp, launch) -> None:  # noqa: F811
    """40 columns (ragged tiles), K 1024 in groups of 128 and of 32, with and without
    offsets; kiln's launch, one split, splits summed in the kernel, K steps of 4 groups."""
    interp(check_add_norm, 40, 1024, 128, launch, True)
    interp(check_add_norm, 24, 1024, 32, launch, False)


def test_int4_add_norm_not_taken() -> None:
    """Where the epilogue cannot run, None (the caller runs the two): several rows, int8
    storage, K splits summed by atomics, a residual or norm weight of another dtype or
    shape."""
    from kiln.kernels.int_gemv_epilogues import int4_add_norm

    weight, scale, offset = _weight(64, 256, 4, 128)
    x = torch.randn(1, 256).to(torch.bfloat16)
    res = torch.randn(1, 64).to(torch.bfloat16)
    nw = torch.randn(64).to(torch.bfloat16)
    assert int4_add_norm(torch.randn(2, 256).to(torch.bfloat16), weight, scale, offset,
                         res.expand(2, 64), nw, EPS) is None
    w8, s8, _ = _weight(64, 256, 8, 128)
    assert int4_add_norm(x, w8, s8, None, res, nw, EPS) is None
    assert int4_add_norm(x, weight, scale, offset, res.float(), nw, EPS) is None
    assert int4_add_norm(x, weight, scale, offset, res, nw.float(), EPS) is None
    assert int4_add_norm(x, weight, scale, offset, res[:, :32], nw, EPS) is None
    os.environ["KILN_INT_GEMV1"] = "32,128,2,4,3,0,1,1,0,0,0,1"  # 2 splits, atomics
    try:
        assert int4_add_norm(x, weight, scale, offset, res, nw, EPS) is None
    finally:
        del os.environ["KILN_INT_GEMV1"]


def check_add_norm_route() -> None:
    """An int4 gated MLP asked to defer its down projection: with KILN_INT_ADD_NORM=1 at one
    row it comes back a PendingLinear that reduce_add_norm runs through the epilogue (the
    unfused route's next residual, its norm within a bfloat16 step); off, at two rows, or
    for a LayerNorm, the product runs as before (materialize) with the same bits."""
    from kiln import functional as KF
    from kiln.kernels import int_gemv_epilogues
    from kiln.layers import swap_input
    from kiln.layers.linear import PendingLinear
    from kiln.layers.mlp import GatedMLP
    from kiln.layers.norm import LayerNorm, RMSNorm, reduce_add_norm
    from kiln.layers.weight_only import IntWeightMethod

    torch.manual_seed(5)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    calls, real = [], int_gemv_epilogues.int4_add_norm
    int_gemv_epilogues.int4_add_norm = lambda *a: calls.append(1) or real(*a)
    mlp = GatedMLP(256, 128).to(torch.bfloat16)
    norm, layer_norm = RMSNorm(256, EPS), LayerNorm(256, EPS)
    for p in [*mlp.parameters(), *norm.parameters(), *layer_norm.parameters()]:
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).to(torch.bfloat16)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        IntWeightMethod("int4_g128_offset", 4, 128, True).quantize_from_float(layer, None)
    try:
        for rows in (1, 2):
            x = torch.randn(rows, 256).to(torch.bfloat16)
            residual = torch.randn(rows, 256).to(torch.bfloat16)
            want = norm(mlp(x), residual)
            for on in (False, True):
                swap_input.INT_ADD_NORM = on
                calls.clear()
                pending = mlp(x, defer=True)
                assert isinstance(pending, PendingLinear) == (on and rows == 1)
                got = reduce_add_norm(norm, pending, residual, 1, False)
                assert calls == ([1] if on and rows == 1 else []), (rows, on, calls)
                assert torch.equal(got[1], want[1])
                step = want[0].float().abs().clamp_min(1e-3) * 2.0 ** -7
                assert ((got[0].float() - want[0].float()).abs() <= step).all()
                if isinstance(pending, PendingLinear):  # a LayerNorm runs the product first
                    ln = reduce_add_norm(layer_norm, pending, residual, 1, False)
                    for a, b in zip(ln, layer_norm(mlp(x), residual)):
                        assert torch.equal(a, b)
    finally:
        int_gemv_epilogues.int4_add_norm, swap_input.INT_ADD_NORM = real, False


def test_int4_add_norm_route(interp) -> None:  # noqa: F811
    interp(check_add_norm_route)


def test_int4_add_norm_compiles_for_hopper() -> None:
    """The epilogue compiles for sm_90 without spills, PDL-launched, in the o and down
    launches kiln makes (one split, splits summed in the kernel) at 8B shapes."""
    norm = dict(ADD_NORM=True, NORM_N=4096, res_ptr="*bf16", res_out_ptr="*bf16",
                nw_ptr="*bf16", eps=EPS)
    compile_epilogue(4096, 4096, ((32, 256, 4, 1), (16, 512, 2, 1), (32, 256, 4, 4)), **norm)
    compile_epilogue(4096, 14336, ((32, 256, 4, 1), (32, 256, 4, 8)), **norm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("launch", LAUNCHES)
def test_gpu_int4_add_norm_at_8b_shape(launch) -> None:
    """The o (4096 x 4096) and down (4096 x 14,336) shapes in groups of 128 and a small
    ragged one in groups of 32: the unfused route's bits (the norm within a step)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    check_add_norm(4096, 4096, 128, launch, True, "cuda")
    check_add_norm(4096, 14336, 128, launch, True, "cuda")
    check_add_norm(40, 1024, 32, launch, False, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group", [128, 32])
def test_gpu_int4_engine_with_add_norm(group, tmp_path, monkeypatch) -> None:
    """A bfloat16 int4 engine (groups of 128: the pairs GEMV; of 32: the TMA-fed one on
    Hopper) decoding one request at a time through CUDA graphs: with KILN_INT_ADD_NORM=1 the
    epilogue is taken (o and down of every layer) and each decode step's logprobs agree
    with the unfused route's to bfloat16 rounding (agree_to_rounding)."""
    from kiln import LLM, SamplingParams
    from kiln.layers import swap_input
    from kiln.layers.weight_only import IntWeightMethod
    from tests.test_int4_gemv_tma import agree_to_rounding, tiny_int4_engine

    engine_dir = tiny_int4_engine(tmp_path, group)
    taken = []
    real = IntWeightMethod.apply_add_norm
    monkeypatch.setattr(IntWeightMethod, "apply_add_norm", lambda *a: (
        lambda y: taken.append(y is not None) or y)(real(*a)))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=8)
    prompts = [[5, 6, 7], list(range(10, 60)), [300, 2, 150, 9]]
    runs = []
    for on in (False, True):
        monkeypatch.setattr(swap_input, "INT_ADD_NORM", on)
        taken.clear()
        llm = LLM(engine_dir, device="cuda")
        runs.append([llm.generate([p], params)[0].outputs[0] for p in prompts])
        del llm
        assert bool(taken) == on and all(taken), taken
    print("largest logprob difference x 1000:", agree_to_rounding(runs, 0.05))


def test_tma_gemv_add_norm_compiles_for_hopper() -> None:
    """The TMA-fed GEMV's add + RMSNorm epilogue (Gluon) compiles for sm_90 without
    spills, in 4 K splits (the down projection's) and PDL-launched; its K loop is as long
    as the plain launch's."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from tests.test_int4_gemv_tma import _compile, _loop_and_after

    for G in (32, 128):
        report, sass = _compile(G, 32, 4, True, pdl=True, add_norm=True)
        assert report.stack_bytes == 0, report
        plain = _compile(G, 32, 4, True, pdl=True)[1]
        # (the same count: ptxas picks other equivalent opcodes for a few, e.g. a shift
        # for an IMAD.U32)
        assert len(_loop_and_after(sass)[0]) == len(_loop_and_after(plain)[0])
        assert "RED" in sass or "ATOM" in sass  # the row's count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU")
@pytest.mark.parametrize("N,K,G", [(4096, 4096, 32), (4096, 14336, 32), (4096, 14336, 128),
                                   (1000, 1024, 32)])
def test_gpu_tma_gemv_add_norm(N, K, G) -> None:
    """The TMA-fed GEMV's epilogue against the same GEMV stored, then kiln's add +
    RMSNorm kernel, twice in a row: the next residual bit for bit, the norm within one
    bfloat16 step."""
    from kiln.kernels import rms_norm
    from kiln.kernels.int4_gemv_tma import w4_gemv_tma, w4_gemv_tma_add_norm

    weight, scale, offset = _weight(N, K, 4, G, "cuda", seed=N + K)
    torch.manual_seed(G)
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    residual = torch.randn(1, N, device="cuda").to(torch.bfloat16)
    norm_weight = torch.randn(N, device="cuda").to(torch.bfloat16)
    want, want_res = rms_norm.add_rms_norm(w4_gemv_tma(x, weight, scale, offset, None),
                                           residual, norm_weight, EPS)
    for _ in range(2):
        normed, res = w4_gemv_tma_add_norm(x, weight, scale, offset, residual, norm_weight,
                                           EPS)
        assert torch.equal(res, want_res)
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -7
        assert ((normed.float() - want.float()).abs() <= step).all()
