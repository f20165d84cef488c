"""kiln.kernels.int8_wgmma: the Gluon W8A16 kernel (a scale a channel) on Hopper.

On the CPU (no Gluon interpreter): its byte-to-bfloat16 PTX through the PTX evaluator of
test_int_wgmma, the kernel compiled for sm_90, eligibility and the opt-in switch. On a
Hopper GPU: against the reference GEMM, and through int_weight_linear's dispatch."""

from __future__ import annotations

import re

import pytest
import torch

from kiln.kernels import int8_wgmma
from kiln.kernels.reference import dequantize_int_weight
from tests.test_int_wgmma import _hopper, k_loop, run_ptx


def _bytes_by_ptx(asm: str, words: torch.Tensor) -> torch.Tensor:
    """float32 [n, 4] of each word's bytes (value order) from the PTX block."""
    regs = run_ptx(asm, {"$2": words, "$3": words})
    pairs = torch.stack([regs["$0"], regs["$1"]], dim=1)  # [n, 2]
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=2).reshape(-1, 4)
    return ((halves + 2**15) % 2**16 - 2**15).to(torch.int16).view(torch.bfloat16).float()


def test_the_byte_ptx_gives_each_int8_value_exactly():
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(4)[torch.randperm(1024)]
    q = q.view(-1, 4)  # every value in every byte position
    words = q.contiguous().view(torch.int32).long().flatten() & 0xFFFFFFFF
    assert torch.equal(_bytes_by_ptx(int8_wgmma._BYTES.value, words), q.float())


@pytest.mark.parametrize("broken", [("0x7441", "0x7440"), ("0f4B000080", "0f4B000000"),
                                    ("0x80808080", "0x00808080")])
def test_the_check_catches_a_wrong_byte_a_wrong_bias(broken):
    q = torch.randint(-128, 128, (512, 4), dtype=torch.int8)
    words = q.view(torch.int32).long().flatten() & 0xFFFFFFFF
    asm = int8_wgmma._BYTES.value.replace(*broken)
    assert not torch.equal(_bytes_by_ptx(asm, words), q.float())


@pytest.mark.parametrize("block_m,block_n,split,stages", [(8, 128, 8, 2), (16, 128, 4, 2),
                                                         (64, 64, 1, 3)])
def test_compiles_for_hopper_without_spills_or_serialized_mma(block_m, block_n, split, stages):
    from triton.experimental.gluon import language as gl

    from kiln.kernels import compile_check as cc

    x_l = gl.NVMMASharedLayout.get_default_for([block_m, 128], gl.bfloat16)
    w_l = gl.NVMMASharedLayout.get_default_for([block_n, 32], gl.int32)
    values = {"x_desc": f"tensordesc<bf16[{block_m},128],{x_l!r}>",
              "w_desc": f"tensordesc<i32[{block_n},32],{w_l!r}>", "scale_ptr": "*fp32",
              "bias_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32",
              "count_ptr": "*i32", "M": 64, "N": 4096, "K": 14336,
              "K_PER_SPLIT": 14336 // split, "stride_om": 4096}
    const = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=128, HAS_BIAS=False,
                 SPLIT_K=split, STAGES=stages)
    warps = block_n // 16
    report = cc.compile_sm90(int8_wgmma._w8_wgmma_kernel, values, const, warps)
    assert report.stack_bytes == 0
    assert report.instructions["wgmma.mma_async"] > 0
    sass = cc._cuobjdump(cc._compile(int8_wgmma._w8_wgmma_kernel, values, const, warps, 2),
                         "-sass")
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", sass)) == 1
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass)) == 1
    body = k_loop(sass)
    assert sum("UTMALDG" in t for t in body) == 2  # words and x
    assert not any(re.search(r"\bLDG", t) for t in body)  # the scale waits for the end
    # bytes by PRMT and FADD, not conversions: at most 3 instructions a weight and a word
    weights = 128 * block_n // (32 * warps)  # a thread's in a step
    assert sum("PRMT" in t for t in body) == weights and not any("I2F" in t for t in body)
    assert len(body) <= 3 * weights + 120


def test_it_takes_only_a_scale_a_channel_and_is_off_by_default(monkeypatch):
    from kiln.kernels import int_launch

    x = torch.zeros(8, 4096, dtype=torch.bfloat16)
    w = torch.zeros(4096, 4096, dtype=torch.int8)
    assert not int8_wgmma.wgmma_eligible(x, w, torch.ones(4096, 1))  # not CUDA
    assert int_launch.wgmma_rows("0") == () and not int_launch.wgmma_takes(16, 4096, 4096, 8)
    with pytest.warns(UserWarning, match="KILN_INT8_WGMMA='x'"):
        assert int_launch.wgmma_rows("x", "KILN_INT8_WGMMA") == ()
    monkeypatch.setattr(int_launch, "INT8_WGMMA_ROWS", ((5, 64),))
    assert int_launch.wgmma_takes(16, 4096, 4096, 8)
    assert int_launch.wgmma_module(8) is int8_wgmma
    cfg = int8_wgmma.w8_config(8, 4096, 14336)
    assert cfg.block_n == 128 and cfg.stages == 2  # 3 stages of 16 KB words: one an SM


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the wgmma kernel needs a Hopper GPU")
@pytest.mark.parametrize("M", [5, 16, 33, 64])
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (1000, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_matches_the_reference(M, N, K, bias):
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + N)
    q = torch.randint(-128, 128, (N, K), device="cuda", dtype=torch.int8, generator=gen)
    scale = torch.rand(N, 1, device="cuda", generator=gen) * 0.002
    b = torch.randn(N, device="cuda", generator=gen) if bias else None
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert int8_wgmma.wgmma_eligible(x, q, scale)
    want = x.float() @ dequantize_int_weight(q, scale, None).T + (b if bias else 0)
    for split, block_n, stages in ((1, 128, 2), (4, 128, 2), (2, 64, 3)):
        cfg = int8_wgmma.WgmmaConfig(block_n=block_n, split_k=split, stages=stages)
        got = int8_wgmma.w8_wgmma(x, q, scale, None, b, cfg).float()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-2, (split, err)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the wgmma kernel needs a Hopper GPU")
def test_gpu_dispatch_matches_the_triton_tiles(monkeypatch):
    from kiln.kernels import int_gemm, int_launch

    q = torch.randint(-128, 128, (4096, 4096), device="cuda", dtype=torch.int8)
    scale = torch.rand(4096, 1, device="cuda") * 0.002
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    tiles = int_gemm.int_weight_linear(x, q, scale).float()
    monkeypatch.setattr(int_launch, "INT8_WGMMA_ROWS", ((5, 64),))
    calls = []
    monkeypatch.setattr(int8_wgmma, "wgmma_linear",
                        lambda *a: calls.append(1) or int8_wgmma.w8_wgmma(*a))
    got = int_gemm.int_weight_linear(x, q, scale).float()
    assert calls and (got - tiles).abs().max() / tiles.abs().max() < 1e-2
