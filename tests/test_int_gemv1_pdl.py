"""The one-row INT8 GEMV (kiln.kernels.int_gemv1) launched with PDL and its first K step
loaded before the wait (the default since the 50th session; KILN_INT8_PDL=0: not): the
bits of the plain launch under the interpreter (per channel, groups of 16 with offsets, K
ending inside a step, splits summed in the kernel, the prefetching and the pipelined K
loops), compiled for sm_90 without spills, on a GPU in a replayed CUDA graph behind the
RMSNorm that writes its input; and which engines' small kernels then take part."""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _weight, check_pdl_behind_norm

# (N, K, group, launch: block_n, block_k, split_k, warps, stages, prefetch, factored, xvec,
# fixup, pipeline)
LAUNCHES = [
    (40, 1024, 0, (32, 256, 2, 4, 3, False, True, True, True, False)),
    (72, 1536, 16, (32, 256, 3, 4, 3, False, True, True, True, True)),
    (40, 384, 32, (16, 128, 1, 4, 3, True, True, False, False, False)),
    (24, 416, 32, (32, 128, 1, 4, 3, False, False, False, False, False)),  # 3.25 steps
]


def check_preload(N: int, K: int, group: int, launch: tuple) -> None:
    from kiln.kernels import int_gemm, pdl

    weight, scale, _ = _weight(N, K, 8, group)
    offset = torch.randn_like(scale) * 1e-3 if group == 16 else None  # K-quant mixes'
    torch.manual_seed(K)
    x = torch.randn(1, K).to(torch.bfloat16)
    bn, bk, split, warps, stages, prefetch, factored, xvec, fixup, pipeline = launch
    cfg = int_gemm.IntGemmConfig(0, bn, bk, warps, stages, split_k=split, prefetch=prefetch,
                                 factored=factored, xvec=xvec, fixup=fixup, pipeline=pipeline)
    got = {}
    for on in (False, True):
        pdl.INT8_GEMV = on  # under the interpreter: the preload, without PDL itself
        try:
            got[on] = int_gemm.int_weight_linear(x, weight, scale, offset, config=cfg)
        finally:
            pdl.INT8_GEMV = False
    assert torch.equal(got[True], got[False]), (N, K, group, launch)
    w = (weight.float() * scale.repeat_interleave(K // scale.shape[1], 1)
         + (offset.repeat_interleave(K // scale.shape[1], 1) if offset is not None else 0))
    want = x.float() @ w.T
    assert torch.allclose(got[True].float(), want, rtol=1e-2, atol=1e-2 * want.abs().max())


@pytest.mark.parametrize("N,K,group,launch", LAUNCHES)
def test_int8_gemv_preload_keeps_the_bits(interp, N, K, group, launch) -> None:  # noqa: F811
    interp(check_preload, N, K, group, launch)


def test_int8_gemv_pdl_compiles_for_hopper() -> None:
    """PDL with the first step before the wait (and with PREFETCH, whose first loads are
    already there): two griddepcontrol instructions, no stack."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemm
    from kiln.kernels.compile_check import compile_sm90

    K = N = 4096
    cfg = int_gemm.int_gemm_config(1, N, K, torch.device("cuda"), 8)
    values = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
              "count_ptr": "*i32", "N": N, "K": K, "G": K, "stride_wn": K // 4,
              "stride_sn": 1,
              "W_PER_SPLIT": int_gemm.split_length(K, cfg.split_k, cfg.block_k) // 4}
    for prefetch in (False, True):
        meta = dict(BITS=8, HAS_OFFSET=False, HAS_BIAS=False, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, ATOMIC=False, SPLIT_K=cfg.split_k, GROUPS=1,
                    FACTORED=True, XVEC=True, EVEN_K=True, PREFETCH=prefetch, PDL=True,
                    PRELOAD=True)
        r = compile_sm90(int_gemm._gemv1_kernel, values, meta, cfg.num_warps, 3)
        assert r.stack_bytes == 0 and r.instructions["griddepcontrol"] == 2, r


def test_int8_pdl_policy(monkeypatch) -> None:
    """With the one-row INT8 GEMV PDL-launched (the default), int8_wo engines and GGUF files
    of 8-bit blocks (with Q4 ones too) PDL-launch their small kernels; with
    KILN_INT8_PDL=0 they do not."""
    from kiln.kernels import pdl

    monkeypatch.setattr(pdl, "INT_GEMV", True)
    monkeypatch.setattr(pdl, "GGUF", True)
    mixed = {"a": "int4_g32_offset", "b": "int8_g16_offset", "lm_head": "int8_g32"}
    for on in (False, True):
        monkeypatch.setattr(pdl, "INT8_GEMV", on)
        assert pdl.linears_take_part("int8_wo", {}, True) == on
        assert pdl.linears_take_part("gguf", mixed, True) == on
        assert pdl.linears_take_part("gguf", {"a": "int8_g32"}, True) == on
        assert not pdl.linears_take_part("int8_sq", {}, True)  # the dp4a GEMV


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_int8_gemv_pdl_waits_for_its_input() -> None:
    """Launched with PDL behind the RMSNorm that writes its input, in a CUDA graph replayed
    on new inputs: the bits of the plain launch, per channel at the 8B's QKV and down
    shapes and in groups of 16 with offsets (GGUF's K-quant mixes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90")
    for N, K, group in ((6144, 4096, 0), (4096, 14336, 0), (4096, 14336, 16)):
        weight, scale, _ = _weight(N, K, 8, group, "cuda")
        offset = torch.randn_like(scale) * 1e-3 if group else None
        # _SMALL: the norm lets the GEMV start at once
        check_pdl_behind_norm(weight, scale, offset, {"INT8_GEMV": True, "_SMALL": [True]},
                              {"INT8_GEMV": False}, f"{N}x{K} g{group}")
