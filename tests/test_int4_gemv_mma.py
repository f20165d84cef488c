"""kiln.kernels.int4_gemv_mma: the one-row int4 GEMV with its products on the tensor cores
(Gluon, opt-in KILN_INT4_GEMV_MMA=1). Gluon has no interpreter: on the CPU the kernel is
compiled for sm_90 and its K loop's instructions counted (the point of the kernel); the
GPU tests compare it with the reference and run an engine through it."""

from __future__ import annotations

import collections
import itertools
import os
import re

import pytest
import torch

gluon_ok = pytest.importorskip("triton.experimental.gluon")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: Gluon kernels are not compiled", allow_module_level=True)

from kiln.kernels import int4_gemv_mma  # noqa: E402
from kiln.kernels.reference import dequantize_int_weight, pack_int4  # noqa: E402
from tests.test_int4_gemv_tma import agree_to_rounding, tiny_int4_engine  # noqa: E402
from tests.test_int_wgmma import _hopper  # noqa: E402


def _compile(has_offset: bool, split: int, pdl: bool = False, tiles: int = 1):
    from kiln.kernels import compile_check as cc

    values = {"w_ptr": "*i32", "x_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32",
              "count_ptr": "*i32", "N": 4096, "K": 4096, "stride_wn": 512, "stride_sn": 32,
              "CHUNKS_PER_SPLIT": 8}
    const = dict(HAS_OFFSET=has_offset, HAS_BIAS=False, SPLIT_K=split, PDL=pdl, TILES=tiles)
    report = cc.compile_sm90(int4_gemv_mma._w4_gemv_mma_kernel, values, const, 4)
    sass = cc._cuobjdump(cc._compile(int4_gemv_mma._w4_gemv_mma_kernel, values, const, 4, 2),
                         "-sass")
    return report, sass


def _loop(sass: str) -> list[str]:
    """The K loop's instructions (the longest backward branch)."""
    lines = [(int(m[1], 16), m[2]) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    back = [(a, int(m[1], 16)) for a, t in lines
            if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)) and int(m[1], 16) < a]
    end, start = max(back, key=lambda b: b[0] - b[1])
    return [t for a, t in lines if start <= a <= end]


@pytest.mark.parametrize("has_offset,split,pdl,tiles", [(True, 1, False, 1), (True, 4, True, 1),
                                                        (False, 4, True, 1), (True, 4, True, 2),
                                                        (False, 1, False, 2)])
def test_compiles_for_hopper_with_few_instructions_a_word(has_offset, split, pdl, tiles):
    """No spills; the K loop's trip (two chunks: a lane's 16 words a tile of 16 rows)
    takes 16 mma.sync a tile for the products and 16 for x's sums, 16-byte loads of its
    words and x's pairs, and at most 20 instructions a word in all (the pairs GEMV's K
    loop: 27-33), no bfloat16-pair FMA left."""
    report, sass = _compile(has_offset, split, pdl, tiles)
    assert report.stack_bytes == 0 and report.registers <= 128, report
    assert report.instructions["mma.sync"] == 16 * tiles + 16
    assert report.instructions["griddepcontrol"] == (2 if pdl else 0)
    body = _loop(sass)
    ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", t)[1] for t in body)
    assert ops["HMMA"] == 16 * tiles + 16 and ops["HFMA2"] == 0, ops
    # a chunk: 2 rows' words a tile and 4 x 4 of x's pairs
    assert sum("LDG.E.128" in t for t in body) == 2 * (2 * tiles + 4), ops
    assert len(body) <= 20 * 16 * tiles, (len(body), ops)
    if pdl:  # the first chunk's words before the wait (ACQBULK), x's pairs after it
        code = sass[:sass.index(body[0])]
        wait = code.index("ACQBULK")
        assert code[:wait].count("LDG.E.128") == 2 * tiles
        assert code[wait:].count("LDG.E.128") == 4


def test_chunk_asm_scales_by_the_base_it_drops():
    """The asymmetric chunk adds s D + (o - 128 s) X, the symmetric one s D - 136 s X."""
    asym, sym = int4_gemv_mma._ASYM.value, int4_gemv_mma._SYM.value
    assert "mov.f32 k, 0fC3000000;" in asym and "fma.rn.f32 c, k, $32, $33;" in asym
    assert "mov.f32 k, 0fC3080000;" in sym and "mul.rn.f32 c, k, $34;" in sym
    assert asym.count("mma.sync") == sym.count("mma.sync") == 16
    assert int4_gemv_mma._ASYM2.value.count("mma.sync") == 24  # two tiles, one X


def test_opt_in_and_its_glu_and_rotary_unfused(monkeypatch):
    """KILN_INT4_GEMV_MMA is off by default; where the kernel takes a one-row product the
    layer's GLU and rotary run unfused (the kernel has no epilogues), and the launch rule
    splits K only while the programs fit about two waves."""
    from kiln.kernels import int_launch
    from kiln.layers import weight_only

    assert not int_launch.GEMV_MMA
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    w, s = torch.zeros(4096, 2048, dtype=torch.uint8), torch.zeros(4096, 32)
    monkeypatch.setattr(int_launch, "GEMV_MMA", True)
    assert int_launch.tma_gemv(x, w, s) is None  # (CPU tensors)
    assert not int4_gemv_mma.gemv_mma_eligible(x, w, s)
    assert int4_gemv_mma.w4_gemv_mma(x, w, s, None, None, glu=1) is None
    method = weight_only.IntWeightMethod.__new__(weight_only.IntWeightMethod)
    method.bits, method.has_offset = 4, False
    layer = type("L", (), {"weight": w, "weight_scale": s, "bias": None})()
    monkeypatch.setattr(weight_only.KF, "_triton", lambda x: True)
    monkeypatch.setattr(int_launch, "tma_gemv", lambda x, w, s: int4_gemv_mma.w4_gemv_mma)
    assert method.apply_glu(layer, x, 1) is None
    assert method.apply_rope(layer, x, "rope") is None
    for (N, K), tiles in itertools.product(((6144, 4096), (4096, 4096), (28672, 4096),
                                            (4096, 14336)), (1, 2)):
        cfg = int4_gemv_mma.gemv_mma_config(N, K, tiles=tiles)
        programs = -(-N // (16 * tiles * cfg.num_warps)) * cfg.split_k
        assert programs <= 2 * 132 or cfg.split_k == 1, (N, K, cfg)
        assert K // 128 // cfg.split_k >= 2, (N, K, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the mma GEMV is launched on Hopper only")
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (28672, 4096), (1000, 1024),
                                 (200, 256)])
@pytest.mark.parametrize("offsets,bias", [(True, False), (False, True)])
def test_gpu_matches_the_reference(N, K, offsets, bias):
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8, generator=gen)
    weight = pack_int4(q)
    scale = torch.rand(N, K // 128, device="cuda", generator=gen) * 0.02
    offset = -8 * scale + 0.001 if offsets else None
    b = torch.randn(N, device="cuda", generator=gen) if bias else None
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert int4_gemv_mma.gemv_mma_eligible(x, weight, scale)
    want = x.float() @ dequantize_int_weight(weight, scale, offset).T + (b if bias else 0)
    for cfg in (None, int4_gemv_mma.GemvMmaConfig(4, 1), int4_gemv_mma.GemvMmaConfig(8, 3),
                int4_gemv_mma.GemvMmaConfig(2, 8), int4_gemv_mma.GemvMmaConfig(4, 1, 2),
                int4_gemv_mma.GemvMmaConfig(4, 5, 2)):
        for _ in range(2):  # (the split counters are zeroed for the next launch)
            got = int4_gemv_mma.w4_gemv_mma(x, weight, scale, offset, b, cfg).float()
            err = (got - want).abs().max() / want.abs().max()
            assert err < 5e-3, (cfg, err)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the mma GEMV is launched on Hopper only")
def test_gpu_engine_in_groups_of_128_decodes_as_the_pairs_gemv(tmp_path, monkeypatch):
    """KILN_INT4_GEMV_MMA=1: a bfloat16 int4 engine in groups of 128 decodes through the
    kernel (CUDA graphs; GLU and rotary unfused) with each step's logprobs those of the
    default pairs GEMV to bfloat16 rounding (agree_to_rounding)."""
    from kiln import LLM, SamplingParams
    from kiln.kernels import int_launch

    engine_dir = tiny_int4_engine(tmp_path, 128)
    calls = []
    real = int4_gemv_mma.w4_gemv_mma

    def counted(*a, **k):
        calls.append(k)
        return real(*a, **k)

    counted.epilogues = False
    monkeypatch.setattr(int4_gemv_mma, "w4_gemv_mma", counted)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=8)
    prompts = [[5, 6, 7], list(range(10, 60)), [300, 2, 150, 9]]
    runs = []
    for mma in (False, True):
        monkeypatch.setattr(int_launch, "GEMV_MMA", mma)
        calls.clear()
        llm = LLM(engine_dir, device="cuda")
        runs.append([llm.generate([p], params)[0].outputs[0] for p in prompts])
        del llm
        assert bool(calls) == mma and {} in calls if mma else not calls
    print("largest logprob difference x 1000:", agree_to_rounding(runs, 0.05))
