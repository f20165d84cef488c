"""kiln.kernels.gemv_swap's epilogues and launches beyond the plain GEMV (30th session):
act(gate) * up of a [gate | up] weight (GLU, KILN_SWAP_GLU), the rotary + KV-cache write
of the fused QKV projection (ROPE, KILN_SWAP_ROPE), the PDL launch behind the kernel that
writes its input (KILN_SWAP_PDL) and which engines PDL-launch their small kernels: under
the Triton interpreter against the unfused kernels, bit for bit, through the layers that
route to them, and on a GPU at Llama-3.1-8B shapes."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)


def check_glu(M: int, N: int, K: int, split_k: int, block_k: int, act: str) -> None:
    """The GLU epilogue (weight [2N, K] = [gate | up] -> act(gate) * up, [M, N]): the bits of
    the plain kernel's [M, 2N] followed by kiln's SiLU*mul / GeGLU kernel, ragged N (a
    program's gate and up halves cut short alike), split K, bias."""
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import silu_mul

    torch.manual_seed(M + N + K)
    # exact grids, as check_rope's: the two launches' GEMMs agree in any summation order
    x = (torch.randint(-8, 9, (M, K)) / 8).to(torch.float16)
    w = (torch.randint(-8, 9, (2 * N, K)) / 64).to(torch.float16)
    b = (torch.randint(-64, 65, (2 * N,)) / 512).to(torch.float16) if M == 3 else None
    cfg = gs.SwapConfig(block_w=32, block_k=block_k, num_warps=4, num_stages=2,
                        split_k=split_k)
    code = gs.ACT_SILU if act == "silu" else gs.ACT_GELU_TANH
    got = gs.gemv_swap(x, w, b, glu=code, config=cfg)
    assert got.shape == (M, N) and got.dtype == torch.float16
    want = silu_mul.silu_and_mul(gs.gemv_swap(x, w, b, config=cfg), gelu_tanh=act == "gelu")
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="no prologue"):
        gs.gemv_swap(torch.cat([x, x], 1), w, act=code, glu=code, config=cfg)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("M,N,K,split_k,block_k", [
    (1, 96, 256, 1, 64), (3, 70, 200, 2, 64), (16, 64, 128, 4, 32)])
def test_gemv_swap_glu_epilogue(interp, M, N, K, split_k, block_k, act) -> None:  # noqa: F811
    interp(check_glu, M, N, K, split_k, block_k, act)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 5, 16])
def test_gpu_gemv_swap_glu_at_8b_shape(M: int) -> None:
    """The GLU epilogue at Llama-3.1-8B's gate-up (28672 x 4096, bf16): the bits of the
    plain kernel followed by kiln's SiLU*mul kernel."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import silu_mul

    g = torch.Generator(device="cuda").manual_seed(M)
    w = (torch.randn(28672, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", generator=g).to(torch.bfloat16)
    got = gs.gemv_swap(x, w, glu=gs.ACT_SILU)
    assert torch.equal(got, silu_mul.silu_and_mul(gs.gemv_swap(x, w)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M,exact", [(1, False), (5, False), (16, False), (5, True),
                                     (16, True)])
def test_gpu_gemv_swap_rope_at_8b_shape(M: int, exact: bool, monkeypatch) -> None:
    """The QKV GEMV with the rotary + KV write in its epilogue at Llama-3.1-8B's shape
    (32 + 2 x 8 heads of 128, bf16, 16-token blocks): V and the slots left alone bit for
    bit; rotary(q) and rotary(k), like the plain GEMV + rotary kernel's, within two bf16
    units in the last place of each pair's larger input of a torch emulation of HF's
    roundings (each product and the sum to bf16): the compiled kernels contract products
    into FMAs (measured on an H200: 12-18% of the elements one unit off the emulation,
    each kernel, and 15% off each other). exact (KILN_ROTARY_EXACT=1: both compiled without
    FP fusion): both the emulation's bits."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import rotary_kv
    from kiln.kernels.gemv_swap_rope import RopeArgs
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    monkeypatch.setattr(rotary_kv, "NO_FUSION", {"enable_fp_fusion": False} if exact else {})
    g = torch.Generator(device="cuda").manual_seed(M)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(6144, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", generator=g).to(torch.bfloat16)
    pos = torch.randint(0, 2000, (M,), device="cuda", generator=g)
    slots = torch.randperm(64 * 16, device="cuda", generator=g)[:M]
    slots[M // 2] = -1
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128)
    ang = torch.arange(2048, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    caches = [torch.randn(64, 16, 8, 128, **bf) for _ in range(2)]
    mine = [c.clone() for c in caches]
    q, k, v = gs.gemv_swap(x, w).split([4096, 1024, 1024], 1)
    want = rotary_and_write_kv(q, k, v, pos, cos_sin, *caches, slots, 128)
    got = gs.gemv_swap(x, w, rope=RopeArgs(pos, cos_sin, *mine, slots, 32, 8))
    assert torch.equal(mine[1], caches[1])
    written = slots >= 0
    cell = slots[written]
    checks = [("q", got, want, q)]
    if written.any():  # M = 1: its one token has no slot
        checks.append(("k", mine[0].view(-1, 1024)[cell], caches[0].view(-1, 1024)[cell],
                       k[written]))
    for name, ours, ref, src in checks:
        emu, bound = _rotary_emulated(src, pos[written] if name == "k" else pos, cos_sin)
        for who, t in (("fused", ours), ("rotary_kv", ref)):
            err = (t.float() - emu.float()).abs()
            assert bool((err <= bound * (not exact)).all()), (name, who, exact,
                                                               (err / bound).max().item())


def _rotary_emulated(t: torch.Tensor, pos: torch.Tensor, cos_sin: torch.Tensor,
                     head_dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_kv's roundings in torch (each product and the sum to t's dtype), and two
    units in the last place of each pair's larger input (the bound of one product fused
    into an FMA, then the sum's rounding)."""
    n, half = t.shape[0], head_dim // 2
    a = t.view(n, -1, head_dim).float()
    cs = cos_sin[pos].to(t.dtype).float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    a1, a2 = a[..., :half], a[..., half:]

    def r(z: torch.Tensor) -> torch.Tensor:
        return z.to(t.dtype).float()

    y = torch.cat([r(r(a1 * cos) + r(-a2 * sin)), r(r(a2 * cos) + r(a1 * sin))], -1)
    big = torch.maximum(a1.abs(), a2.abs()).clamp_min(2.0 ** -100)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
    return y.view(n, -1).to(t.dtype), (2 * ulp).repeat(1, 1, 2).view(n, -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layer", ["qkv", "down"])
def test_gpu_gemv_swap_pdl_waits_for_its_input(layer: str, monkeypatch) -> None:
    """Launched with PDL (KILN_SWAP_PDL) behind the norm / SiLU*mul that writes its input,
    which lets it start at once, in a CUDA graph replayed on new inputs: the GEMV reads
    each replay's input, not the last one's, and gives the bits of the plain launch."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90")
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels import pdl, rms_norm, silu_mul

    N, K = {"qkv": (6144, 4096), "down": (4096, 14336)}[layer]
    g = torch.Generator(device="cuda").manual_seed(7)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.empty(1, 2 * K if layer == "down" else K, **bf)
    nw = torch.ones(K, **bf)

    def step(pdl_launch: bool) -> torch.Tensor:
        a = silu_mul.silu_and_mul(x) if layer == "down" else rms_norm.rms_norm(x, nw, 1e-5)
        return gs.gemv_swap(a, w, pdl_launch=pdl_launch)

    monkeypatch.setattr(pdl, "SWAP_GEMV", True)  # the kernel before lets it start
    x.copy_(torch.randn(x.shape, device="cuda", generator=g))
    step(True)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(True)
    monkeypatch.setattr(pdl, "SWAP_GEMV", False)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        graph.replay()
        assert torch.equal(got, step(False)), layer


def check_glu_route() -> None:
    """KILN_SWAP_GLU (on by default): a gated MLP at decode rows takes the gate-up GEMV's
    GLU epilogue (SiLU, and tanh GELU for Gemma's) and gives the bits of the unfused route
    (the plain GEMV, then kiln's SiLU*mul kernel); prefill rows (17) and a down projection
    that wants its input quantized by the activation kernel keep the unfused route."""
    from kiln import functional as KF
    from kiln.kernels import gemv_swap
    from kiln.layers import swap_input
    from kiln.layers.mlp import GatedMLP

    torch.manual_seed(2)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    swap_input.takes = lambda x: x.dim() == 2 and x.shape[0] <= 16
    swap_input.PLAIN, swap_input.FUSED = True, False
    calls, real = [], gemv_swap.gemv_swap
    gemv_swap.gemv_swap = lambda *a, **k: calls.append(k.get("glu", 0)) or real(*a, **k)
    try:
        for act in ("silu", "gelu_pytorch_tanh"):
            mlp = GatedMLP(64, 96, act=act).half()
            for p in mlp.parameters():
                p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).half()
            x = torch.randn(5, 64, dtype=torch.float16)
            got = {}
            for on in (False, True):
                swap_input.GLU = on
                calls.clear()
                got[on] = mlp(x)
                assert calls == ([1 if act == "silu" else 2, 0] if on else [0, 0]), calls
            assert torch.equal(got[True], got[False])
            calls.clear()
            mlp(torch.randn(17, 64, dtype=torch.float16))
            assert calls == []  # prefill rows: F.linear and the activation kernel
            mlp.down_proj.input_quant = lambda: object()  # an FP8 down projection's wish
            assert swap_input.glu_linear(mlp.gate_up_proj, x, 1, mlp.down_proj) is None
    finally:
        gemv_swap.gemv_swap, swap_input.GLU = real, False


def test_glu_route(interp) -> None:  # noqa: F811
    interp(check_glu_route)


def test_pdl_policy(monkeypatch) -> None:
    """Which engines PDL-launch their small decode kernels (kiln.kernels.pdl): those whose
    decode linears are PDL-launched too (16-bit on the swapped GEMV, sm_90 only; FP8; INT4
    unless KILN_INT_PDL=0; GGUF files whose every storage is one of these), since behind
    the others it cost batch 1 (INT4 -2.7%); and nothing on a CPU tensor, whatever the
    engine."""
    from kiln.kernels import pdl

    monkeypatch.setattr(pdl, "INT_GEMV", False)
    monkeypatch.setattr(pdl, "INT8_GEMV", False)  # KILN_INT8_PDL=0 (test_int_gemv1_pdl)
    assert pdl.linears_take_part("none", {}, True)
    assert not pdl.linears_take_part("none", {}, False)  # 16-bit off Hopper: cuBLAS
    assert pdl.linears_take_part("fp8", {}, False)
    for method in ("int4_wo", "int8_wo", "int8_sq", "int4_awq"):
        assert not pdl.linears_take_part(method, {}, True), method
    # SmolLM2's GGUF: Q4_1 linears, the tied head in Q8_0 (engine.json's quant_layers)
    smol = {f"model.layers.{i}.{m}": "int4_g32_offset" for i in range(30)
            for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                      "mlp.down_proj")} | {"lm_head": "int8_g32"}
    monkeypatch.setattr(pdl, "GGUF", True)  # the default (KILN_GGUF_PDL)
    assert not pdl.linears_take_part("gguf", smol, True)
    monkeypatch.setattr(pdl, "INT_GEMV", True)
    assert pdl.linears_take_part("int4_wo", {}, True)
    assert not pdl.linears_take_part("int8_wo", {}, True)
    # GGUF: where every layer's storage runs on a PDL-launched GEMV (Q4_0 / Q4_1 / Q4_K
    # blocks on the one-row INT4 GEMV, 16-bit tensors on the swapped one); the head (once a
    # step) does not count
    assert pdl.linears_take_part("gguf", smol, True)
    assert pdl.linears_take_part("gguf", {"a": "int4_g32", "b": "none"}, True)
    assert not pdl.linears_take_part("gguf", {"a": "int4_g32", "b": "none"}, False)
    assert not pdl.linears_take_part("gguf", smol | {"a": "int8_g16_offset"}, True)
    assert not pdl.linears_take_part("gguf", {"lm_head": "int4_g32"}, True)
    monkeypatch.setattr(pdl, "GGUF", False)  # KILN_GGUF_PDL=0
    assert not pdl.linears_take_part("gguf", smol, True)
    monkeypatch.setattr(pdl, "_SMALL", [True])
    pdl.set_small_kernels(True)
    assert not pdl.enabled(torch.zeros(1)) and not pdl.dependents(torch.zeros(1))


def check_rope(M: int, head_dim: int, split_k: int, v_t: bool, heads: int = 4,
               kv_heads: int = 2) -> None:
    """The QKV GEMV with rotary and the KV-cache write in its epilogue: rotary(q) and both
    caches bit for bit what the plain GEMV followed by kiln's rotary + KV-write kernel
    gives (interpreted), a padding token's slot (-1) left alone, V transposed or not."""
    from kiln.kernels import gemv_swap as gs
    from kiln.kernels.gemv_swap_rope import RopeArgs
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    torch.manual_seed(M + head_dim)
    K, bs, blocks = 128, 4, 6
    N = (heads + 2 * kv_heads) * head_dim
    # x, w and b on coarse grids: every product and sum exact in float32, so the two
    # launches' GEMMs agree whatever order the interpreter's matmul sums in (it differs by
    # CPU: OpenBLAS picks its kernel by the core); y (multiples of 2^-9 up to 16) still
    # rounds when stored in float16
    x = (torch.randint(-8, 9, (M, K)) / 8).to(torch.float16)
    w = (torch.randint(-8, 9, (N, K)) / 64).to(torch.float16)
    b = (torch.randint(-64, 65, (N,)) / 512).to(torch.float16)
    pos = torch.randint(0, 30, (M,))
    slots = torch.randperm(blocks * bs)[:M]
    slots[M // 2] = -1  # a padding token
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ang = torch.arange(32).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    caches = []
    for _ in range(2):
        kc = torch.randn(blocks, bs, kv_heads, head_dim).to(torch.float16)
        vc = torch.randn(blocks, kv_heads, head_dim, bs).to(torch.float16) if v_t else \
            torch.randn(blocks, bs, kv_heads, head_dim).to(torch.float16)
        caches.append((kc, vc))
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    cfg = gs.SwapConfig(64, 64, 4, 2, split_k)
    qkv = gs.gemv_swap(x, w, b, config=cfg)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
    want = rotary_and_write_kv(q, k, v, pos, cos_sin, *caches[0], slots, head_dim)
    got = gs.gemv_swap(x, w, b, config=cfg, rope=RopeArgs(pos, cos_sin, *caches[1], slots,
                                                           heads, kv_heads))
    assert got.shape == (M, heads * head_dim)
    assert torch.equal(got, want)
    assert torch.equal(caches[1][0], caches[0][0]) and torch.equal(caches[1][1], caches[0][1])


@pytest.mark.parametrize("M,head_dim,split_k,v_t", [
    (1, 128, 1, False), (3, 64, 2, True), (16, 128, 1, True),
    (5, 16, 1, False), (2, 32, 2, True)])  # small heads: several a program
def test_gemv_swap_rope_epilogue(interp, M, head_dim, split_k, v_t) -> None:  # noqa: F811
    interp(check_rope, M, head_dim, split_k, v_t)


def test_gemv_swap_rope_epilogue_ragged_heads(interp) -> None:  # noqa: F811
    """3 + 2 x 1 heads of 32: the last program holds the V head and one past the weight."""
    interp(check_rope, 3, 32, 1, False, heads=3, kv_heads=1)


def check_rope_route() -> None:
    """KILN_SWAP_ROPE (on by default): a decode step's attention layer takes the QKV GEMV
    with the rotary and KV write in its epilogue (Attention.fused_qkv), and its attention
    output and both caches are the bits of the usual route (QKV GEMV, rotary + KV-write
    kernel), three sequences at different positions; off (or attention sinks) it is not
    taken."""
    from kiln import functional as KF
    from kiln.layers import swap_input
    from kiln.layers.attention import Attention, AttentionMetadata, forward_context
    from kiln.layers.linear import QKVLinear

    torch.manual_seed(3)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    swap_input.takes = lambda x: x.dim() == 2 and x.shape[0] <= 16
    swap_input.PLAIN, swap_input.FUSED = True, False
    heads, kv_heads, d, hidden, bs = 4, 2, 64, 128, 4
    qkv = QKVLinear(hidden, heads, kv_heads, d, bias=True).half()
    for p in qkv.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).half()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    seq_lens = [5, 9, 2]
    positions = torch.tensor([n - 1 for n in seq_lens])
    tables = torch.arange(12, dtype=torch.int32).view(3, 4)
    slots = torch.tensor([int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs
                          for i, n in enumerate(seq_lens)])
    meta = AttentionMetadata(slots, tables, torch.tensor(seq_lens, dtype=torch.int32),
                             torch.arange(4, dtype=torch.int32), [0, 1, 2, 3], seq_lens, 1,
                             max(seq_lens))
    x = torch.randn(3, hidden, dtype=torch.float16)
    start = (torch.randn(12, bs, kv_heads, d).half(), torch.randn(12, bs, kv_heads, d).half())
    got = {}
    for on in (False, True):
        swap_input.ROPE = on
        attn = Attention(heads, kv_heads, d, d ** -0.5)
        attn.k_cache, attn.v_cache = start[0].clone(), start[1].clone()
        with forward_context(meta):
            q = attn.fused_qkv(qkv, x, positions, cos_sin)
            assert (q is not None) == on
            if q is None:
                q, k, v = qkv(x).split([heads * d, kv_heads * d, kv_heads * d], 1)
                out = attn(q, k, v, positions, cos_sin)
            else:
                out = attn.attend_rotated(q, cos_sin)
        got[on] = (out, attn.k_cache, attn.v_cache)
        attn.rotate_keys = True  # attention sinks: keys cached before rotary
        with forward_context(meta):
            assert attn.fused_qkv(qkv, x, positions, cos_sin) is None
    swap_input.ROPE = False
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


def test_rope_route(interp) -> None:  # noqa: F811
    interp(check_rope_route)


def test_rotary_roundings_compiled() -> None:
    """Why the compiled rotations are off HF's roundings (the 8B test's bound), and
    KILN_ROTARY_EXACT=1's fix, in the sm_90 PTX of both rotary launches: with FP fusion
    (Triton's default) a product and the sum become one fma.rn.bf16x2 (rotary_kv; the
    GEMV's epilogue too under Triton 3.6); without it (rotary_kv.NO_FUSION, the launch
    option) none does, and the GEMV is still wgmma."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels.compile_check import _compile, rotary_launches

    for fn, values, constexprs, warps, stages in rotary_launches():
        fused = _compile(fn, values, constexprs, warps, stages).asm["ptx"]
        exact = _compile(fn, values, constexprs, warps, stages, fp_fusion=False).asm["ptx"]
        # (the GEMV's epilogue contracts under Triton 3.6, the device's, not under 3.9)
        assert fused.count("fma.rn.bf16x2") > 0 or "ROPE_HALF" in constexprs, fn
        assert "fma.rn.bf16x2" not in exact and "cvt.rn.bf16" in exact, fn
        assert ("wgmma.mma_async" in exact) == ("ROPE_HALF" in constexprs), fn
