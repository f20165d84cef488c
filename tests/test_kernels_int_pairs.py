"""The one-row int4 GEMV with its products in bfloat16 pairs (kiln.kernels.int_gemv_pairs,
IntGemmConfig.pairs): against a torch emulation of the same roundings (word by word: each
pair's products and running sums rounded to bfloat16, the word's sum in float32), and
against the float32 product within the rounding bound of that arithmetic. CPU: the
kernel's interpreter path (the same arithmetic in integer and float32 operations); GPU:
the inline PTX (fma.rn.bf16x2), which must give the emulation's result up to the order of
the float32 sums. The PTX text itself also runs on the CPU, instruction by instruction
(tests/ptx_sim.py), bit for bit against the arithmetic it implements (and the magic tiles'
nibble unpacking, kiln.kernels.int_unpack, the same way)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)
from tests.test_kernels_int import _weight, check_pdl_behind_norm, needs_gpu

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")

U = 2.0 ** -9  # bfloat16's unit roundoff


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def emulate(x: torch.Tensor, weight, scale, offset, bias
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the pairs arithmetic's result, the exact product, a bound on their distance;
    float64): per word of eight values, lanes even and odd k, r = q - 8 (q without
    offsets), a = round(r x + a) four times a lane, plus (o + 8 s) times the word's sum of
    x in pairs (round(round(x0 + x1) + round(x2 + x3)) a lane)."""
    from kiln.kernels import reference as ref

    N, K = weight.shape[0], weight.shape[1] * 2
    G = K // scale.shape[1]
    q = ref.unpack_int4(weight).float() - (8.0 if offset is not None else 0.0)
    xv = x.float().view(K // 8, 4, 2)
    r = q.view(N, K // 8, 4, 2)
    a = torch.zeros(N, K // 8, 2)
    for j in range(4):
        a = _bf16(r[:, :, j] * xv[:, j] + a)
    s = scale.float().repeat_interleave(G // 8, dim=1)
    y = (a.sum(-1).double() * s).sum(1)
    # each step's rounding is at most U of its result, which is at most the sum of the
    # magnitudes so far: four steps, 4 U of the word's sum of |r x|
    bound = 4 * U * ((r.abs() * xv.abs()).sum((2, 3)).double() * s).sum(1)
    if offset is not None:
        xs = _bf16(_bf16(xv[:, 0] + xv[:, 1]) + _bf16(xv[:, 2] + xv[:, 3])).sum(-1)
        o = (offset.float() + 8 * scale.float()).repeat_interleave(G // 8, dim=1).double()
        y = y + (o * xs.double()).sum(1)
        bound = bound + 3 * U * (o.abs() * xv.abs().sum((1, 2)).double()).sum(1)
    if bias is not None:
        y = y + bias.double()
    w = ref.dequantize_int_weight(weight, scale, offset).double()
    exact = w @ x.double().view(K) + (bias.double() if bias is not None else 0)
    mags = w.abs() @ x.double().abs().view(K)
    return y, exact, bound + 1e-6 * mags


def check_pairs(N: int, K: int, group: int, split: int, with_offset: bool, with_bias: bool,
                fixup: bool, device: str = "cpu", block_n: int = 16, block_k: int = 64,
                pipeline: bool = False, rows: int = 1, warps: int = 4) -> None:
    """rows > 1: _gemv_pairs_rows_kernel (K splits by atomics; fixup and pipeline are one
    row's only), every row checked."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(N, K, 4, group, device)
    if not with_offset:
        offset = None
    torch.manual_seed(K + split)
    x = torch.randn(rows, K, device=device).to(torch.bfloat16)
    x[0, 5] = 30.0  # an outlier
    bias = torch.randn(N, device=device).to(torch.bfloat16) if with_bias else None
    cfg = int_gemm.IntGemmConfig(0, block_n, block_k, warps, 3, split_k=split,
                                 factored=True, xvec=True, fixup=fixup, pipeline=pipeline,
                                 pairs=True)
    y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
    assert y.shape == (rows, N) and y.dtype == torch.bfloat16
    for r in range(rows):
        _check_row(y[r].cpu(), x[r:r + 1].cpu(), weight, scale, offset, bias,
                   f"N{N} K{K} g{group} split{split} offset{with_offset} bias{with_bias} "
                   f"row {r} of {rows}")


def _check_row(y: torch.Tensor, x: torch.Tensor, weight, scale, offset, bias, name: str
               ) -> None:
    cpu = [t.cpu() if t is not None else None for t in (x, weight, scale, offset, bias)]
    want, exact, bound = emulate(*cpu)
    got = y.double().view(-1)
    # the bfloat16 output's rounding: a whole ulp (the interpreter truncates)
    out_ulp = want.abs() * 2.0 ** -7
    # the same arithmetic as the emulation (up to the order of float32 sums)
    assert ((got - want).abs() <= out_ulp + 1e-5 * bound / U).all(), name
    # and within its rounding bound of the exact product
    assert ((got - exact).abs() <= bound + out_ulp).all(), name


@pytest.mark.parametrize("group,K", [(32, 96), (128, 384), (64, 256)])
def test_pairs_gemv(interp, group, K) -> None:  # noqa: F811
    """N 40 (masked rows); K ending inside a step (96: steps of 64) or whole; groups
    smaller and larger than the step; one split, three (atomics) and three summed by the
    last (fixup); with and without offsets and bias."""
    for split, fixup in ((1, False), (3, False), (3, True)):
        interp(check_pairs, 40, K, group, split, split == 1 or fixup, split == 1, fixup)


def check_preload() -> None:
    """KILN_INT_PRELOAD (the default: the first K step's words, scales and offsets loaded
    before the PDL wait): the bits of the plain K loop, with K ending inside a step, in
    splits summed in the kernel and in a loop pipelined by Triton (the GLU epilogue's:
    test_int4_glu)."""
    from kiln.kernels import int_gemm, pdl

    for N, K, group, split, block_n, block_k, fixup, stages in (
            (40, 96, 32, 1, 16, 64, False, 1), (72, 1536, 128, 3, 64, 256, True, 3),
            (64, 384, 128, 2, 32, 128, True, 1)):
        weight, scale, offset = _weight(N, K, 4, group, "cpu")
        torch.manual_seed(K)
        x = torch.randn(1, K).to(torch.bfloat16)
        cfg = int_gemm.IntGemmConfig(0, block_n, block_k, 4, 3, split_k=split, factored=True,
                                     xvec=True, fixup=fixup, pipeline=stages > 1, pairs=True)
        got = {}
        for on in (False, True):
            pdl.INT_PRELOAD = on
            try:
                got[on] = int_gemm.int_weight_linear(x, weight, scale, offset, config=cfg)
            finally:
                pdl.INT_PRELOAD = True
        assert torch.equal(got[True], got[False]), (N, K, split)


def test_pairs_gemv_preload_keeps_the_bits(interp) -> None:  # noqa: F811
    interp(check_preload)


def test_pairs_gemv_row_tiles(interp) -> None:  # noqa: F811
    """KILN_INT_ROW_TILES's launches at small shapes: K steps of 512 (four groups of 128
    a step) in one split on 2 warps; 64 x 256 in splits summed in the kernel with the K
    loop pipelined."""
    interp(check_pairs, 40, 1024, 128, 1, True, False, False, "cpu", 16, 512, warps=2)
    interp(check_pairs, 72, 1536, 128, 3, True, True, True, "cpu", 64, 256, pipeline=True)


def check_default_rows(N: int = 64, K: int = 256, device: str = "cpu") -> None:
    """kiln's own launch (no config) at 2 and 4 rows of bfloat16 x, int4: the pairs GEMV,
    the same result as asking for that launch (bit for bit on the CPU; on a GPU the K
    splits add by float32 atomics, in any order), within the pairs arithmetic's bound;
    rows whose stride is odd (not readable as pairs): the tiles' launch, the same way (and
    on a GPU the dequantized product: the interpreter's bfloat16 tl.dot is wrong, so tiles
    of bfloat16 are checked on GPUs only)."""
    from kiln.kernels import int_gemm
    from kiln.kernels import reference as ref

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if device == "cpu":
            return torch.equal(a, b)
        return bool(((a.float() - b.float()).abs() <= b.float().abs() * 2.0 ** -7 + 1e-3).all())

    weight, scale, offset = _weight(N, K, 4, 128, device)
    w = ref.dequantize_int_weight(weight, scale, offset)
    for rows in (2, 4):
        x = torch.randn(rows, K, device=device).to(torch.bfloat16)
        cfg = int_gemm.int_gemm_config(rows, N, K, x.device, 4, 128, x.dtype)
        assert cfg.pairs and cfg.block_m == 0, cfg
        y = int_gemm.int_weight_linear(x, weight, scale, offset)
        assert same(y, int_gemm.int_weight_linear(x, weight, scale, offset, config=cfg))
        for r in range(rows):
            _check_row(y[r].cpu(), x[r:r + 1].cpu(), weight, scale, offset, None, f"row {r}")
        odd = torch.randn(rows, K + 1, device=device).to(torch.bfloat16)[:, :K]
        tiles = int_gemm.int_gemm_config(rows, N, K, x.device, 4, 128, x.dtype, False)
        assert not tiles.pairs and tiles.block_m, tiles
        y = int_gemm.int_weight_linear(odd, weight, scale, offset)
        assert same(y, int_gemm.int_weight_linear(odd, weight, scale, offset, config=tiles))
        if device != "cpu":
            exact = odd.float() @ w.float().T
            assert (y.float() - exact).abs().max() <= 1e-2 * exact.abs().max(), rows


def test_pairs_default_rows(interp) -> None:  # noqa: F811
    interp(check_default_rows)


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_pairs_gemv_rows(interp, rows) -> None:  # noqa: F811
    """2-4 rows (3: a padded fourth): each row as one row's arithmetic, split by atomics
    or not, K ending inside a step or not, with and without offsets and bias."""
    for group, K in ((32, 96), (128, 384)):
        for split in (1, 3):
            interp(check_pairs, 40, K, group, split, split == 1, split == 3, False,
                   rows=rows)


def test_pairs_only_where_eligible(monkeypatch) -> None:
    """The default 1-4-row launches for int4 ask for pairs (KILN_INT_PAIRS=0: not; 3-4
    rows only where N <= 8192), for int8 not, nor for 5+ rows; float16 / float32 x, rows
    not aligned to pairs, or groups smaller than a word take the float kernels even when
    asked."""
    from kiln.kernels import int_gemm
    from kiln.kernels.int_gemv_pairs import pairs_eligible

    cpu = torch.device("cpu")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4, 128).pairs
    assert not int_gemm.int_gemm_config(1, 4096, 4096, cpu, 8, 4096).pairs
    assert int_gemm.int_gemm_config(2, 28672, 4096, cpu, 4, 128).pairs
    assert int_gemm.int_gemm_config(4, 4096, 4096, cpu, 4, 128).pairs
    assert not int_gemm.int_gemm_config(4, 28672, 4096, cpu, 4, 128).pairs
    assert not int_gemm.int_gemm_config(5, 4096, 4096, cpu, 4, 128).pairs
    assert not int_gemm.int_gemm_config(2, 4096, 4096, cpu, 4, 128, torch.float16).pairs
    monkeypatch.setenv("KILN_INT_PAIRS", "0")
    assert not int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4, 128).pairs
    assert not int_gemm.int_gemm_config(2, 4096, 4096, cpu, 4, 128).pairs

    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert pairs_eligible(x, 4, 128, 128) and pairs_eligible(x, 4, 32, 128)
    assert not pairs_eligible(x.half(), 4, 128, 128)
    assert not pairs_eligible(x, 8, 128, 128)
    assert pairs_eligible(torch.zeros(4, 256, dtype=torch.bfloat16), 4, 128, 128)
    assert not pairs_eligible(torch.zeros(5, 256, dtype=torch.bfloat16), 4, 128, 128)
    odd_rows = torch.zeros(2, 257, dtype=torch.bfloat16)[:, :256]  # rows not pair-aligned
    assert not pairs_eligible(odd_rows, 4, 128, 128)
    assert not pairs_eligible(torch.zeros(1, 258, dtype=torch.bfloat16)[:, 1:257], 4, 128, 128)
    assert not pairs_eligible(x, 4, 4, 128)  # groups smaller than a word


# ---- the PTX text itself, run by tests/ptx_sim.py ---------------------------------------
def _exact_word(word: int, xs: list[int], base: int) -> int:
    """A word's dot product as the PTX must compute it (float32 bits): per half, a running
    bfloat16 sum from -0 of (q - base) x, each step exact then rounded once; halves added
    in float32."""
    import numpy as np

    from tests import ptx_sim

    total = []
    for half in (0, 1):
        acc = 0x8000
        for j in range(4):
            q = ((word >> (8 * j + 4 * half)) & 0xF) - base
            x = ptx_sim._bf16_value(xs[j] >> (16 * half))
            acc = ptx_sim._bf16_round(q * x + ptx_sim._bf16_value(acc))
        total.append(ptx_sim._f32(acc << 16))
    return ptx_sim._bits(np.float32(total[0]) + np.float32(total[1]))


def test_pairs_ptx_text() -> None:
    """The inline PTX strings (one row; unpack then dot for several rows; x's sum) run
    instruction by instruction on the CPU give, bit for bit, the arithmetic the module
    describes: q - 8 (q without offsets) times x's pairs in value order, bfloat16
    roundings, float32 halves."""
    from kiln.kernels import int_pairs_asm as A
    from tests import ptx_sim

    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64).tolist()
    words += [0, 0xFFFFFFFF, 0x88888888, 0x01234567]
    for i, word in enumerate(words):
        scale = (1.0, 1e-3, 300.0)[i % 3]
        x = (torch.randn(8, generator=g) * scale).to(torch.bfloat16)
        if i % 7 == 0:
            x[i % 8] = 0.0
        bits = x.view(torch.int16).to(torch.int64) & 0xFFFF
        xs = [int(bits[2 * j]) | int(bits[2 * j + 1]) << 16 for j in range(4)]
        for signed, one_row, unpack in ((True, A._PAIRS_SIGNED, A._UNPACK_SIGNED),
                                        (False, A._PAIRS_UNSIGNED, A._UNPACK_UNSIGNED)):
            want = _exact_word(word, xs, 8 if signed else 0)
            assert ptx_sim.run(one_row.value, [word, *xs], 1) == [want], (hex(word), signed)
            q = ptx_sim.run(unpack.value, [word], 4)
            assert ptx_sim.run(A._DOT_Q.value, [*q, *xs], 1) == [want], (hex(word), signed)
        lo = [ptx_sim._bf16_value(v) for v in xs]
        hi = [ptx_sim._bf16_value(v >> 16) for v in xs]
        sums = [ptx_sim._bf16_round(ptx_sim._bf16_value(ptx_sim._bf16_round(h[0] + h[1])) +
                                    ptx_sim._bf16_value(ptx_sim._bf16_round(h[2] + h[3])))
                for h in (lo, hi)]
        want = ptx_sim._bits(ptx_sim._f32(sums[0] << 16) + ptx_sim._f32(sums[1] << 16))
        assert ptx_sim.run(A._SUM_ASM.value, xs, 1) == [want]


def test_magic_nibbles_ptx_text() -> None:
    """The magic tiles' unpacking (kiln.kernels.int_unpack, the default for int4 decode
    batches): four bytes (one packed register, byte i element i) -> the low nibbles of
    bytes 0, 1 / 2, 3 and the high nibbles of bytes 0, 1 / 2, 3 as 16-bit pairs BASE + q
    (bfloat16 2^7, float16 2^10), in element order."""
    import struct

    from kiln.kernels import int_unpack
    from tests import ptx_sim

    g = torch.Generator().manual_seed(1)
    for word in torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist():
        b = word.to_bytes(4, "little")
        for asm, to_bits in ((int_unpack._MAGIC_BF16, lambda v: struct.unpack(
                "<I", struct.pack("<f", 128.0 + v))[0] >> 16),
                (int_unpack._MAGIC_FP16, lambda v: int(torch.tensor(1024.0 + v).half().view(
                    torch.int16)) & 0xFFFF)):
            want = [to_bits(b[i] & 0xF) | to_bits(b[i + 1] & 0xF) << 16 for i in (0, 2)] + \
                [to_bits(b[i] >> 4) | to_bits(b[i + 1] >> 4) << 16 for i in (0, 2)]
            assert ptx_sim.run(asm.value, [word], 4) == want, hex(word)


# ---- GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (40, 384)])
def test_gpu_pairs_gemv(N, K) -> None:
    """The inline PTX at the 8B's shapes in kiln's launch and others: the emulation's
    result, within the bound."""
    for bn, bk, split, fixup in ((64, 128, 8, True), (64, 128, 8, False), (32, 256, 4, True),
                                 (128, 128, 1, False), (64, 128, 16, True)):
        check_pairs(N, K, 128, split, True, split == 1, fixup, "cuda", bn, bk)
    check_pairs(N, K, 128, 8, False, True, True, "cuda", 64, 128)
    check_pairs(N, K, 128, 4, True, False, False, "cuda", 32, 256, pipeline=True)
    check_pairs(N, K, 128, 1, True, True, False, "cuda", 32, 256)  # one split: no atomics
    # KILN_INT_ROW_TILES's launches (31st session's sweep)
    check_pairs(N, K, 128, 1, True, False, False, "cuda", 16, 512, warps=2)
    check_pairs(N, K, 128, 8, True, False, True, "cuda", 64, 256, pipeline=True)
    for rows in (2, 3, 4):  # the rows kernel (KILN_INT_GEMVN's pairs)
        check_pairs(N, K, 128, 8, True, rows == 3, False, "cuda", 64, 128, rows=rows)
        check_pairs(N, K, 128, 1, True, True, False, "cuda", 32, 256, rows=rows)
    check_pairs(N, K, 32, 4, True, False, True, "cuda", 64, 128)
    check_default_rows(N, K, "cuda")  # kiln's 2-4-row launch; odd row strides: tiles


def test_pairs_gemv_compiles_for_hopper() -> None:
    """The inline PTX assembles for sm_90 in kiln's launches (and with the K
    loop pipelined through cp.async), without spills; the products are packed bfloat16
    FMAs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels.compile_check import _compile, compile_sm90
    from kiln.kernels.int_gemv_pairs import _gemv1_pairs_kernel

    K = 4096
    values = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
              "count_ptr": "*i32", "N": 4096, "K": K, "W_PER_SPLIT": K // 8 // 4,
              "stride_wn": K // 8, "stride_sn": K // 128}
    for bn, bk, warps in ((32, 256, 4), (64, 128, 4), (16, 512, 2), (64, 256, 4)):
        for stages in (1, 3):
            meta = dict(G=128, BLOCK_N=bn, BLOCK_K=bk, HAS_OFFSET=True, HAS_BIAS=False,
                        GROUPS=max(1, bk // 128), ATOMIC=False, EVEN_K=True, SPLIT_K=4,
                        INTERPRET=False, LOOP_STAGES=stages)
            r = compile_sm90(_gemv1_pairs_kernel, values, meta, warps, 3)
            assert r.stack_bytes == 0, (bn, bk, stages, r)
            assert (r.instructions["cp.async"] > 0) == (stages > 1), r
    meta = dict(meta, BLOCK_N=64, BLOCK_K=128, GROUPS=1, LOOP_STAGES=1)
    ptx = _compile(_gemv1_pairs_kernel, values, meta, 4, 3).asm["ptx"]
    assert ptx.count("fma.rn.bf16x2") >= 8 * 8 and "cvt.f32.bf16" not in ptx
    # launched with PDL (KILN_INT_PDL): it waits for the kernel before, then lets the next go
    # (KILN_INT_PRELOAD: the first step's loads before the wait)
    for preload in (False, True):
        r = compile_sm90(_gemv1_pairs_kernel, values, dict(meta, PDL=True, PRELOAD=preload),
                         4, 3)
        assert r.stack_bytes == 0 and r.instructions["griddepcontrol"] == 2, r


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("preload", [False, True])
def test_gpu_pairs_gemv_pdl_waits_for_its_input(preload) -> None:
    """KILN_INT_PDL: the one-row INT4 GEMV launched with PDL behind the RMSNorm that writes
    its input (which lets it start at once), in a CUDA graph replayed on new inputs: each
    replay's result is the plain launch's, bit for bit, at the 8B's QKV (4 K splits summed
    in the kernel) and down (16 splits) shapes; also with its first weights loaded before
    the wait (KILN_INT_PRELOAD)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel on the host")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90")
    for N, K in ((6144, 4096), (4096, 14336)):
        weight, scale, offset = _weight(N, K, 4, 128, "cuda")
        check_pdl_behind_norm(weight, scale, offset, {"INT_GEMV": True, "INT_PRELOAD": preload},
                              {"INT_GEMV": False, "INT_PRELOAD": False}, f"{N}x{K}")
