"""The 16-bit decode GEMM (kiln/kernels/gemv.py, opt-in KILN_TRITON_GEMV=1) against
float32 products: the interpreter on the CPU (fp16 and fp32; its tl.dot takes no bf16),
an sm_90 compile check, and (pytest -m gpu) Llama-3.1-8B shapes in bf16 inside a CUDA
graph, where its in-kernel split-K must leave its counters reset every replay.

Tolerance: the same products summed in another order in float32, then rounded to the
output dtype: |y - y32| <= 2e-5 * (|x| @ |w|^T) + 1 ulp of the output dtype (4x the sum
term for bf16 on tensor cores, whose adder truncates)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _ulp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")


def _check(name: str, x: torch.Tensor, w: torch.Tensor, bias, y: torch.Tensor) -> None:
    y32 = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    tol = 2e-5 * (4 if x.is_cuda and x.dtype == torch.bfloat16 else 1)
    bound = tol * (x.float().abs() @ w.float().abs().T) + _ulp(y32, y.dtype)
    assert y.shape == y32.shape and y.dtype == x.dtype, name
    err = (y.float() - y32).abs()
    assert (err <= bound).all(), f"{name}: worst {(err / bound).max().item():.2f}x the bound"


def check_gemv(dtype: torch.dtype, M: int, N: int, K: int, with_bias: bool,
               launch: tuple | None) -> None:
    from kiln.kernels import gemv
    from kiln.kernels.split_k import split_k_counters

    torch.manual_seed(M * 7 + K)
    x = torch.randn(M, K).to(dtype)
    w = torch.randn(N, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    cfg = gemv.GemvConfig(*launch) if launch else None
    for _ in range(2):  # twice: a split-K call leaves its counters at zero
        y = gemv.gemv_linear(x, w, bias, cfg)
        _check(f"{dtype} {M}x{N}x{K} {launch}", x, w, bias, y)
    assert not split_k_counters(x.device, 1).any()
    y3 = gemv.gemv_linear(x.view(1, M, K), w, bias, cfg)  # leading dims kept
    assert y3.shape == (1, M, N) and torch.equal(y3[0], y)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("K,launch", [(256, None), (200, None), (512, (32, 64, 4, 4, 1)),
                                      (384, (16, 128, 3, 4, 1)), (100, (32, 32, 2, 4, 1))])
def test_gemv(interp, M, K, launch) -> None:  # noqa: F811
    interp(check_gemv, torch.float16, M, 40, K, M == 3, launch)


def test_gemv_float32(interp) -> None:  # noqa: F811
    interp(check_gemv, torch.float32, 2, 24, 256, True, (16, 64, 2, 4, 1))


def test_gemv_routing() -> None:
    """Only CUDA 16-bit weights of at most 16 rows, and only when asked for."""
    from kiln.kernels.gemv import gemv_config, gemv_enabled

    x, w = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    os.environ["KILN_TRITON_GEMV"] = "1"
    try:
        assert not gemv_enabled(x, w)  # a CPU tensor
    finally:
        del os.environ["KILN_TRITON_GEMV"]
    h200 = dict(device=torch.device("cuda"), sms=132)
    cfg = gemv_config(1, 4096, 14336, **h200)  # 128 tiles: K split for 2 programs an SM
    assert cfg.split_k == 4 and 14336 % (cfg.split_k * cfg.block_k) == 0
    assert gemv_config(1, 28672, 4096, **h200).split_k == 1  # 896 tiles already


def test_gemv_compiles_for_hopper() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import gemv
    from kiln.kernels.compile_check import compile_sm90

    for N, K in ((6144, 4096), (4096, 14336)):
        cfg = gemv.gemv_config(1, N, K, torch.device("cpu"))
        values = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                  "part_ptr": "*fp32", "count_ptr": "*i32", "M": 3, "N": N, "K": K,
                  "stride_xm": K, "stride_wn": K, "stride_om": N}
        meta = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=max(2, cfg.split_k),
                    HAS_BIAS=False, EVEN_K=True, IEEE=False, INTERPRET=False)
        r = compile_sm90(gemv._gemv_kernel, values, meta, cfg.num_warps, cfg.num_stages,
                         variant=f"{N}x{K}")
        assert r.stack_bytes == 0 and r.instructions["mma.sync"] > 0, r


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                 (128256, 4096)])
def test_gpu_gemv_in_a_cuda_graph(N, K) -> None:
    from kiln.kernels import gemv

    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    for M in (1, 5, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        want = gemv.gemv_linear(x, w)
        _check(f"{M}x{N}x{K}", x, w, None, want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv.gemv_linear(x, w)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)  # split in order: the same sum every time


def check_gemv_gated(dtype: torch.dtype, M: int, inter: int, N: int, gelu: bool,
                     launch: tuple | None) -> None:
    """A GatedAct input: the same output, bit for bit, as the SiLU*mul (GeGLU) kernel's
    product fed to the GEMM."""
    from kiln.kernels import gemv, silu_mul

    torch.manual_seed(inter + M)
    gate_up = torch.randn(M, 2 * inter).to(dtype)
    w = torch.randn(N, inter).to(dtype)
    cfg = gemv.GemvConfig(*launch) if launch else None
    act = (silu_mul.gelu_tanh_and_mul if gelu else silu_mul.silu_and_mul)(gate_up)
    want = gemv.gemv_linear(act, w, None, cfg)
    got = gemv.gemv_linear(gemv.GatedAct(gate_up, gelu), w, None, cfg)
    assert torch.equal(got, want)
    _check(f"gated {dtype} {M}x{N}x{inter}", act, w, None, got)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("M,inter,launch", [(1, 256, None), (5, 200, None),
                                            (16, 512, (32, 64, 4, 4, 1))])
def test_gemv_gated_act(interp, gelu, M, inter, launch) -> None:  # noqa: F811
    interp(check_gemv_gated, torch.float16, M, inter, 24, gelu, launch)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_engine_with_triton_gemv(arch, tiny_checkpoints, tmp_path, monkeypatch) -> None:
    """A bf16 engine with KILN_TRITON_GEMV=1 decodes through the Triton GEMM (the down
    projection taking act(gate) * up as it reads) and generates what the cuBLAS engine
    does, up to the rare near-tie a different summation order flips."""
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.kernels import gemv
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.runtime.request import SamplingParams
    from tests.test_runtime import make_prompts, run_all

    folder, _ = tiny_checkpoints[arch]
    path = build(folder, tmp_path / "e", BuildConfig(dtype="bfloat16", max_batch_size=8,
                                                     max_seq_len=256), progress=False)
    prompts = make_prompts(4, seed=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = run_all(LLMEngine(path, RuntimeConfig(device="cuda")), prompts, params)
    calls = []
    run = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear",
                        lambda x, *a, **k: calls.append(type(x).__name__) or run(x, *a, **k))
    monkeypatch.setenv("KILN_TRITON_GEMV", "1")
    got = run_all(LLMEngine(path, RuntimeConfig(device="cuda")), prompts, params)
    assert "GatedAct" in calls and "Tensor" in calls
    same = sum(a == b for k in want for a, b in zip(want[k], got[k]))
    assert same >= 0.8 * sum(len(v) for v in want.values()), (want, got)
