"""The one-row int4 GEMV with act(gate) * up in its epilogue
(kiln.kernels.int_gemv_epilogues.int4_glu, opt-in KILN_INT_GLU=1): the bits of the unfused
route (the same GEMV storing [gate | up], then kiln's SiLU*mul kernel) under the Triton
interpreter and on a GPU at the 8B's gate-up shape, and the gated MLP of an int4 layer
routed to it."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _weight

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")
# launches (KILN_INT_GEMV1): kiln's default for the shape; one split; splits summed in the
# kernel with the K loop pipelined; K steps of four groups on 2 warps
LAUNCHES = ["", "16,128,1,4,3,0,1,1,0,0,0,1", "32,128,3,4,3,0,1,1,1,0,1,1",
            "16,512,1,2,3,0,1,1,0,0,0,1"]


def check_glu(cols: int, K: int, group: int, launch: str, with_offset: bool, with_bias: bool,
              device: str = "cpu") -> None:
    from kiln.kernels import int_gemm, pdl, silu_mul
    from kiln.kernels.int_gemv_epilogues import int4_glu

    if launch:
        os.environ["KILN_INT_GEMV1"] = launch
    try:
        weight, scale, offset = _weight(2 * cols, K, 4, group, device, seed=K + cols)
        offset = offset if with_offset else None
        torch.manual_seed(cols)
        x = torch.randn(1, K, device=device).to(torch.bfloat16)
        bias = torch.randn(2 * cols, device=device).to(torch.bfloat16) if with_bias else None
        stored = int_gemm.int_weight_linear(x, weight, scale, offset, bias)
        for act in (1, 2):
            got = int4_glu(x, weight, scale, offset, bias, act)
            assert got is not None and got.shape == (1, cols), (launch, act)
            want = silu_mul.silu_and_mul(stored, gelu_tanh=act == 2)
            assert torch.equal(got, want), (cols, K, group, launch, act)
        pdl.INT_PRELOAD = False  # the K loop without its first step before the PDL wait
        assert torch.equal(int4_glu(x, weight, scale, offset, bias, 1),
                           silu_mul.silu_and_mul(stored)), (cols, K, group, launch)
    finally:
        os.environ.pop("KILN_INT_GEMV1", None)
        pdl.INT_PRELOAD = True


@pytest.mark.parametrize("launch", LAUNCHES)
def test_int4_glu_epilogue(interp, launch) -> None:  # noqa: F811
    """40 columns (ragged tiles), K 1024 in groups of 128 and of 32 (whole and several
    groups a K step), with and without offsets and a bias."""
    interp(check_glu, 40, 1024, 128, launch, True, False)
    interp(check_glu, 24, 1024, 32, launch, False, True)


def test_int4_glu_not_taken() -> None:
    """Where the epilogue cannot run the route stays unfused: several rows, an odd row
    count, int8 storage, and a launch that sums its K splits by atomics."""
    from kiln.kernels.int_gemv_epilogues import int4_glu

    weight, scale, offset = _weight(80, 256, 4, 128)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert int4_glu(torch.randn(2, 256).to(torch.bfloat16), weight, scale, offset, None,
                    1) is None
    assert int4_glu(x, weight[:79], scale[:79], offset[:79], None, 1) is None
    w8, s8, _ = _weight(80, 256, 8, 128)
    assert int4_glu(x, w8, s8, None, None, 1) is None
    os.environ["KILN_INT_GEMV1"] = "32,128,2,4,3,0,1,1,0,0,0,1"  # 2 splits, atomics
    try:
        assert int4_glu(x, weight, scale, offset, None, 1) is None
    finally:
        del os.environ["KILN_INT_GEMV1"]


def check_int4_mlp_route() -> None:
    """An int4 gated MLP at one row with KILN_INT_GLU=1 takes the epilogue and gives the
    unfused route's bits (SiLU and tanh GELU); two rows do not take it."""
    from kiln import functional as KF
    from kiln.kernels import int_gemv_epilogues
    from kiln.layers import swap_input
    from kiln.layers.mlp import GatedMLP
    from kiln.layers.weight_only import IntWeightMethod

    torch.manual_seed(3)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    calls, real = [], int_gemv_epilogues.int4_glu
    int_gemv_epilogues.int4_glu = lambda *a: calls.append(a[-1]) or real(*a)
    try:
        for act in ("silu", "gelu_pytorch_tanh"):
            mlp = GatedMLP(256, 128, act=act).to(torch.bfloat16)
            for p in mlp.parameters():
                p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).to(torch.bfloat16)
            for layer in (mlp.gate_up_proj, mlp.down_proj):
                IntWeightMethod("int4_g128_offset", 4, 128, True).quantize_from_float(
                    layer, None)
            x = torch.randn(1, 256).to(torch.bfloat16)
            got = {}
            for on in (False, True):
                swap_input.INT_GLU = on
                calls.clear()
                got[on] = mlp(x)
                assert calls == ([1 if act == "silu" else 2] if on else []), calls
            assert torch.equal(got[True], got[False])
            calls.clear()
            mlp(torch.randn(2, 256).to(torch.bfloat16))
            assert calls == []
    finally:
        int_gemv_epilogues.int4_glu, swap_input.INT_GLU = real, False


def test_int4_mlp_route(interp) -> None:  # noqa: F811
    interp(check_int4_mlp_route)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("launch", LAUNCHES)
def test_gpu_int4_glu_at_8b_shape(launch) -> None:
    """The inline PTX at the 8B's gate-up (14,336 columns, K 4096, groups of 128) and a
    small ragged shape: the unfused route's bits."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    check_glu(14336, 4096, 128, launch, True, False, "cuda")
    check_glu(40, 1024, 32, launch, False, True, "cuda")


def compile_epilogue(N: int, K: int, launches, group: int = 128, **epilogue) -> None:
    """The one-row int4 GEMV with an epilogue compiled for sm_90 in each (BLOCK_N, BLOCK_K,
    warps, K splits) launch, PDL-launched: no spills, the griddepcontrol wait and launch.
    epilogue: GLU=... or ROPE_HALF=... with the rotary's arguments; group: the weight's."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels.compile_check import compile_sm90
    from kiln.kernels.int_gemv_pairs import _gemv1_pairs_kernel

    rope = {k: epilogue.pop(k) for k in list(epilogue) if not k.isupper()}
    for bn, bk, warps, split in launches:
        values = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
                  "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
                  "count_ptr": "*i32", "N": N, "K": K, "W_PER_SPLIT": K // 8 // split,
                  "stride_wn": K // 8, "stride_sn": K // group, **rope}
        meta = dict(G=group, BLOCK_N=bn, BLOCK_K=bk, HAS_OFFSET=True, HAS_BIAS=False,
                    GROUPS=max(1, bk // group), ATOMIC=False, EVEN_K=True, SPLIT_K=split,
                    INTERPRET=False, PDL=True, **epilogue)
        r = compile_sm90(_gemv1_pairs_kernel, values, meta, warps, 3)
        assert r.stack_bytes == 0 and r.instructions["griddepcontrol"] == 2, (bn, bk, r)


def test_int4_glu_compiles_for_hopper() -> None:
    """The epilogue compiles for sm_90 without spills in kiln's gate-up launches (one
    split; 16 x 512 on 2 warps) and with splits summed in the kernel, PDL-launched; SiLU
    and tanh GELU."""
    for glu in (1, 2):
        compile_epilogue(28672, 4096, ((32, 256, 4, 1), (16, 512, 2, 1), (32, 256, 4, 4)),
                         GLU=glu)
        # groups of 32 (GGUF's Q4 layouts): the launch kiln makes at gate-up (48th session)
        compile_epilogue(28672, 4096, ((32, 256, 4, 1),), group=32, GLU=glu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["glu", "rope", "both"])
def test_gpu_int4_engine_with_the_epilogues(mode, tiny_checkpoints, tmp_path, monkeypatch):
    """A bfloat16 int4 engine (groups of 32) decoding one request at a time through CUDA
    graphs: with KILN_INT_GLU / KILN_INT_ROPE the epilogues are taken and the greedy tokens
    are those of the unfused route."""
    from kiln import LLM, SamplingParams
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.kernels import int_gemv_epilogues as ep
    from kiln.layers import swap_input

    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_seq_len=256, quantization="int4_wo", group_size=32),
        progress=False)
    taken = []

    def counted(name: str, real):
        def call(*args):
            y = real(*args)
            if y is not None:
                taken.append(name)
            return y
        return call

    for name in ("int4_glu", "int4_rope"):
        monkeypatch.setattr(ep, name, counted(name, getattr(ep, name)))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = {}
    for on in (False, True):
        monkeypatch.setattr(swap_input, "INT_GLU", on and mode in ("glu", "both"))
        monkeypatch.setattr(swap_input, "INT_ROPE", on and mode in ("rope", "both"))
        taken.clear()
        llm = LLM(engine_dir, device="cuda")
        got[on] = [llm.generate([p], params)[0].token_ids
                   for p in ([5, 6, 7], list(range(10, 40)))]
        del llm
        assert ("int4_glu" in taken) == (on and mode != "rope"), taken
        assert ("int4_rope" in taken) == (on and mode != "glu"), taken
    assert got[True] == got[False]
