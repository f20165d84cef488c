"""kiln.kernels.int_wgmma: the Gluon W4A16 kernel on Hopper's warpgroup MMA.

Gluon has no interpreter, so on the CPU: the two dequantization PTX blocks the kernel
ships are executed by a small PTX evaluator (the handful of instructions they use) and
compared with the reference dequantization; the kernel is compiled for sm_90 (no
spills, the tensor-core steps not serialized); the launch rules. On a Hopper GPU: the
kernel against the reference GEMM."""

from __future__ import annotations

import re

import pytest
import torch

from kiln.kernels import int_wgmma
from kiln.kernels.reference import dequantize_int_weight, pack_int4


def _bits(f: torch.Tensor) -> torch.Tensor:
    return f.float().view(torch.int32).long() & 0xFFFFFFFF


def _float(b: torch.Tensor) -> torch.Tensor:
    """uint32 patterns (int64) as float32."""
    return ((b + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)


def _imm(token: str) -> int:
    if token.startswith("0f"):
        return int(token[2:], 16)
    return int(token, 0) & 0xFFFFFFFF


def run_ptx(asm: str, operands: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluate a block of the PTX the dequantization uses over tensors of 32-bit
    patterns (int64 holding uint32); operands: '$N' -> bits. Returns every register."""
    regs = dict(operands)

    def val(tok: str) -> torch.Tensor:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return torch.full_like(next(iter(operands.values())), _imm(tok))

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, srcs = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            out = srcs[0]
        elif op == "shr.u32":
            out = srcs[0] >> srcs[1]
        elif op == "shl.b32":
            out = (srcs[0] << srcs[1]) & 0xFFFFFFFF
        elif op == "lop3.b32":
            assert int(args[4], 0) == 0xEA, "only (a & b) | c"
            out = (srcs[0] & srcs[1]) | srcs[2]
        elif op == "sub.f32":
            out = _bits(_float(srcs[0]) - _float(srcs[1]))
        elif op == "fma.rn.f32":  # exact in float64 (products of float32s), rounded once
            out = _bits((_float(srcs[0]).double() * _float(srcs[1]).double() +
                         _float(srcs[2]).double()).float())
        elif op == "cvt.rn.bf16x2.f32":
            hi, lo = (_float(s).to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
                      for s in srcs)
            out = (hi << 16) | lo
        else:
            raise AssertionError(f"no evaluator for {op}")
        regs[d] = out & 0xFFFFFFFF
    return regs


def _dequant_by_ptx(fast: bool, words: torch.Tensor, s: torch.Tensor, o: torch.Tensor):
    """bfloat16 [n, 8] of each word (value order) from the shipped PTX."""
    if fast:
        ops = {"$4": words, "$8": _bits(s / 4096), "$12": _bits(o - 2048 * s),
               "$16": _bits(s / 65536), "$20": _bits(o - 128 * s)}
        regs = run_ptx(int_wgmma._DEQUANT_FAST.value, ops)
    else:
        regs = run_ptx(int_wgmma._DEQUANT.value, {"$4": words, "$8": _bits(s),
                                                   "$12": _bits(o)})
    pairs = torch.stack([regs[f"${j}"] for j in range(4)], dim=1)  # [n, 4]
    halves = torch.stack([pairs & 0xFFFF, pairs >> 16], dim=2).reshape(-1, 8)
    return ((halves + 2**15) % 2**16 - 2**15).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("fast", [False, True])
def test_the_dequantization_ptx_gives_the_reference_weights(fast):
    gen = torch.Generator().manual_seed(0)
    n = 4096
    q = torch.randint(0, 16, (n, 8), generator=gen, dtype=torch.uint8)
    s = torch.rand(n, generator=gen) * 0.02 + 1e-4
    o = -(torch.rand(n, generator=gen) * 10) * s  # RTN's minimum, GGUF's -m
    words = pack_int4(q).view(torch.int32).long().flatten() & 0xFFFFFFFF
    got = _dequant_by_ptx(fast, words, s, o).float()
    want = (q.float() * s[:, None] + o[:, None]).to(torch.bfloat16).float()
    # one bfloat16 step, or (fast: C's rounding, where q s + o nearly cancels) 2^-12 s
    tol = torch.maximum(want.abs() * 2.0 ** -7, s[:, None] * 2.0 ** -12 * fast)
    off = (got - want).abs()
    assert (off <= tol).all(), "more than one bfloat16 step from the reference"
    # the exact form rounds q s + o once (as the float tiles); the fast one's C carries
    # ~2^-13 s of rounding, which moves a few values across a bfloat16 rounding boundary
    assert (off > 0).float().mean() <= (0.02 if fast else 0.002)


def test_the_ptx_evaluator_catches_a_wrong_shift():
    """The check above can fail: the fast block with its third shift wrong is caught."""
    broken = int_wgmma._DEQUANT_FAST.value.replace("shr.u32 t, $4, 4;", "shr.u32 t, $4, 8;")
    words = torch.tensor([0x76543210], dtype=torch.int64)
    s, o = torch.tensor([0.01]), torch.tensor([0.0])
    ops = {"$4": words, "$8": _bits(s / 4096), "$12": _bits(o - 2048 * s),
           "$16": _bits(s / 65536), "$20": _bits(o - 128 * s)}
    good = run_ptx(int_wgmma._DEQUANT_FAST.value, ops)["$2"]
    bad = run_ptx(broken, ops)["$2"]
    assert not torch.equal(good, bad)


def test_the_switch_reads_its_rows():
    from kiln.kernels.int_launch import wgmma_rows

    assert wgmma_rows("") == ((5, 255),)  # the default: the batches it was timed at
    assert wgmma_rows("0") == ()  # off: no row count takes it
    assert wgmma_rows("1") == ((5, 255),)
    assert wgmma_rows("2-16") == ((2, 16),)
    assert wgmma_rows("5-8, 33-64") == ((5, 8), (33, 64))
    with pytest.warns(UserWarning, match="KILN_INT_WGMMA"):
        assert wgmma_rows("yes") == ()
    with pytest.warns(UserWarning, match="KILN_INT_WGMMA"):
        assert wgmma_rows("5-8,x") == ()


def test_launch_rules(monkeypatch):
    cfg = int_wgmma.wgmma_config(64, 28672, 4096)
    assert cfg.split_k == 1  # gate_up: 448 column blocks of 64 fill the SMs
    qkv = int_wgmma.wgmma_config(64, 6144, 4096)
    assert 48 * qkv.split_k <= 2 * 132 and qkv.split_k >= 2
    down = int_wgmma.wgmma_config(64, 4096, 14336)
    assert down.split_k >= 4
    x = torch.zeros(4, 4096, dtype=torch.bfloat16)
    w = torch.zeros(4096, 2048, dtype=torch.uint8)
    assert not int_wgmma.wgmma_eligible(x, w, torch.zeros(4096, 32))  # not CUDA
    assert cfg.block_n == 64 and int_wgmma.wgmma_config(32, 28672, 4096).block_n == 128
    # o: two waves of programs at 8 rows, one at 9-32 (two there were 2.3x slower, H100)
    assert int_wgmma.wgmma_config(8, 4096, 4096).split_k == 8
    assert all(int_wgmma.wgmma_config(m, 4096, 4096).split_k == 4 for m in (9, 16, 32))
    # the override: every field, or split 0 for the rule's split (for its rows a program)
    monkeypatch.setenv("KILN_INT_WGMMA_CFG", "64,128,3,4,0")
    assert int_wgmma.wgmma_config(64, 6144, 4096) == int_wgmma.WgmmaConfig(64, 128, 3, 4, False)
    monkeypatch.setenv("KILN_INT_WGMMA_CFG", "128,128,0,4,1")
    twice = int_wgmma.wgmma_config(64, 6144, 4096)
    assert twice.block_n == 128 and twice.stages == 4 and twice.fast
    assert twice.split_k == 2 * qkv.split_k  # half the column blocks
    monkeypatch.delenv("KILN_INT_WGMMA_CFG")
    # prompts past 64 rows: 128 rows a program, 4 stages, one wave (half the 64-row
    # blocks' split)
    for n, k in ((6144, 4096), (4096, 4096), (4096, 14336)):
        split = int_wgmma.wgmma_config(64, n, k).split_k
        for M in (65, 128, 129, 255):
            cfg = int_wgmma.wgmma_config(M, n, k)
            assert cfg.block_m == 0 and int_wgmma.block_rows(M) == 128  # (by M)
            assert (cfg.stages, cfg.split_k) == (4, split // 2)
    assert int_wgmma.block_rows(64) == 64 and int_wgmma.wgmma_config(64, 6144, 4096).stages == 3


def test_past_32_rows_only_the_big_linears_take_it(monkeypatch):
    from kiln.kernels import int_launch

    monkeypatch.setattr(int_launch, "WGMMA_ROWS", ((5, 64),))
    assert int_launch.wgmma_takes(64, 28672, 4096) and int_launch.wgmma_takes(64, 4096, 14336)
    assert not int_launch.wgmma_takes(64, 6144, 4096)  # qkv, o: the Triton tiles
    assert int_launch.wgmma_takes(16, 6144, 4096) and not int_launch.wgmma_takes(4, 6144, 4096)
    monkeypatch.setattr(int_launch, "WGMMA_ROWS", ())  # off
    assert not int_launch.wgmma_takes(64, 28672, 4096)
    monkeypatch.setattr(int_launch, "WGMMA_ROWS", ((5, 8), (33, 64)))  # two ranges
    assert int_launch.wgmma_takes(8, 6144, 4096) and int_launch.wgmma_takes(64, 28672, 4096)
    assert not int_launch.wgmma_takes(16, 6144, 4096)
    assert not int_launch.wgmma_takes(65, 28672, 4096)


def test_prompt_rows_take_the_dequantized_weight_but_int8(monkeypatch):
    from kiln.kernels import int_launch

    monkeypatch.setattr(int_launch, "_sms", lambda device: 132)
    x = torch.zeros(1)
    assert int_launch.dequant_first(65, 4096, 4096, 128, 4, x)
    assert int_launch.dequant_first(255, 4096, 4096, 16, 8, x)  # grouped int8
    assert not int_launch.dequant_first(64, 4096, 4096, 128, 4, x)  # decode batches
    assert not int_launch.dequant_first(256, 4096, 4096, 128, 4, x)  # (DEQUANT_ROWS: always)
    assert int_launch.dequant_first(128, 28672, 4096, 128, 4, x)  # int4 (Gluon's first)
    assert not int_launch.dequant_first(128, 28672, 4096, 32, 8, x)  # 224 tiles
    assert int_launch.dequant_first(128, 14336, 4096, 32, 8, x)  # 112 tiles: under a wave
    assert not int_launch.dequant_first(200, 14336, 4096, 32, 8, x)  # 224
    assert not int_launch.dequant_first(100, 4096, 4096, 4096, 8, x)  # per channel: digits
    monkeypatch.setattr(int_launch, "WGMMA_ROWS", int_launch.wgmma_rows(""))
    assert all(int_launch.wgmma_takes(m, n, k) for m in (65, 128)  # all four linears
               for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)))
    assert int_launch.wgmma_takes(129, 28672, 4096) and int_launch.wgmma_takes(255, 4096, 14336)
    assert not int_launch.wgmma_takes(129, 4096, 4096)  # o: dequantized
    assert not int_launch.wgmma_takes(64, 4096, 4096)  # (33-64 rows: the Triton tiles)
    assert not int_launch.wgmma_takes(256, 28672, 4096)


def test_int8_prompt_rows_take_digit_plane_tiles(monkeypatch):
    from kiln.kernels import int_launch

    monkeypatch.setattr(int_launch, "_sms", lambda device: 132)
    cuda = torch.device("cuda")
    wide = int_launch.int_gemm_config(128, 28672, 4096, cuda, 8, 0)  # gate_up: 224 tiles
    assert wide.digits and (wide.block_m, wide.block_n) == (128, 128)
    for M, N in ((65, 6144), (200, 4096), (255, 4096)):
        cfg = int_launch.int_gemm_config(M, N, 4096, cuda, 8, 4096)
        assert cfg.digits and (cfg.block_m, cfg.block_n, cfg.block_k) == (64, 64, 128)
    grouped = int_launch.int_gemm_config(128, 4096, 4096, cuda, 8, 32)
    assert not grouped.digits  # (the float tiles, where dequant_first leaves them)
    assert not int_launch.int_gemm_config(100, 4096, 4096, torch.device("cpu"), 8, 0).digits


def test_a_triton_without_gluon_falls_back_to_the_triton_tiles(monkeypatch):
    import sys

    from kiln.kernels import int_launch

    int_launch.wgmma_module.cache_clear()
    assert int_launch.wgmma_module() is int_wgmma
    int_launch.wgmma_module.cache_clear()
    monkeypatch.setitem(sys.modules, "kiln.kernels.int_wgmma", None)  # import fails
    try:
        assert int_launch.wgmma_module() is None
    finally:
        int_launch.wgmma_module.cache_clear()
    monkeypatch.delitem(sys.modules, "kiln.kernels.int_wgmma")
    monkeypatch.setattr(int_launch.triton, "__version__", "3.5.1")  # Gluon's API before
    try:
        assert int_launch.wgmma_module() is None
        assert int_launch._gluon_module("int4_gemv_tma") is None
    finally:
        int_launch.wgmma_module.cache_clear()


def _compile(block_m: int, group: int, pdl: bool = False):
    """The kernel compiled for sm_90 at gate_up's shape: (report, SASS)."""
    from triton.experimental.gluon import language as gl

    from kiln.kernels import compile_check as cc

    x_l = gl.NVMMASharedLayout.get_default_for([block_m, 128], gl.bfloat16)
    w_l = gl.NVMMASharedLayout.get_default_for([128, 16], gl.int32)
    s_l = gl.NVMMASharedLayout.get_default_for([128, 4], gl.float32)
    values = {"x_desc": f"tensordesc<bf16[{block_m},128],{x_l!r}>",
              "w_desc": f"tensordesc<i32[128,16],{w_l!r}>",
              "s_desc": f"tensordesc<fp32[128,4],{s_l!r}>",
              "o_desc": f"tensordesc<fp32[128,4],{s_l!r}>", "bias_ptr": "*fp32",
              "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": 64,
              "N": 28672, "K": 4096, "K_PER_SPLIT": 4096, "stride_om": 28672}
    const = dict(G=group, BLOCK_N=128, BLOCK_M=block_m, BLOCK_K=128, HAS_OFFSET=True,
                 HAS_BIAS=False, SPLIT_K=1, STAGES=3, FAST=True, PDL=pdl)
    report = cc.compile_sm90(int_wgmma._w4_wgmma_kernel, values, const, 8)
    return report, cc._cuobjdump(cc._compile(int_wgmma._w4_wgmma_kernel, values, const, 8, 2),
                                 "-sass")


@pytest.mark.parametrize("block_m,group", [(8, 128), (64, 128), (16, 32), (16, 64), (128, 128)])
def test_compiles_for_hopper_without_spills_or_serialized_mma(block_m, group):
    report, sass = _compile(block_m, group)
    assert report.stack_bytes == 0
    assert report.instructions["wgmma.mma_async"] > 0
    assert report.instructions["cp.async.bulk"] > 0  # the TMA copies
    # one wait for the step before (<= 1 in flight) a loop, none after each MMA, and no
    # proxy fence waiting on a load of the thread's own (every copy is TMA's)
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", sass)) == 1
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass)) == 1  # after the loop
    loop = sass.split("WARPGROUP.DEPBAR.LE gsb0, 0x0")[0]
    assert not re.search(r"\bLDG", loop), "a load of the thread's own before the fence"
    assert sum("UTMALDG" in t for t in k_loop(sass)) == 4  # words, x, scales, offsets


def test_pdl_copies_the_weights_before_the_wait_and_x_after():
    """Launched with PDL (KILN_INT_WGMMA_PDL=1): the first STAGES - 1 steps' words, scales
    and offsets are copied before griddepcontrol.wait (ACQBULK), x's tiles only after it,
    then the kernel after may start (PREEXIT), before the loop's first barrier wait; the
    loop refills a slot with all four copies."""
    report, sass = _compile(16, 128, pdl=True)
    assert report.stack_bytes == 0 and report.instructions["griddepcontrol"] == 2
    lines = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass, re.M)
    wait = next(i for i, t in enumerate(lines) if "ACQBULK" in t)
    loop = next(i for i, t in enumerate(lines) if "PHASECHK" in t)  # a slot's first wait
    done = next(i for i, t in enumerate(lines) if "CCTL.IV" in t)  # barriers invalidated
    assert sum("UTMALDG" in t for t in lines[:wait]) == 2 * 3  # (STAGES 3)
    assert not any(re.search(r"\bLDG", t) for t in lines[:wait])
    assert any("PREEXIT" in t for t in lines[wait:loop])
    assert sum("UTMALDG" in t for t in lines[wait:loop]) == 2  # x's tiles
    assert sum("UTMALDG" in t for t in lines[loop:done]) == 4  # words, x, scales, offsets


def k_loop(sass: str) -> list[str]:
    """The K loop's instructions: from the last backward branch's target before the
    final wgmma wait to that branch."""
    lines = [(int(m[1], 16), m[2]) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    end = next(a for a, t in lines if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in t)
    back = [(a, int(m[1], 16)) for a, t in lines
            if a < end and (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)) and int(m[1], 16) < a]
    return [t for a, t in lines if back[-1][1] <= a <= back[-1][0]]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the wgmma kernel needs a Hopper GPU")
@pytest.mark.parametrize("M", [1, 5, 16, 33, 64, 100, 200])
@pytest.mark.parametrize("N,K,G", [(6144, 4096, 128), (4096, 14336, 128), (1000, 1024, 32),
                                   (256, 512, 64)])
@pytest.mark.parametrize("offsets,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("fast", [True, False])
def test_gpu_matches_the_reference(M, N, K, G, offsets, bias, fast, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(M * 7 + N)
    q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8, generator=gen)
    weight = pack_int4(q)
    scale = torch.rand(N, K // G, device="cuda", generator=gen) * 0.02
    offset = -8 * scale if offsets else None
    b = torch.randn(N, device="cuda", generator=gen) if bias else None
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = dequantize_int_weight(weight, scale, offset).to(torch.bfloat16).float()
    want = x.float() @ w.T + (b if bias else 0)
    for split, block_n, block_m, pdl in ((1, 128, 0, False), (4, 128, 0, True),
                                         (2, 64, 0, False), (2, 64, 128, True),
                                         (1, 64, 128, False)):
        cfg = int_wgmma.WgmmaConfig(block_n=block_n, split_k=split, fast=fast, block_m=block_m)
        monkeypatch.setattr(int_wgmma, "PDL", pdl)  # (its launch with PDL too)
        got = int_wgmma.w4_wgmma(x, weight, scale, offset, b, cfg).float()
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-2, (split, block_m, pdl, err)
    monkeypatch.setattr(int_wgmma, "PDL", False)  # the rule's launch (wgmma_config)
    got = int_wgmma.w4_wgmma(x, weight, scale, offset, b).float()
    assert (got - want).abs().max() / want.abs().max() < 1e-2
