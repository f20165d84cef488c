"""kiln.kernels.gemv_swap (the default for 16-bit decode linears on sm_90; its prologues
opt-in, KILN_BF16_SWAP=fused): the swapped 16-bit decode linear, plain or with RMSNorm
(+ residual) or act(gate) * up folded into its prologue, under the Triton interpreter
against the unfused torch reference (norm or activation, rounded to the dtype, then the
linear): every prologue, odd K, ragged N, split K, bias, 1-16 rows; on a GPU at 8B shapes
and in engines (with each opt-in of tests/test_gemv_swap_epilogues.py's too)."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)


def check_swap(dtype: torch.dtype, M: int, N: int, K: int, prologue: str, bias: bool,
               split_k: int, block_k: int) -> None:
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import reference as ref

    torch.manual_seed(M * 7 + N + K)
    width = 2 * K if prologue in ("silu", "gelu") else K
    x = torch.randn(M, width, dtype=dtype)
    r = torch.randn(M, K, dtype=dtype)
    nw = (1 + 0.1 * torch.randn(K)).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    cfg = gs.SwapConfig(block_w=32, block_k=block_k, num_warps=4, num_stages=2,
                        split_k=split_k)
    res = None
    if prologue == "none":
        a, got = x, gs.gemv_swap(x, w, b, config=cfg)
    elif prologue == "rms":
        a = ref.rms_norm(x, nw, 1e-5)
        got = gs.gemv_swap(x, w, b, norm_weight=nw, eps=1e-5, config=cfg)
    elif prologue in ("add_rms", "add_rms_prepass"):
        a, want_res = ref.add_rms_norm(x, r, nw, 1e-5)
        got, res = gs.gemv_swap(x, w, b, residual=r, norm_weight=nw, eps=1e-5, config=cfg,
                                late_norm=prologue == "add_rms")
        assert torch.equal(res, want_res)  # s = x + r, rounded to the dtype, bit for bit
    else:
        a = ref.silu_and_mul(x) if prologue == "silu" else ref.gelu_tanh_and_mul(x)
        act = gs.ACT_SILU if prologue == "silu" else gs.ACT_GELU_TANH
        got = gs.gemv_swap(x, w, b, act=act, config=cfg)
    want = a.float() @ w.float().T + (b.float() if bias else 0)
    assert got.shape == (M, N) and got.dtype == dtype
    # the GEMM input a rounds as the unfused kernels; the sums differ in order (and the
    # norm's mean in its last float32 bit): a few ulp of the output
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    err = ((got.float() - want).abs() / (want.abs() + 1)).max().item()
    assert err < tol, f"max relative error {err:.2e}"


@pytest.mark.parametrize("prologue", ["none", "rms", "add_rms", "add_rms_prepass", "silu",
                                      "gelu"])
@pytest.mark.parametrize("M,N,K,split_k,block_k", [
    (1, 96, 256, 1, 64),     # even tiles
    (3, 70, 200, 2, 64),     # ragged N, odd K, two splits
    (16, 64, 128, 4, 32),    # all 16 rows, four splits
])
def test_gemv_swap_matches_the_unfused_reference(interp, prologue, M, N, K,  # noqa: F811
                                                 split_k, block_k) -> None:
    interp(check_swap, torch.float16, M, N, K, prologue, bias=M == 3, split_k=split_k,
           block_k=block_k)


def test_gemv_swap_float32(interp) -> None:  # noqa: F811
    interp(check_swap, torch.float32, 2, 48, 96, "add_rms", bias=True, split_k=2, block_k=32)


def check_errors() -> None:
    from kiln.kernels import gemv_swap as gs

    x = torch.randn(17, 64, dtype=torch.float16)
    w = torch.randn(32, 64, dtype=torch.float16)
    with pytest.raises(AssertionError, match="1-16 rows"):
        gs.gemv_swap(x, w)
    with pytest.raises(AssertionError, match="width"):
        gs.gemv_swap(x[:2], w, act=gs.ACT_SILU)
    with pytest.raises(AssertionError, match="one prologue"):
        gs.gemv_swap(x[:2], w, norm_weight=w[0], act=gs.ACT_SILU)


def test_gemv_swap_refuses_what_it_cannot_take(interp) -> None:  # noqa: F811
    interp(check_errors)


def check_config() -> None:
    """Every 8B shape's launch fits Hopper's shared memory and splits K evenly."""
    from kiln.kernels.gemv_swap import swap_config

    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        cfg = swap_config(1, n, k)
        ring = cfg.block_w * cfg.block_k * 2 * cfg.num_stages  # bf16 weight tiles in flight
        assert ring <= 160 * 1024 and k % (cfg.split_k * cfg.block_k) == 0, (n, k, cfg)


def test_swap_config_fills_the_card(interp) -> None:  # noqa: F811
    interp(check_config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("layer", ["qkv", "o", "gate_up", "down"])
def test_gpu_gemv_swap_at_8b_shapes(M: int, layer: str) -> None:
    """bf16 at Llama-3.1-8B shapes, the default launch, against kiln's unfused kernels and
    F.linear: within bf16 rounding of the output; the residual sum bit for bit."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    import torch.nn.functional as F

    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import rms_norm, silu_mul

    N, K = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
            "down": (4096, 14336)}[layer]
    g = torch.Generator(device="cuda").manual_seed(M)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, 2 * K if layer == "down" else K, device="cuda", generator=g).to(**bf)
    r = torch.randn(M, K, device="cuda", generator=g).to(**bf)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(**bf)
    if layer in ("qkv", "gate_up"):
        a, want_res = rms_norm.add_rms_norm(x, r, nw, 1e-5)
        got, res = gs.gemv_swap(x, w, residual=r, norm_weight=nw, eps=1e-5)
        assert torch.equal(res, want_res)
    elif layer == "down":
        a = silu_mul.silu_and_mul(x)
        got = gs.gemv_swap(x, w, act=gs.ACT_SILU)
    else:
        a = x
        got = gs.gemv_swap(x, w, config=gs.SwapConfig(64, 128, 4, 8, 4))  # four splits
    want = F.linear(a, w).float()
    err = ((got.float() - want).abs().amax(1) / want.abs().amax(1)).max().item()
    assert err < 1.6e-2, f"{layer} M={M}: {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["plain", "fused", "pdl", "glu", "rope", "all"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_engine_with_the_swapped_gemv_keeps_tokens(arch, mode, tiny_checkpoints, tmp_path,
                                                       monkeypatch) -> None:
    """KILN_BF16_SWAP=1 (plain) / fused: decode steps of 1-16 rows take the swapped GEMV,
    fused: with the norms and the activation in its prologue (Llama: SiLU; Gemma-2: tanh
    GELU, sandwich norms, which keep their own kernels). float32 engines (the GEMV in
    full precision, as cuBLAS's): the same greedy tokens as with it off, through CUDA
    graphs and requests arriving at different steps; and it was taken. pdl: plain, launched
    with PDL behind the norms, SiLU*mul and decode attention (KILN_SWAP_PDL=1), the decode
    attention PDL-launched too (KILN_ATTN_PDL=1); rope: plain, the QKV GEMV with the rotary
    and KV write in its epilogue (KILN_SWAP_ROPE=1); glu: plain,
    act(gate) * up in the gate-up GEMV's epilogue (KILN_SWAP_GLU=1); all: pdl, rope and glu
    together (the defaults on sm_90)."""
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.kernels import gemv_swap, pdl
    from kiln.layers import swap_input
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.runtime.request import SamplingParams
    from tests.test_runtime import make_prompts, run_all

    folder, _ = tiny_checkpoints[arch]
    path = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_batch_size=16, max_seq_len=256, max_num_tokens=512),
        progress=False)
    prompts = make_prompts(12, seed=3)
    arrivals = [i // 2 for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the swapped GEMV is taken on sm_90 only")
    calls, real = [], gemv_swap.gemv_swap
    monkeypatch.setattr(gemv_swap, "gemv_swap",
                        lambda *a, **k: calls.append(k.get("act", 0) or 10 * k.get("glu", 0)
                                                     or 100 * (k.get("rope") is not None))
                        or real(*a, **k))
    monkeypatch.setattr(swap_input, "DTYPES", (torch.float32,))
    got = {}
    for on in (False, True):
        monkeypatch.setattr(swap_input, "FUSED", on and mode == "fused")
        monkeypatch.setattr(swap_input, "PLAIN", on and mode != "fused")
        monkeypatch.setattr(swap_input, "GLU", on and mode in ("glu", "all"))
        monkeypatch.setattr(swap_input, "ROPE", on and mode in ("rope", "all"))
        monkeypatch.setattr(pdl, "SWAP_GEMV", on and mode in ("pdl", "all"))
        monkeypatch.setattr(pdl, "ATTENTION", on and mode in ("pdl", "all"))  # KILN_ATTN_PDL
        engine = LLMEngine(path, RuntimeConfig(device="cuda"))
        got[on] = run_all(engine, prompts, params, arrivals)
        del engine
        assert bool(calls) == on
    assert got[True] == got[False]
    assert 0 in calls
    assert ((1 if arch == "llama" else 2) in calls) == (mode == "fused")
    assert ((10 if arch == "llama" else 20) in calls) == (mode in ("glu", "all"))
    assert (100 in calls) == (mode in ("rope", "all"))


def check_plumbing() -> None:
    """A norm and a gated MLP through kiln's layers with the swap on (the worker's kernels
    interpreted, every CPU tensor taken): the norm and the activation hand over
    PendingInputs, the linears consume them, and the result is the unfused one's."""
    from kiln import functional as KF
    from kiln.layers import swap_input
    from kiln.layers.mlp import GatedMLP
    from kiln.layers.norm import RMSNorm

    torch.manual_seed(0)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    swap_input.takes = lambda x: x.dim() == 2 and x.shape[0] <= 16
    swap_input.PLAIN = False  # off: the torch linear (F.linear), not the plain GEMV
    mlp, norm = GatedMLP(64, 96).half(), RMSNorm(64, 1e-5).half()
    for p in list(mlp.parameters()) + list(norm.parameters()):
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1 + (p is norm.weight)).half()
    x, res = torch.randn(3, 64, dtype=torch.float16), torch.randn(3, 64, dtype=torch.float16)
    got = {}
    for on in (False, True):
        swap_input.FUSED = on
        quant = mlp.input_quant()
        assert (quant is swap_input.SWAP_PROLOGUE) == on
        normed, summed = norm(x, res, quant)
        assert isinstance(normed, swap_input.PendingInput) == on
        got[on] = (mlp(normed), summed)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=0, atol=0)
    torch.testing.assert_close(got[True][0], got[False][0], rtol=2e-2, atol=2e-3)
    # a PendingInput something else gets is computed by the unfused kernels
    pending, summed = norm(x, res, swap_input.SWAP_PROLOGUE)
    swap_input.FUSED = False
    torch.testing.assert_close(pending.materialize(), norm(x, res)[0], rtol=0, atol=0)
    torch.testing.assert_close(summed, x + res, rtol=0, atol=0)


def test_swap_prologue_plumbing(interp) -> None:  # noqa: F811
    interp(check_plumbing)


def check_plain_route() -> None:
    """KILN_BF16_SWAP=1 (the default): an unquantized linear whose rows the swapped GEMV
    takes runs on it (the worker's kernels interpreted, every CPU tensor taken), wider
    weights (vocabulary heads) and inputs it does not take stay on the torch linear."""
    import torch.nn.functional as F

    from kiln.kernels import gemv_swap
    from kiln.layers import swap_input
    from kiln.layers.linear import ColumnLinear

    torch.manual_seed(1)
    swap_input.PLAIN, swap_input.FUSED = True, False
    swap_input.takes = lambda x: x.dim() == 2 and x.shape[0] <= 16
    calls, real = [], gemv_swap.gemv_swap
    gemv_swap.gemv_swap = lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    try:
        layer = ColumnLinear(64, 96, bias=True).half()
        for p in layer.parameters():
            p.data = torch.randn_like(p, dtype=torch.float32).half() * 0.1
        x = torch.randn(3, 64, dtype=torch.float16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=2e-2, atol=2e-3)
        assert calls == [(96, 64)]
        layer(torch.randn(17, 64, dtype=torch.float16))  # 17 rows: not taken
        swap_input.MAX_N = 64  # a weight wider than that: not taken
        layer(x)
        assert calls == [(96, 64)]
    finally:
        gemv_swap.gemv_swap, swap_input.MAX_N = real, 65536


def test_plain_route(interp) -> None:  # noqa: F811
    interp(check_plain_route)
