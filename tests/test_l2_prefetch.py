"""Weights asked into L2 between GEMMs (kiln.runtime.l2_prefetch): which layer prefetches
which weight, the settings, and the kernel's sm_90 code. The GPU side (same tokens with the
prefetch in the decode graphs) is in tests/test_gpu_engine.py."""

from __future__ import annotations

import os

import pytest
import torch

from kiln.checkpoint import open_checkpoint
from kiln.distributed import Mapping
from kiln.models import create_model
from kiln.runtime import l2_prefetch


def _model(tiny_checkpoints, arch):
    return create_model(open_checkpoint(tiny_checkpoints[arch][0]).config, Mapping(), 64)


def test_the_chain_follows_a_decode_step(tiny_checkpoints):
    """qkv -> o -> gate_up -> down, layer after layer, then the LM head (tied or not)."""
    for arch in ("llama", "llama3-rope-tied"):
        model = _model(tiny_checkpoints, arch)
        names = {id(m): n for n, m in model.named_modules()}
        want = [f"model.layers.{i}.{p}" for i in range(len(model.model.layers))
                for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj")] + ["lm_head"]
        assert [names[id(m)] for m in l2_prefetch.linear_chain(model)] == want, arch


def test_the_chain_leaves_out_experts(tiny_checkpoints):
    """A mixture of experts' layers (router, experts, a shared expert) are not prefetched:
    a step reads only some of them."""
    model = _model(tiny_checkpoints, "mixtral")
    names = {id(m): n for n, m in model.named_modules()}
    chain = [names[id(m)] for m in l2_prefetch.linear_chain(model)]
    assert chain[-1] == "lm_head" and not any(".mlp." in n for n in chain), chain
    assert all(n.endswith(("qkv_proj", "o_proj")) for n in chain[:-1]), chain


def test_weight_tensors_largest_first(monkeypatch):
    """What a layer's GEMM reads: its parameters and buffers from 1 MiB, largest first
    (scales and biases below that are left to the GEMM)."""
    from kiln.layers.linear import ColumnLinear

    layer = ColumnLinear(512, 1024, True, None)  # 2 MiB float32 weight, 4 KiB bias
    layer.register_buffer("big", torch.zeros(1024, 1024))  # 4 MiB
    found = l2_prefetch.weight_tensors(layer)
    assert [t.shape for t in found] == [(1024, 1024), (1024, 512)]
    monkeypatch.setattr(l2_prefetch, "MIN_TENSOR_BYTES", 0)
    assert len(l2_prefetch.weight_tensors(layer)) == 3


def test_settings(monkeypatch):
    monkeypatch.delenv("KILN_L2_PREFETCH_MB", raising=False)
    monkeypatch.delenv("KILN_L2_PREFETCH_ROWS", raising=False)
    assert l2_prefetch._settings() == (0, 16)
    monkeypatch.setenv("KILN_L2_PREFETCH_MB", "24")
    monkeypatch.setenv("KILN_L2_PREFETCH_ROWS", "4")
    assert l2_prefetch._settings() == (24 << 20, 4)
    monkeypatch.setenv("KILN_L2_PREFETCH_MB", "lots")
    with pytest.raises(ValueError, match="KILN_L2_PREFETCH_MB='lots': a whole number"):
        l2_prefetch._settings()


def test_off_the_gpu_nothing_is_set_up(tiny_checkpoints, monkeypatch):
    """On a CPU (or without a budget) there is no prefetcher; the kernel launcher declines
    a tensor it cannot prefetch instead of failing."""
    from kiln.kernels.l2_prefetch import prefetch_l2

    monkeypatch.setenv("KILN_L2_PREFETCH_MB", "16")
    assert l2_prefetch.WeightPrefetch.from_env(_model(tiny_checkpoints, "llama")) is None
    assert prefetch_l2(torch.zeros(1024), 1 << 20) == 0


def test_kernel_compiles_for_hopper():
    """One bulk L2 prefetch a thread (cp.async.bulk.prefetch, sm_90), under a predicate for
    the chunks past the end; no registers to speak of."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import l2_prefetch as kernel
    from kiln.kernels.compile_check import _compile, compile_sm90

    args = ({"ptr": "*u8", "nbytes": 33554432},
            {"CHUNK": kernel.CHUNK, "PER_PROGRAM": kernel.PER_PROGRAM}, 4)
    ptx = _compile(kernel._prefetch_kernel, *args, 2).asm["ptx"]
    assert ptx.count("@p cp.async.bulk.prefetch.L2.global") == 1, ptx
    report = compile_sm90(kernel._prefetch_kernel, *args)
    assert report.registers <= 32 and report.stack_bytes == 0, report
