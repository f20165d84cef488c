"""kiln.kernels.int4_gemv_tma: the TMA-fed one-row int4 GEMV (Gluon, Hopper; groups of
32 by default).

Its arithmetic is int_pairs_asm's PTX (tested there through the interpreter's
emulation); on the CPU the kernel is compiled for sm_90 (no spills, every layout change
free, the K loop's copies and no global load of the thread's own), the launch rules and
the switch are checked. On a Hopper GPU: against the reference, and through
int_weight_linear's dispatch."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kiln.kernels import int4_gemv_tma
from kiln.kernels.reference import dequantize_int_weight, pack_int4
from tests.test_int_wgmma import _hopper


def _compile(G: int, block_n: int, warps: int, has_offset: bool, stages: int = 4,
             glu: int = 0, rope_half: int = 0, pdl: bool = False):
    from triton.experimental.gluon import language as gl

    from kiln.kernels import compile_check as cc

    block_k = 512
    GW = block_k // G
    rows = block_n // 2 if glu or rope_half else block_n  # a TMA box's
    s_l = w_l = gl.NVMMASharedLayout(0, 32, 2)
    values = {"w_desc": f"tensordesc<i32[{rows},{block_k // 8}],{w_l!r}>",
              "s_desc": f"tensordesc<fp32[{rows},{GW}],{s_l!r}>",
              "o_desc": f"tensordesc<fp32[{rows},{GW}],{s_l!r}>",
              "x_desc": f"tensordesc<i32[1,{block_k // 2}],{s_l!r}>", "bias_ptr": "*fp32",
              "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "N": 4096,
              "K": 14336, "K_PER_SPLIT": 3584, "pos_ptr": "*i64", "cs_ptr": "*fp32",
              "kc_ptr": "*bf16", "vc_ptr": "*bf16", "slot_ptr": "*i64",
              **dict.fromkeys(("num_heads", "num_kv_heads", "block_size", "stride_cs",
                               "stride_cb", "stride_cslot", "stride_ch", "stride_vs",
                               "stride_vh", "stride_vd"), "i32")}
    const = dict(G=G, BLOCK_N=block_n, BLOCK_K=block_k, HAS_OFFSET=has_offset,
                 HAS_BIAS=glu > 0 or rope_half > 0, SPLIT_K=1 if glu or rope_half else 4,
                 STAGES=stages, GLU=glu, ROPE_HALF=rope_half, PDL=pdl)
    report = cc.compile_sm90(int4_gemv_tma._w4_gemv_tma_kernel, values, const, warps)
    sass = cc._cuobjdump(cc._compile(int4_gemv_tma._w4_gemv_tma_kernel, values, const,
                                     warps, 2), "-sass")
    return report, sass


def _loop_and_after(sass: str) -> tuple[list[str], list[str]]:
    """The K loop's instructions (the longest backward branch before the barriers are
    invalidated; the barrier waits' retry paths come after) and those after the
    invalidation (the epilogue)."""
    lines = [(int(m[1], 16), m[2]) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    done = next(a for a, t in lines if "CCTL.IV" in t)
    back = [(a, int(m[1], 16)) for a, t in lines
            if a < done and (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)) and int(m[1], 16) < a]
    end, start = max(back, key=lambda b: b[0] - b[1])
    return [t for a, t in lines if start <= a <= end], [t for a, t in lines if a > done]


@pytest.mark.parametrize("G,block_n,warps,offsets", [(128, 64, 4, True), (32, 64, 4, True),
                                                     (64, 128, 8, False)])
def test_compiles_for_hopper_without_spills(G, block_n, warps, offsets):
    report, sass = _compile(G, block_n, warps, offsets)
    assert report.stack_bytes == 0 and report.registers <= 128
    assert report.instructions["cp.async.bulk"] > 0  # the TMA copies
    body, _ = _loop_and_after(sass)  # a step's copies refill the slot it read
    assert sum("UTMALDG" in t for t in body) == (4 if offsets else 3)  # w, s, (o,) x
    assert not any(re.search(r"\bLDG", t) for t in body)  # everything by TMA
    words = block_n * 512 // 8 // (32 * warps)  # a thread's words a step
    # int_pairs_asm's unpacking: a word's four byte selections (ptxas may add a PRMT of
    # its own, e.g. 0x5410 packing two halves)
    assert sum(bool(re.search(r"PRMT.*0x(4400|5511|6622|7733)", t)) for t in body) == 4 * words


@pytest.mark.parametrize("offsets", [True, False])
def test_pdl_copies_the_weights_before_the_wait_and_x_after(offsets):
    """Launched with PDL: the ring's words, scales (and offsets) are copied before
    griddepcontrol.wait (ACQBULK), x's pairs only after it, then the kernel after may start
    (PREEXIT); nothing read from global memory before the wait; the loop as without PDL."""
    stages = 4
    report, sass = _compile(128, 64, 4, offsets, stages=stages, pdl=True)
    assert report.stack_bytes == 0 and report.instructions["griddepcontrol"] == 2
    body, _ = _loop_and_after(sass)
    lines = [t for t in re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass, re.M)]
    wait = next(i for i, t in enumerate(lines) if "ACQBULK" in t)
    loop = lines.index(body[0])
    before = lines[:wait]
    assert sum("UTMALDG" in t for t in before) == stages * (3 if offsets else 2)
    assert not any(re.search(r"\bLDG", t) for t in before)
    assert any("PREEXIT" in t for t in lines[wait:loop])
    assert sum("UTMALDG" in t for t in lines[wait:loop]) == stages  # x's pairs
    assert sum("UTMALDG" in t for t in body) == (4 if offsets else 3)
    plain, _ = _loop_and_after(_compile(128, 64, 4, offsets, stages=stages)[1])
    assert len(body) == len(plain)


@pytest.mark.parametrize("G,block_n,glu,rope_half", [(32, 32, 1, 0), (128, 64, 2, 0),
                                                    (32, 32, 0, 64), (128, 64, 0, 32)])
def test_the_glu_and_rope_epilogues_compile_with_two_copies_a_tensor(G, block_n, glu,
                                                                    rope_half):
    """[gate | up] rows, or a head's dims and those they rotate with, of a program by two
    TMA boxes a tensor and step (words, scales, offsets; x once), the epilogue out of the
    loop (act(gate) * up: an exp; the rotary: stores to q and the caches), no spills."""
    report, sass = _compile(G, block_n, 4, True, glu=glu, rope_half=rope_half)
    assert report.stack_bytes == 0 and report.registers <= 128
    body, after = _loop_and_after(sass)
    assert sum("UTMALDG" in t for t in body) == 7  # 2 x (w, s, o) + x
    if glu:
        assert any("MUFU.EX2" in t for t in after)  # the activation
    else:  # q or a k head rotated, or a v head: four pairs of stores a path
        assert sum(bool(re.search(r"\bSTG", t)) for t in after) >= 6


def test_launch_rules_and_the_switch(monkeypatch):
    from kiln.kernels import int_launch

    down = int4_gemv_tma.gemv_tma_config(4096, 14336, 128)
    assert down.block_k == 512 and 64 * down.split_k <= 132 and down.split_k >= 2
    gate_up = int4_gemv_tma.gemv_tma_config(28672, 4096, 128)
    assert gate_up.split_k == 1  # 448 row blocks
    assert int4_gemv_tma.gemv_tma_config(4096, 4096, 32).block_k == 512
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    w = torch.zeros(4096, 2048, dtype=torch.uint8)
    assert not int4_gemv_tma.gemv_tma_eligible(x, w, torch.zeros(4096, 32))  # not CUDA
    assert int_launch.GEMV_TMA == "32"  # groups of 32 unless KILN_INT4_GEMV_TMA says
    assert int_launch.GEMV_TMA_GLU and int_launch.GEMV_TMA_ROPE  # its epilogues too
    # groups of 128: an LM head's product only (59th session), not a decoder linear's
    assert int_launch.tma_takes(32, 4096) and int_launch.tma_takes(128, 128256)
    assert not any(int_launch.tma_takes(128, n) for n in (4096, 6144, 28672, 49152))
    monkeypatch.setattr(int_launch, "GEMV_TMA_HEAD", False)  # KILN_INT4_GEMV_TMA_HEAD=0
    assert not int_launch.tma_takes(128, 128256) and int_launch.tma_takes(32, 128256)
    monkeypatch.setattr(int_launch, "GEMV_TMA", "0")
    assert not int_launch.tma_takes(32, 4096)
    monkeypatch.setattr(int_launch, "GEMV_TMA", "1")
    assert int_launch.tma_gemv(x, w, torch.zeros(4096, 32)) is None  # (CPU tensors)
    assert int4_gemv_tma.gemv_tma_config(4096, 4096, 32).block_n == 32
    assert int4_gemv_tma.gemv_tma_config(4096, 4096, 128).block_n == 32


def test_groups_of_32_skip_the_pairs_epilogues(monkeypatch):
    """Where the TMA GEMV takes a one-row int4 product, the layer's GLU / rotary epilogues
    (the pairs GEMV's) are not taken: the TMA GEMV's own (the default), or unfused."""
    from kiln.kernels import int_launch
    from kiln.layers import weight_only

    method = weight_only.IntWeightMethod.__new__(weight_only.IntWeightMethod)
    method.bits = 4
    layer = type("L", (), {"weight": torch.zeros(8, 512, dtype=torch.uint8),
                           "weight_scale": torch.zeros(8, 32)})()
    x = torch.zeros(1, 1024, dtype=torch.bfloat16)
    monkeypatch.setattr(weight_only.KF, "_triton", lambda x: True)
    monkeypatch.setattr(int_launch, "GEMV_TMA_GLU", False)
    monkeypatch.setattr(int_launch, "GEMV_TMA_ROPE", False)
    monkeypatch.setattr(int_launch, "tma_gemv", lambda x, w, s: None)
    assert method._one_row(x) and method._tma_gemv(layer, x) is None
    calls = []
    monkeypatch.setattr(int_launch, "tma_gemv", lambda x, w, s: lambda *a, **k: calls.append(k))
    assert method.apply_glu(layer, x, 1) is None and not calls  # unfused: SiLU*mul after
    assert method.apply_rope(layer, x, None) is None
    monkeypatch.setattr(int_launch, "GEMV_TMA_GLU", True)  # the TMA GEMV's own (default)
    method.has_offset = False
    layer.bias = None
    method.apply_glu(layer, x, 2)
    assert calls == [{"glu": 2}]
    monkeypatch.setattr(int_launch, "GEMV_TMA_ROPE", True)  # and its rotary epilogue
    monkeypatch.setattr(int4_gemv_tma, "w4_gemv_tma_rope", lambda *a: calls.append(a[-1]))
    method.apply_rope(layer, x, "rope")
    assert calls[-1] == "rope"


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA GEMV needs a Hopper GPU")
@pytest.mark.parametrize("N,K,G", [(6144, 4096, 128), (4096, 14336, 128), (28672, 4096, 32),
                                   (1000, 2048, 64)])
@pytest.mark.parametrize("offsets,bias", [(True, False), (False, True)])
def test_gpu_matches_the_reference(N, K, G, offsets, bias, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(N + G)
    q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8, generator=gen)
    weight = pack_int4(q)
    scale = torch.rand(N, K // G, device="cuda", generator=gen) * 0.02
    offset = -8 * scale if offsets else None
    b = torch.randn(N, device="cuda", generator=gen) if bias else None
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert int4_gemv_tma.gemv_tma_eligible(x, weight, scale)
    want = x.float() @ dequantize_int_weight(weight, scale, offset).T + (b if bias else 0)
    for cfg, pdl in ((None, False), (None, True), (int4_gemv_tma.GemvTmaConfig(
            128, 512, 1, 3, 8), False), (int4_gemv_tma.GemvTmaConfig(64, 512, 4, 6, 4), True)):
        monkeypatch.setattr(int4_gemv_tma, "PDL", pdl)  # (its launch with PDL too)
        got = int4_gemv_tma.w4_gemv_tma(x, weight, scale, offset, b, cfg).float()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-2, (cfg, pdl, err)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA GEMV needs a Hopper GPU")
def test_gpu_dispatch_matches_the_default_gemv(monkeypatch):
    from kiln.kernels import int_gemm, int_launch

    torch.manual_seed(0)
    q = torch.randint(0, 16, (4096, 4096), device="cuda", dtype=torch.uint8)
    weight, scale = pack_int4(q), torch.rand(4096, 32, device="cuda") * 0.02
    offset = -8 * scale
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    pairs = int_gemm.int_weight_linear(x, weight, scale, offset).float()
    monkeypatch.setattr(int_launch, "GEMV_TMA", "1")
    calls = []
    monkeypatch.setattr(int4_gemv_tma, "w4_gemv_tma",
                        lambda *a, f=int4_gemv_tma.w4_gemv_tma: calls.append(1) or f(*a))
    got = int_gemm.int_weight_linear(x, weight, scale, offset).float()
    error = ((got - pairs).abs().max() / pairs.abs().max()).item()
    assert calls and error < 1e-2, (len(calls), error)


def agree_to_rounding(runs: list[list], tol: float) -> int:
    """The largest |logprob difference| (x 1000, rounded) between the first run and each
    other of the same prompts' completions (each a CompletionOutput with logprobs), over
    every decode step both reached by the same tokens: an assertion error names the first
    step whose tokens differ unless the two tokens are within tol of each other in both
    runs (a near tie, which rounding may break either way), or whose logprobs differ by
    more than tol."""
    worst = 0.0
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for step, (la, lb) in enumerate(zip(a.logprobs, b.logprobs)):
                common = la.keys() & lb.keys()  # (none: the two ranked different tokens)
                diff = max((abs(la[t] - lb[t]) for t in common), default=math.inf)
                assert diff < tol, (step, diff)
                worst = max(worst, diff)
                ta, tb = a.token_ids[step], b.token_ids[step]
                if ta != tb:  # a near tie: both runs rank the two tokens within tol
                    assert abs(la[ta] - la.get(tb, la[ta] - 2 * tol)) < tol, (step, la)
                    assert abs(lb[tb] - lb.get(ta, lb[tb] - 2 * tol)) < tol, (step, lb)
                    break
    return round(worst * 1000)


def test_agreement_to_rounding_allows_near_ties_only():
    from types import SimpleNamespace as C

    base = [C(token_ids=[1, 2, 3], logprobs=[{1: -0.5, 2: -1.0}, {2: -0.70, 3: -0.72},
                                              {3: -0.1}])]
    same = [C(token_ids=[1, 2, 3], logprobs=[{1: -0.51, 2: -1.0}, {2: -0.70, 3: -0.72},
                                              {3: -0.1}])]
    assert agree_to_rounding([base, same], 0.05) == 10
    tie = [C(token_ids=[1, 3, 9], logprobs=[{1: -0.5, 2: -1.0}, {3: -0.70, 2: -0.71},
                                             {9: -3.0}])]  # parted at a tie, then free
    assert agree_to_rounding([base, same, tie], 0.05) == 20
    for bad in ([{1: -0.5}, {3: -0.5, 2: -0.9}, {}],  # parted where no tie was
                [{1: -0.7}, {2: -0.7}, {3: -0.1}],  # a step's logprob moved
                [{1: -0.5}, {4: -0.1}, {3: -0.1}]):  # no token ranked by both
        with pytest.raises(AssertionError):
            agree_to_rounding([base, [C(token_ids=[1, 3, 3] if len(bad[1]) == 2 else
                                        [1, 2, 3], logprobs=bad)]], 0.05)


def tiny_int4_engine(tmp_path, group: int):
    """A random 2-layer Llama (hidden 512: K in whole 512-value TMA steps) built as a
    bfloat16 int4 engine in groups of `group`; its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.build import build
    from kiln.config import BuildConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=320, max_position_embeddings=256))
    model.save_pretrained(tmp_path / "hf")
    return build(tmp_path / "hf", tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_seq_len=256, quantization="int4_wo", group_size=group),
        progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA GEMV needs a Hopper GPU")
def test_gpu_engine_in_groups_of_32_decodes_as_the_pairs_gemv(tmp_path, monkeypatch):
    """A bfloat16 int4 engine in groups of 32 (GGUF's Q4 layouts) whose linears the TMA
    GEMV takes at decode (K a multiple of 512), through CUDA graphs, with and without its
    GLU / rotary epilogues (and launched with PDL behind the PDL-launched norms): each
    decode step's logprobs those of the pairs GEMV (KILN_INT4_GEMV_TMA=0) to bfloat16
    rounding (the two sum in different orders, so a random model's near ties may part
    their greedy tokens; agree_to_rounding)."""
    from kiln import LLM, SamplingParams
    from kiln.kernels import int_launch

    engine_dir = tiny_int4_engine(tmp_path, 32)
    calls = []
    real = int4_gemv_tma.w4_gemv_tma
    monkeypatch.setattr(int4_gemv_tma, "w4_gemv_tma",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=8)
    prompts = [[5, 6, 7], list(range(10, 60)), [300, 2, 150, 9]]
    runs = []
    for switch, fused, pdl in (("0", False, False), ("32", False, False),
                               ("32", True, False), ("32", True, True)):  # (epilogues, PDL)
        monkeypatch.setattr(int_launch, "GEMV_TMA", switch)
        monkeypatch.setattr(int4_gemv_tma, "PDL", pdl)
        monkeypatch.setattr(int_launch, "GEMV_TMA_GLU", fused)
        monkeypatch.setattr(int_launch, "GEMV_TMA_ROPE", fused)
        calls.clear()
        llm = LLM(engine_dir, device="cuda")
        runs.append([llm.generate([p], params)[0].outputs[0] for p in prompts])
        del llm
        assert bool(calls) == (switch == "32")
    print("largest logprob difference x 1000:", agree_to_rounding(runs, 0.05))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA GEMV needs a Hopper GPU")
@pytest.mark.parametrize("cols,K,G", [(14336, 4096, 32), (14336, 4096, 128), (1000, 1024, 32)])
@pytest.mark.parametrize("act,bias", [(1, False), (2, True)])
def test_gpu_glu_epilogue_is_the_act_mul_of_the_stored_gemv(cols, K, G, act, bias):
    """act(gate) * up out of the kernel: bit for bit kiln's SiLU*mul of the GEMV's stored
    [gate | up] (the same launch, one K split; ragged columns)."""
    from kiln.kernels import silu_mul

    gen = torch.Generator(device="cuda").manual_seed(cols + G + act)
    q = torch.randint(0, 16, (2 * cols, K), device="cuda", dtype=torch.uint8, generator=gen)
    scale = torch.rand(2 * cols, K // G, device="cuda", generator=gen) * 0.02
    b = torch.randn(2 * cols, device="cuda", generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = int4_gemv_tma.GemvTmaConfig(32 if G == 32 else 64, 512, 1, 4, 4)
    args = (x, pack_int4(q), scale, -8 * scale, b, cfg)
    stored = int4_gemv_tma.w4_gemv_tma(*args)
    got = int4_gemv_tma.w4_gemv_tma(*args, glu=act)
    assert torch.equal(got, silu_mul.silu_and_mul(stored, gelu_tanh=act == 2))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the TMA GEMV needs a Hopper GPU")
@pytest.mark.parametrize("G,head_dim,v_t,slot", [(32, 128, False, 5), (128, 64, True, -1),
                                                 (32, 64, True, 9)])
def test_gpu_rope_epilogue_is_the_rotary_of_the_stored_gemv(G, head_dim, v_t, slot):
    """rotary(q), rotary(k) and v into the paged caches out of the kernel: v the bits of
    the stored GEMV's, q and k within the bound of an emulation of HF's roundings (compiled
    kernels contract products into FMAs: tests/test_int4_rope.py), the rest of the cache
    untouched, no cache write for a slot < 0."""
    from kiln.kernels.gemv_swap_rope import RopeArgs
    from kiln.kernels.rotary_kv import rotary_and_write_kv
    from tests.test_gemv_swap_epilogues import _rotary_emulated

    heads, kv_heads, K, bs, blocks = 8, 2, 1024, 4, 6
    N = (heads + 2 * kv_heads) * head_dim
    gen = torch.Generator(device="cuda").manual_seed(G + head_dim)
    q4 = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8, generator=gen)
    scale = torch.rand(N, K // G, device="cuda", generator=gen) * 0.02
    bias = (torch.randn(N, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    pos = torch.tensor([27], device="cuda")
    slots = torch.tensor([slot], device="cuda")
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    ang = torch.arange(32, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    shape_v = (blocks, kv_heads, head_dim, bs) if v_t else (blocks, bs, kv_heads, head_dim)
    kc = torch.randn(blocks, bs, kv_heads, head_dim, device="cuda").to(torch.bfloat16)
    vc = torch.randn(*shape_v, device="cuda").to(torch.bfloat16)
    mine = (kc.clone(), vc.clone())
    args = (x, pack_int4(q4), scale, -8 * scale, bias)
    stored = int4_gemv_tma.w4_gemv_tma(*args)
    q, k, v = stored.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
    rotary_and_write_kv(q, k, v, pos, cos_sin, kc, vc, slots, head_dim)
    got = int4_gemv_tma.w4_gemv_tma_rope(*args, RopeArgs(pos, cos_sin, *mine, slots, heads,
                                                         kv_heads))
    assert got is not None and got.shape == (1, heads * head_dim)
    assert torch.equal(mine[1], vc)
    checks = [(got, q)]
    rest = torch.ones(blocks * bs, dtype=torch.bool, device="cuda")
    if slot >= 0:
        checks.append((mine[0].view(-1, kv_heads * head_dim)[slot:slot + 1], k))
        rest[slot] = False
    assert torch.equal(mine[0].view(blocks * bs, -1)[rest], kc.view(blocks * bs, -1)[rest])
    for ours, src in checks:
        emu, bound = _rotary_emulated(src, pos, cos_sin, head_dim)
        assert bool(((ours.float() - emu.float()).abs() <= bound).all())


def test_rope_takes_whole_heads_of_the_fused_qkv():
    from kiln.kernels.gemv_swap_rope import RopeArgs

    def rope(head_dim, heads=8, kv_heads=2):
        z = torch.zeros(1)
        return RopeArgs(z, torch.zeros(32, head_dim), z, z, z, heads, kv_heads)

    assert int4_gemv_tma.rope_takes(12 * 128, rope(128), 32)  # 4 programs a head
    assert int4_gemv_tma.rope_takes(12 * 64, rope(64), 64)  # one
    assert not int4_gemv_tma.rope_takes(12 * 128 + 8, rope(128), 32)  # not q, k, v heads
    assert not int4_gemv_tma.rope_takes(12 * 16, rope(16), 32)  # a program past a head
