"""The one-row int4 GEMV with the rotary + KV-cache write in its epilogue
(kiln.kernels.int_gemv_epilogues.int4_rope, opt-in KILN_INT_ROPE=1): rotary(q) and both
caches the bits of the unfused route (the same GEMV storing q, k, v, then kiln's rotary +
KV-write kernel) under the Triton interpreter and on a GPU at the 8B's QKV shape, and a
decode step's attention layer routed to it."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _weight

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")
# (KILN_INT_GEMV1): kiln's default for the shape; one split on 16-row programs; splits
# summed in the kernel with the K loop pipelined on 64-row programs
LAUNCHES = ["", "16,128,1,4,3,0,1,1,0,0,0,1", "64,128,3,4,3,0,1,1,1,0,1,1"]


def check_rope(head_dim: int, launch: str, v_t: bool, slot: int, heads: int = 4,
               kv_heads: int = 2, K: int = 512, device: str = "cpu") -> None:
    from kiln.kernels import int_gemm
    from kiln.kernels.gemv_swap_rope import RopeArgs
    from kiln.kernels.int_gemv_epilogues import int4_rope
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    if launch:
        os.environ["KILN_INT_GEMV1"] = launch
    try:
        N = (heads + 2 * kv_heads) * head_dim
        weight, scale, offset = _weight(N, K, 4, 128, device, seed=head_dim)
        torch.manual_seed(head_dim + slot)
        x = torch.randn(1, K, device=device).to(torch.bfloat16)
        bias = (torch.randn(N, device=device) * 0.1).to(torch.bfloat16)
        bs, blocks = 4, 6
        pos = torch.tensor([min(slot, 0) + 27], device=device)
        slots = torch.tensor([slot], device=device)
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        ang = torch.arange(32, device=device).float()[:, None] * inv[None, :]
        cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
        shape_v = (blocks, kv_heads, head_dim, bs) if v_t else (blocks, bs, kv_heads, head_dim)
        kc = torch.randn(blocks, bs, kv_heads, head_dim, device=device).to(torch.bfloat16)
        vc = torch.randn(*shape_v, device=device).to(torch.bfloat16)
        mine = (kc.clone(), vc.clone())
        q, k, v = int_gemm.int_weight_linear(x, weight, scale, offset, bias).split(
            [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
        want = rotary_and_write_kv(q, k, v, pos, cos_sin, kc, vc, slots, head_dim)
        got = int4_rope(x, weight, scale, offset, bias,
                        RopeArgs(pos, cos_sin, *mine, slots, heads, kv_heads))
        assert got is not None and got.shape == (1, heads * head_dim), launch
        assert torch.equal(mine[1], vc), (head_dim, launch)
        if device == "cpu":
            assert torch.equal(got, want), (head_dim, launch)
            assert torch.equal(mine[0], kc), (head_dim, launch)
            return
        # compiled, both kernels contract products into FMAs (test_gemv_swap_epilogues):
        # rotary(q) and rotary(k) within its bound of an emulation of HF's roundings
        from tests.test_gemv_swap_epilogues import _rotary_emulated

        checks = [(got, q, pos)]
        if slot >= 0:
            cached = mine[0].view(-1, kv_heads * head_dim)[slot:slot + 1]
            checks.append((cached, k, pos))
            rest = torch.ones(blocks * bs, dtype=torch.bool, device=device)
            rest[slot] = False
            assert torch.equal(mine[0].view(blocks * bs, -1)[rest], kc.view(blocks * bs, -1)[rest])
        for ours, src, p in checks:
            emu, bound = _rotary_emulated(src, p, cos_sin, head_dim)
            assert bool(((ours.float() - emu.float()).abs() <= bound).all()), (head_dim, launch)
    finally:
        os.environ.pop("KILN_INT_GEMV1", None)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_int4_rope_epilogue(interp, launch) -> None:  # noqa: F811
    """Heads of 128 and 64 (a program's rows, dims of one head) and of 16 (whole heads a
    program), V transposed or not, a written slot and a padding token's (-1)."""
    interp(check_rope, 128, launch, False, 9, 2, 1)  # 2 heads, 1 KV head: half the rows
    interp(check_rope, 64, launch, True, 22, 2, 1)
    interp(check_rope, 16, launch, False, -1)


def test_int4_rope_not_taken() -> None:
    """Heads a program's rows cannot tile (head_dim 96 on 64-row programs), a weight of
    other shape, and several rows: None, the unfused route."""
    from kiln.kernels.gemv_swap_rope import RopeArgs
    from kiln.kernels.int_gemv_epilogues import int4_rope

    def args(head_dim: int) -> RopeArgs:
        cs = torch.zeros(32, head_dim)
        return RopeArgs(torch.zeros(1, dtype=torch.long), cs, torch.zeros(2, 4, 2, head_dim),
                        torch.zeros(2, 4, 2, head_dim), torch.zeros(1, dtype=torch.long), 4, 2)

    weight, scale, offset = _weight(8 * 96, 256, 4, 128)
    x = torch.randn(1, 256).to(torch.bfloat16)
    os.environ["KILN_INT_GEMV1"] = "64,128,1,4,3,0,1,1,0,0,0,1"
    try:
        assert int4_rope(x, weight, scale, offset, None, args(96)) is None
        assert int4_rope(x, weight[:700], scale[:700], offset[:700], None, args(96)) is None
    finally:
        del os.environ["KILN_INT_GEMV1"]
    w, s, o = _weight(8 * 64, 256, 4, 128)
    assert int4_rope(torch.randn(2, 256).to(torch.bfloat16), w, s, o, None, args(64)) is None


def check_int4_rope_route() -> None:
    """KILN_INT_ROPE=1: a decode step of one sequence through an int4 fused QKV layer takes
    the epilogue (Attention.fused_qkv), and its attention output and both caches are the
    bits of the usual route; off it is not taken."""
    from kiln import functional as KF
    from kiln.layers import swap_input
    from kiln.layers.attention import Attention, AttentionMetadata, forward_context
    from kiln.layers.linear import QKVLinear
    from kiln.layers.weight_only import IntWeightMethod

    torch.manual_seed(4)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    heads, kv_heads, d, hidden, bs = 4, 2, 64, 256, 4
    qkv = QKVLinear(hidden, heads, kv_heads, d, bias=False).to(torch.bfloat16)
    for p in qkv.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).to(torch.bfloat16)
    IntWeightMethod("int4_g128_offset", 4, 128, True).quantize_from_float(qkv, None)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    n = 7
    tables = torch.arange(4, dtype=torch.int32).view(1, 4)
    slots = torch.tensor([int(tables[0, (n - 1) // bs]) * bs + (n - 1) % bs])
    meta = AttentionMetadata(slots, tables, torch.tensor([n], dtype=torch.int32),
                             torch.arange(2, dtype=torch.int32), [0, 1], [n], 1, n)
    x = torch.randn(1, hidden).to(torch.bfloat16)
    start = (torch.randn(4, bs, kv_heads, d).to(torch.bfloat16),
             torch.randn(4, bs, kv_heads, d).to(torch.bfloat16))
    got = {}
    try:
        for on in (False, True):
            swap_input.INT_ROPE = on
            attn = Attention(heads, kv_heads, d, d ** -0.5)
            attn.k_cache, attn.v_cache = start[0].clone(), start[1].clone()
            with forward_context(meta):
                q = attn.fused_qkv(qkv, x, torch.tensor([n - 1]), cos_sin)
                assert (q is not None) == on
                if q is None:
                    q, k, v = qkv(x).split([heads * d, kv_heads * d, kv_heads * d], 1)
                    out = attn(q, k, v, torch.tensor([n - 1]), cos_sin)
                else:
                    out = attn.attend_rotated(q, cos_sin)
            got[on] = (out, attn.k_cache, attn.v_cache)
    finally:
        swap_input.INT_ROPE = False
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


def test_int4_rope_route(interp) -> None:  # noqa: F811
    interp(check_int4_rope_route)


def test_int4_rope_compiles_for_hopper() -> None:
    """The epilogue compiles for sm_90 without spills in the QKV launch (32 rows, 4 K splits
    summed in the kernel) and on 16-row programs, PDL-launched."""
    from tests.test_int4_glu import compile_epilogue

    compile_epilogue(
        6144, 4096, ((32, 256, 4, 4), (16, 512, 4, 1)), ROPE_HALF=64, pos_ptr="*i64",
        cs_ptr="*fp32", kc_ptr="*bf16", vc_ptr="*bf16", slot_ptr="*i64", num_heads=32,
        num_kv_heads=8, block_size=16, stride_cs=128, stride_cb=16384, stride_cslot=1024,
        stride_ch=128, stride_vs=1024, stride_vh=128, stride_vd=1)
    compile_epilogue(  # groups of 32 (GGUF's Q4 layouts): 64 rows, 8 splits (48th session)
        6144, 4096, ((64, 256, 4, 8),), group=32, ROPE_HALF=64, pos_ptr="*i64",
        cs_ptr="*fp32", kc_ptr="*bf16", vc_ptr="*bf16", slot_ptr="*i64", num_heads=32,
        num_kv_heads=8, block_size=16, stride_cs=128, stride_cb=16384, stride_cslot=1024,
        stride_ch=128, stride_vs=1024, stride_vh=128, stride_vd=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("launch", LAUNCHES)
def test_gpu_int4_rope_at_8b_shape(launch) -> None:
    """The 8B's QKV (32 + 2 x 8 heads of 128, K 4096) and small heads: the bits of the
    unfused route, both caches too."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    check_rope(128, launch, False, 9, 32, 8, 4096, "cuda")
    check_rope(16, launch, True, -1, device="cuda")
