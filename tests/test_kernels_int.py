"""W4A16 / W8A16 kernels (kiln/kernels/int_gemm.py) vs the torch reference.

CPU: through Triton's interpreter, in the spawned worker of tests/test_kernels.py, at odd
shapes (N and K not multiples of the tiles, K = 3 groups), group sizes 32/64/128 and per
channel, M = 1, 7, 64 (the GEMV, split-K with atomics and without, and tl.dot tiles with
one scale per tile and with gathered scales). float16 and float32 only: the
interpreter's tl.dot cannot take bf16, and it truncates float -> bf16 where torch rounds.
GPU (pytest -m gpu): Llama-3.1-8B shapes (K 4096, N 4096 / 14336; K 14336), bf16 and fp16.

Tolerance, against y32 = x @ w_x^T in float32 (w_x: the dequantized weight rounded to
x's dtype, which the tiles compute with; the one-row GEMV keeps it in float32): the sums
differ in order only, so |y - y32| <= 2e-5 * S + 1 ulp of the output dtype
+ |x| @ |w32 - w_x|^T, S = |x| @ |w_x|^T.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401  (module-scoped interpreter worker)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")

SUM_TOL = 2e-5


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exp = torch.frexp(v.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.ones_like(v), exp - 1 - mant)


def _weight(N: int, K: int, bits: int, group: int, device: str = "cpu", seed: int = 0):
    """Random storage: (weight, scale, offset or None) with group scales of varied size."""
    g = torch.Generator().manual_seed(seed)
    groups = K // (group or K)
    scale = (torch.rand(N, groups, generator=g) * 0.02 + 1e-3)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
        from kiln.kernels.reference import pack_int4

        weight = pack_int4(q)
        offset = -8 * scale + torch.randn(N, groups, generator=g) * 1e-3
    else:
        weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        offset = None
    return weight.to(device), scale.to(device), None if offset is None else offset.to(device)


def check_pdl_behind_norm(weight, scale, offset, on: dict, off: dict, name: str = "") -> None:
    """The one-row integer GEMV behind the RMSNorm that writes its input (which lets it
    start at once), captured in a CUDA graph with kiln.kernels.pdl's attributes as in on,
    replayed on new inputs: each replay gives the bits of the launch with them as in off."""
    from kiln.kernels import int_gemm, pdl, rms_norm

    K = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    x = torch.empty(1, K, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(K, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        return int_gemm.int_weight_linear(rms_norm.rms_norm(x, nw, 1e-5), weight, scale,
                                          offset)

    saved = {k: getattr(pdl, k) for k in {**on, **off}}
    try:
        for k, v in on.items():
            setattr(pdl, k, v)
        x.copy_(torch.randn(1, K, device="cuda"))
        step()  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step()
        for k, v in off.items():
            setattr(pdl, k, v)
        for _ in range(3):
            x.copy_(torch.randn(1, K, device="cuda"))
            graph.replay()
            assert torch.equal(got, step()), name
    finally:
        for k, v in saved.items():
            setattr(pdl, k, v)


def _check(name: str, x: torch.Tensor, y: torch.Tensor, weight, scale, offset,
           bias: torch.Tensor | None) -> None:
    from kiln.kernels import reference as ref

    w32 = ref.dequantize_int_weight(weight, scale, offset).float()
    w_x = w32.to(x.dtype).float()
    y32 = x.float() @ w_x.T
    if bias is not None:
        y32 = y32 + bias.float()
    # bf16 products on tensor cores: the MMA's adder tree aligns and truncates (measured
    # on an H200 at K = 4096: up to 1.6x of SUM_TOL, fp16 within it), so 4x there.
    tol = SUM_TOL * (4 if x.is_cuda and x.dtype == torch.bfloat16 else 1)
    # + what multiplying the float32 weight (the one-row GEMV) instead of w_x changes
    bound = tol * (x.float().abs() @ w_x.abs().T) + _ulp(y32, y.dtype) + \
        x.float().abs() @ (w32 - w_x).abs().T
    err = (y.float() - y32).abs()
    assert y.shape == y32.shape and y.dtype == x.dtype, name
    assert (err <= bound).all(), f"{name}: worst {(err / bound).max().item():.2f}x the bound"
    # the reference (the CPU path) computes the same product
    want = ref.int_weight_linear(x, weight, scale, offset, bias)
    assert (want.float() - y32).abs().le(bound).all(), name


# ---- checks (run in the interpreter worker) -----------------------------------------
def check_linear(dtype: torch.dtype, M: int, N: int, K: int, bits: int, group: int,
                 with_bias: bool, config: tuple | None) -> None:
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(N, K, bits, group)
    torch.manual_seed(M)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    cfg = int_gemm.IntGemmConfig(*config) if config else None
    y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
    _check(f"{dtype} {M}x{N}x{K} int{bits} g{group} {config}", x, y, weight, scale, offset,
           bias)


def check_functional_dispatch() -> None:
    from kiln import functional as KF

    weight, scale, offset = _weight(24, 64, 4, 32)
    x = torch.randn(2, 3, 64)
    KF._triton = lambda t: True  # CPU tensors, kernels interpreted (this worker only)
    y = KF.int_weight_linear(x, weight, scale, offset)
    assert y.shape == (2, 3, 24)
    _check("functional", x.view(6, 64), y.view(6, 24), weight, scale, offset, None)



# IntGemmConfig fields (block_m, block_n, block_k, warps, stages, split_k, group_m,
# prefetch, nibble_dots, factored, xvec, words, fixup, digits, swap, pipeline, magic,
# sum_dot): GEMV without and with
# split-K
# (atomics, or for one row the partials summed by the last split: fixup; the splits end
# inside K), each also with the next K step's loads issued first (prefetch)
# and with the scales applied once a word (factored, x as one vector a word: xvec; both
# for one row only), tl.dot tiles whose K step spans several groups (a scale tile; groups
# that do not divide the step gather every scale: test_gathered_scales) or lies in one,
# and int4 tiles multiplied as even-k and odd-k halves (nibble_dots; int8 and several
# groups a step ignore it), or read from 32-bit words in place (words; likewise), or
# with the scales applied to each K step's product (factored; likewise);
# each tl.dot tile also computed transposed, the weight the left operand (swap); the
# one-row GEMV's K loop software-pipelined (pipeline); int4 tiles unpacked by bit
# operations into 16-bit floats 2^7 + q (bf16) or 2^10 + q (fp16) (magic; float32 x and
# int8 ignore it); the factored tiles' sums of x as a tl.dot with ones (sum_dot).
CONFIGS = {"auto": None, "gemv-split3": (0, 16, 32, 4, 1, 3), "gemv-1": (0, 32, 64, 4, 1, 1),
           "gemv-split3-pf": (0, 16, 32, 4, 1, 3, 8, True),
           "gemv-1-pf": (0, 32, 64, 4, 1, 1, 8, True),
           "gemv-split3-fac": (0, 16, 32, 4, 1, 3, 8, False, False, True),
           "gemv-split3-fac-xvec": (0, 16, 32, 4, 1, 3, 8, False, False, True, True),
           "gemv-1-fac-xvec-pf": (0, 32, 64, 4, 1, 1, 8, True, False, True, True),
           "gemv-split3-fixup": (0, 16, 32, 4, 1, 3, 8, False, False, False, False, False,
                                 True),
           "gemv-split3-fac-xvec-fixup": (0, 16, 32, 4, 1, 3, 8, False, False, True, True,
                                          False, True),
           "gemv-split3-fac-xvec-fixup-pipe": (0, 16, 32, 4, 3, 3, 8, False, False, True, True,
                                               False, True, False, False, True),
           "gemv-split3-fac-xvec-pf-fixup": (0, 16, 32, 4, 1, 3, 8, True, False, True, True,
                                             False, True),
           "dot-gather": (16, 16, 64, 4, 1), "dot-tile": (32, 32, 32, 4, 1),
           "dot-nibbles": (16, 16, 32, 4, 1, 1, 8, False, True),
           "dot-nibbles-64": (32, 16, 64, 4, 1, 1, 8, False, True),
           "dot-words": (16, 16, 32, 4, 1, 1, 8, False, False, False, False, True),
           "dot-words-64": (32, 32, 64, 4, 1, 1, 8, False, False, False, False, True),
           "dot-factored": (16, 16, 32, 4, 1, 1, 8, False, False, True),
           "dot-factored-64": (32, 32, 64, 4, 1, 1, 8, False, False, True),
           "dot-swap": (16, 16, 32, 4, 1, 1, 8, *[False] * 7, True),
           "dot-swap-gather": (16, 16, 64, 4, 1, 1, 8, *[False] * 7, True),
           "dot-swap-64": (32, 64, 64, 4, 1, 1, 8, *[False] * 7, True),
           "dot-swap-factored": (16, 16, 32, 4, 1, 1, 8, False, False, True, *[False] * 4,
                                 True),
           "dot-swap-words": (32, 32, 64, 4, 1, 1, 8, *[False] * 4, True, False, False, True),
           "dot-magic": (16, 16, 32, 4, 1, 1, 8, *[False] * 9, True),
           "dot-magic-gather": (16, 16, 64, 4, 1, 1, 8, *[False] * 9, True),
           "dot-swap-magic": (32, 64, 64, 4, 1, 1, 8, *[False] * 7, True, False, True),
           "dot-magic-sumdot": (16, 16, 32, 4, 1, 1, 8, *[False] * 9, True, True),
           "dot-swap-magic-sumdot": (32, 64, 64, 4, 1, 1, 8, *[False] * 7, True, False, True,
                                     True),
           "dot-factored-sumdot": (16, 16, 32, 4, 1, 1, 8, False, False, True, *[False] * 7,
                                   True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 7, 64, 260])  # 260: dequantized, then a 16-bit GEMM
@pytest.mark.parametrize("bits,group,K", [(4, 32, 96), (4, 64, 192), (4, 128, 384),
                                          (8, 0, 99), (8, 32, 160)])
def test_int_linear_auto(interp, dtype, M, bits, group, K) -> None:  # noqa: F811
    interp(check_linear, dtype, M, 40, K, bits, group, M == 7, None)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "auto"])
@pytest.mark.parametrize("M", [1, 7, 20])
def test_int_linear_configs(interp, config, M) -> None:  # noqa: F811
    for bits, group, K in ((4, 32, 160), (8, 64, 192)):
        interp(check_linear, torch.float16, M, 40, K, bits, group, True, CONFIGS[config])


@pytest.mark.parametrize("xvec,fixup", [(False, False), (True, False), (True, True)])
def test_factored_gemv_odd_shapes(interp, xvec, fixup) -> None:  # noqa: F811
    """The factored one-row GEMV where K ends inside a K step (masked loads), per channel
    and in groups, with and without K split (atomics, or summed by the last split),
    float16 and float32."""
    for bits, group, K in ((4, 32, 96), (4, 128, 384), (8, 0, 100), (8, 32, 160)):
        for split in (1, 3):
            for dtype in (torch.float16, torch.float32):
                interp(check_linear, dtype, 1, 40, K, bits, group, True,
                       (0, 16, 64, 4, 1, split, 8, False, False, True, xvec, False, fixup))


@pytest.mark.parametrize("M", [2, 3, 4])
def test_factored_gemv_rows(interp, M) -> None:  # noqa: F811
    """The factored GEMV for a few rows (kiln.kernels.int_gemv_rows): each word used for
    every row; K ending inside a step, per channel and in groups, split or not, with and
    without bias, float16 and float32."""
    for bits, group, K in ((4, 32, 96), (4, 128, 384), (8, 0, 100), (8, 32, 160)):
        for split in (1, 3):
            for dtype in (torch.float16, torch.float32):
                interp(check_linear, dtype, M, 40, K, bits, group, split == 1,
                       (0, 16, 64, 4, 1, split, 8, False, False, True))


def check_digits(dtype: torch.dtype, bits: int, group: int, K: int, N: int) -> None:
    """The dp4a GEMV on x's digit planes: the path int_weight_linear takes for a digits
    config (the same bits as digits_gemv called directly), within the float bounds, K
    split into 1 and 3 parts (the last one short of a whole step; its loop
    software-pipelined), with and without bias and offsets; an x of zeros (scale 1) gives
    the bias."""
    from kiln.kernels import int_gemm, int_gemv_digits

    weight, scale, offset = _weight(N, K, bits, group)
    if bits == 8 and group:
        offset = torch.randn_like(scale) * 0.01
    for split in (1, 3):
        torch.manual_seed(split)
        x = torch.randn(1, K).to(dtype)
        x[0, 3] = 40.0  # an outlier: the other values keep 24 bits below it
        bias = torch.randn(N).to(dtype) if split == 1 else None
        cfg = int_gemm.IntGemmConfig(0, 16, 64, 4, 3, split_k=split, digits=True,
                                     pipeline=split == 3)
        y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
        direct = int_gemv_digits.digits_gemv(x, weight, scale, offset, bias, 16, 64 // (
            128 // bits), split, 4, 3, 3 if split == 3 else 1)
        assert torch.equal(y, direct)
        _check(f"digits {dtype} int{bits} g{group} K{K} split{split}", x, y, weight, scale,
               offset, bias)
    zeros = torch.zeros(1, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = int_gemv_digits.digits_gemv(zeros, weight, scale, offset, bias, 16, 2, 2, 4, 1)
    assert torch.equal(y, bias.view(1, N)), y


@pytest.mark.parametrize("bits,group,K", [(4, 32, 96), (4, 128, 384), (8, 0, 160),
                                          (8, 32, 192)])
def test_digits_gemv(interp, bits, group, K) -> None:  # noqa: F811
    """N 40: masked rows and steps; N 48 at K 384 / 192: whole ones (EVEN, no masks).
    Every dtype but at the longest K (46 s for three), bfloat16 alone."""
    dtypes = (torch.bfloat16,) if K == 384 else (torch.float16, torch.bfloat16, torch.float32)
    for dtype in dtypes:
        interp(check_digits, dtype, bits, group, K, 48 if K in (384, 192) else 40)


def check_digits_tiles(bits: int, group: int, K: int, M: int) -> None:
    """int8 tl.dot tiles on x's digit planes (kiln.kernels.int_gemm_digits): int4 in
    groups, int8 per channel (int32 sums over the whole split: ONE_GROUP) and grouped with
    offsets; K in 1 and 2 splits, masked rows and columns, an outlier in x."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(40, K, bits, group)
    if bits == 8 and group:
        offset = torch.randn_like(scale) * 0.01
    for dtype in (torch.float16, torch.float32):
        for split in (1, 2):
            torch.manual_seed(M + split)
            x = torch.randn(M, K).to(dtype)
            x[0, 5] = 30.0
            bias = torch.randn(40).to(dtype) if split == 1 else None
            cfg = int_gemm.IntGemmConfig(16, 16, 64, 4, 1, split_k=split, digits=True)
            y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
            _check(f"digit tiles {dtype} M{M} int{bits} g{group} split{split}", x, y, weight,
                   scale, offset, bias)


def check_digits_switch() -> None:
    """KILN_INT_DIGITS=1: kiln's default launches (one row, and decode-batch tiles) take
    the digit-plane kernels: the same bits as calling them with those launches."""
    from kiln.kernels import int_gemm, int_gemm_digits, int_gemv_digits

    weight, scale, offset = _weight(48, 256, 4, 64)
    os.environ["KILN_INT_DIGITS"] = "1"
    try:
        for M in (1, 5):
            x = torch.randn(M, 256).half()
            cfg = int_gemm.int_gemm_config(M, 48, 256, x.device, 4)
            assert cfg.digits, cfg
            y = int_gemm.int_weight_linear(x, weight, scale, offset)
            if M == 1:
                want = int_gemv_digits.digits_gemv(x, weight, scale, offset, None,
                                                   cfg.block_n, cfg.block_k // 32,
                                                   cfg.split_k, cfg.num_warps, cfg.num_stages)
            else:
                block_k = int_gemm.group_step(64, cfg.block_k)
                want = int_gemm_digits.digits_tiles(x, weight, scale, offset, None, cfg.block_m,
                                                    cfg.block_n, block_k, cfg.split_k,
                                                    cfg.num_warps, cfg.num_stages)
            assert torch.equal(y, want), M
            _check(f"digits switch M{M}", x, y, weight, scale, offset, None)
    finally:
        del os.environ["KILN_INT_DIGITS"]


def test_digits_switch(interp) -> None:  # noqa: F811
    interp(check_digits_switch)


@pytest.mark.parametrize("M", [5, 20])
@pytest.mark.parametrize("bits,group,K", [(4, 64, 512), (4, 128, 512), (8, 0, 256),
                                          (8, 0, 2048), (8, 64, 256)])
def test_digits_tiles(interp, bits, group, K, M) -> None:  # noqa: F811
    interp(check_digits_tiles, bits, group, K, M)


def check_digits_default_odd_k() -> None:
    """int8 per channel from 17 rows takes the digit tiles by default; where K is not a
    multiple of the launch's K step (SmolLM2's 576) the step halves until it is (64)."""
    from kiln.kernels import int_gemm, int_gemm_digits

    weight, scale, _ = _weight(40, 576, 8, 0)
    x = torch.randn(20, 576).half()
    cfg = int_gemm.int_gemm_config(20, 40, 576, x.device, 8, 576)
    assert cfg.digits and cfg.block_k == 128, cfg
    y = int_gemm.int_weight_linear(x, weight, scale)
    want = int_gemm_digits.digits_tiles(x, weight, scale, None, None, cfg.block_m,
                                        cfg.block_n, 64, cfg.split_k, cfg.num_warps,
                                        cfg.num_stages)
    assert torch.equal(y, want)
    _check("digits default K576", x, y, weight, scale, None, None)


def test_digits_default_odd_k(interp) -> None:  # noqa: F811
    interp(check_digits_default_odd_k)


def test_digits_tiles_eligibility() -> None:
    """Each int8 tl.dot of the digit tiles is >= 32 deep on a GPU (Triton's least): int4
    (half a K step a product) needs steps of 64, so int4 in groups of 32 takes the float
    tiles; a step across groups or K not whole steps likewise."""
    from kiln.kernels.int_gemm_digits import digits_tiles_eligible

    assert digits_tiles_eligible(4096, 128, 64, 4) and digits_tiles_eligible(4096, 32, 32, 8)
    assert not digits_tiles_eligible(4096, 32, 32, 4)
    assert not digits_tiles_eligible(4096, 32, 64, 8)
    assert not digits_tiles_eligible(4000, 4000, 128, 8)


@pytest.mark.parametrize("M", [5, 20, 64])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (8, 0)])
def test_int_gemm_split_k(interp, M, bits, group) -> None:  # noqa: F811
    """tl.dot tiles with K split over 2 and 4 programs (decode batches of a small N),
    finished by split_k_fixup: the last part adds the bias."""
    for split in (2, 4):
        interp(check_linear, torch.float16, M, 40, 512, bits, group, True,
               (16, 16, 32, 4, 1, split))
    interp(check_linear, torch.float16, M, 40, 512, bits, group, True,
           (16, 16, 64, 4, 1, 2, 8, False, True))  # int4: with nibble_dots
    interp(check_linear, torch.float16, M, 48, 512, bits, group, True,  # words, EVEN
           (16, 16, 64, 4, 1, 2, 8, False, False, False, False, True))
    interp(check_linear, torch.float32, M, 24, 256, bits, group, False, (16, 32, 64, 4, 1, 2))
    for dtype in (torch.float16, torch.float32):  # factored, with and without bias
        interp(check_linear, dtype, M, 40, 512, bits, group, dtype == torch.float16,
               (16, 16, 64, 4, 1, 2, 8, False, False, True))
        for factored in (False, True):  # transposed tiles (swap), float32: IEEE products
            interp(check_linear, dtype, M, 40, 512, bits, group, dtype == torch.float32,
                   (16, 16, 64, 4, 1, 2, 8, False, False, factored, *[False] * 4, True))


@contextlib.contextmanager
def _tile_launches() -> Iterator[list[dict]]:
    """The keyword arguments of each launch of int_gemm's tile kernel inside the block."""
    from kiln.kernels import int_gemm

    launched: list[dict] = []
    kernel = int_gemm._gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw)
                return kernel[grid](*args, **kw)
            return launch

    int_gemm._gemm_kernel = Spy()
    try:
        yield launched
    finally:
        int_gemm._gemm_kernel = kernel


def check_grouped_steps(bits: int, group: int, K: int, M: int, config: tuple) -> None:
    """Decode-batch tiles whose K step spans several groups (GGUF's 16 and 32): the
    launch keeps its step and the kernel takes a [BLOCK_N, groups] scale tile (GROUPS),
    with offsets for int8 too (the K-quant mixes), K not a whole number of steps."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(40, K, bits, group, seed=M)
    if offset is None:
        offset = torch.randn_like(scale) * 1e-2
    torch.manual_seed(M)
    x = torch.randn(M, K).half()
    bias = torch.randn(40).half()
    with _tile_launches() as launched:
        y = int_gemm.int_weight_linear(x, weight, scale, offset, bias,
                                       config=int_gemm.IntGemmConfig(*config))
    assert [(kw["BLOCK_K"], kw["GROUPS"]) for kw in launched] == \
        [(config[2], config[2] // group)], launched  # K > every step
    _check(f"groups {M}x40x{K} int{bits} g{group} {config}", x, y, weight, scale, offset, bias)


@pytest.mark.parametrize("M", [7, 20])
@pytest.mark.parametrize("bits,group,K", [(8, 16, 400), (8, 32, 384), (4, 32, 416),
                                          (4, 16, 272)])
def test_int_gemm_grouped_steps(interp, bits, group, K, M) -> None:  # noqa: F811
    for config in ((16, 16, 128, 4, 1), (16, 32, 256, 4, 1),  # swap, split K in two
                   (16, 64, 64, 4, 1, 1, 8, *[False] * 7, True), (32, 16, 64, 4, 1, 2)):
        if config[5:6] != (2,) or K % (2 * config[2]) == 0:
            interp(check_grouped_steps, bits, group, K, M, config)


def check_even_tiles(bits: int, group: int, M: int) -> None:
    """The float tiles without masks on the weight where N and K are whole tiles, the same
    result as with them; ragged shapes keep them. By default (int_launch.EVEN_GROUPS) only
    groups of 32 go without; KILN_INT_EVEN=1 (None): every group."""
    from kiln.kernels import int_gemm

    default = int_gemm.EVEN_GROUPS
    try:
        for groups in (None, (32,)):
            int_gemm.EVEN_GROUPS = groups
            shapes = ((64, 512, True), (40, 512, False), (64, 480, False))
            for N, K, whole in shapes if groups is None else shapes[:1]:
                even = whole and (groups is None or group in groups)
                weight, scale, offset = _weight(N, K, bits, group, seed=N + K)
                torch.manual_seed(M)
                x = torch.randn(M, K).half()
                cfg = int_gemm.IntGemmConfig(16, 32, 128, 4, 1, 2)
                with _tile_launches() as launched:
                    y = int_gemm.int_weight_linear(x, weight, scale, offset, None, config=cfg)
                assert [kw["EVEN"] for kw in launched] == [even], (groups, N, K)
                _check(f"even {M}x{N}x{K} int{bits} g{group}", x, y, weight, scale, offset,
                       None)
    finally:
        int_gemm.EVEN_GROUPS = default


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (4, 128), (8, 0)])
def test_int_gemm_even_tiles(interp, bits, group) -> None:  # noqa: F811
    interp(check_even_tiles, bits, group, 7)


def check_gathered_scales(config: tuple, M: int) -> None:
    """Groups that neither hold a K step nor divide it (48 here) keep the step and load
    every element's scale (GROUP_TILE and GROUPS off)."""
    with _tile_launches() as launched:
        check_linear(torch.float16, M, 40, 192, 8, 48, True, config)
    assert [(kw["GROUP_TILE"], kw["GROUPS"]) for kw in launched] == [(False, 1)], launched


@pytest.mark.parametrize("config", ["dot-gather", "dot-swap-gather", "dot-magic-gather"])
def test_gathered_scales(interp, config) -> None:  # noqa: F811
    for M in (7, 20):
        interp(check_gathered_scales, CONFIGS[config], M)


def check_bias_dtype() -> None:
    """A float32 bias with 16-bit x: the many-row path casts it as the tiles do."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(24, 64, 4, 32)
    torch.manual_seed(0)
    bias = torch.randn(24).half().float()  # float32 values a 16-bit bias holds exactly
    for M in (int_gemm.DEQUANT_ROWS - 1, int_gemm.DEQUANT_ROWS):
        x = torch.randn(M, 64).half()
        y = int_gemm.int_weight_linear(x, weight, scale, offset, bias)
        _check(f"bias M={M}", x, y, weight, scale, offset, bias.half())


def test_bias_dtype(interp) -> None:  # noqa: F811
    interp(check_bias_dtype)


def check_dequantize(dtype: torch.dtype, N: int, K: int, bits: int, group: int) -> None:
    from kiln.kernels import int_gemm
    from kiln.kernels import reference as ref

    weight, scale, offset = _weight(N, K, bits, group)
    got = int_gemm.dequantize_weight(weight, scale, offset, dtype)
    want = ref.dequantize_int_weight(weight, scale, offset).float().to(dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bits,group,K", [(4, 32, 96), (4, 16, 80), (4, 128, 384),
                                          (8, 0, 99), (8, 64, 192)])
def test_dequantize_weight(interp, bits, group, K) -> None:  # noqa: F811
    """The scratch weight of the many-row path: the reference's values, rounded to x's
    dtype (N past a tile, K not a multiple of the step, groups under and over a step)."""
    for dtype in (torch.float16, torch.float32):
        interp(check_dequantize, dtype, 70, K, bits, group)


def test_functional_dispatch(interp) -> None:  # noqa: F811
    interp(check_functional_dispatch)


# ---- GPU tests ------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 0), (8, 32), (8, 16)])
def test_gpu_int_linear(N, K, bits, group) -> None:
    """Every row count through int_weight_linear (int8 in groups of 32 and 16: a GGUF
    file's Q8_0 and K-quant layers kept, the latter with offsets)."""
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(N, K, bits, group, "cuda")
    if bits == 8 and group == 16:
        offset = torch.randn_like(scale) * 1e-2
    for M in (1, 2, 5, 8, 16, 33, 64, 65, 128, 200, 300):  # 65-255: Gluon, dequantized, tiles
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(M, K, device="cuda").to(dtype)
            bias = torch.randn(N, device="cuda").to(dtype) if M % 2 else None
            y = int_gemm.int_weight_linear(x, weight, scale, offset, bias)
            _check(f"{dtype} {M}x{N}x{K} int{bits} g{group}", x, y, weight, scale, offset,
                   bias)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 0)])
def test_gpu_opt_in_gemv_launches(bits, group) -> None:
    """The opt-in launches at 8B shapes: one row with 32 K splits summed in the kernel
    (fixup) or on dp4a with x as digit planes (digits), 2-4 rows factored
    (kiln.kernels.int_gemv_rows), and tl.dot tiles with the scales applied to each K step's
    product (factored), on x's digit planes (digits) or transposed (swap), int4 unpacked by
    bit operations (magic, bfloat16 x), one-row K loops software-pipelined (pipeline), in
    the tiles int_gemv_bench / int_batch_bench launch."""
    from kiln.kernels import int_gemm

    for N, K in ((6144, 4096), (4096, 14336)):
        weight, scale, offset = _weight(N, K, bits, group, "cuda")
        launches = [(1, int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=8, factored=True,
                                                xvec=True, fixup=True)),
                    (1, int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=32, factored=True,
                                                xvec=True, fixup=True))]
        launches += [(M, int_gemm.IntGemmConfig(0, *tile, split_k=split, factored=True))
                     for M in (2, 3, 4) for tile, split in (((64, 128, 8, 3), 8),
                                                            ((16, 256, 4, 3), 4))]
        launches += [(M, int_gemm.IntGemmConfig(min(64, max(16, M)), bn, 128, 4, 3,
                                                split_k=2, factored=True))
                     for M in (4, 16, 64) for bn in (32, 64)]
        launches += [(1, int_gemm.IntGemmConfig(0, bn, 128, warps, 3, split_k=8, digits=True,
                                                pipeline=pipe))
                     for bn, warps in ((64, 4), (128, 8))
                     for pipe in (False, True)]  # dp4a on x's digit planes
        launches += [(1, int_gemm.IntGemmConfig(0, bn, bk, 4, stages, split_k=8, factored=True,
                                                xvec=True, fixup=True, pipeline=True))
                     for bn, bk in ((64, 128), (32, 256)) for stages in (3, 4)]  # cp.async
        launches += [(M, int_gemm.IntGemmConfig(min(64, max(16, M)), bn, 128, 4, 3,
                                                split_k=2, digits=True))
                     for M in (4, 16, 64) for bn in (32, 64)]  # int8 tl.dot on the digits
        launches += [(M, int_gemm.IntGemmConfig(min(64, max(16, M)), bn, bk, 4, 3, split_k=4,
                                                factored=factored, swap=True))
                     for M in (4, 16, 64) for bn, bk in ((128, 128), (64, 64))
                     for factored in (False, True)]  # transposed tiles
        launches += [(M, int_gemm.IntGemmConfig(min(64, max(16, M)), bn, 128, 4, 3, split_k=2,
                                                swap=swap, magic=True))
                     for M in (1, 4, 16, 64) for bn, swap in ((32, False), (64, False),
                                                               (128, True))]  # bit-op int4
        launches += [(M, int_gemm.IntGemmConfig(min(64, max(16, M)), 64, 128, 4, 3, split_k=2,
                                                factored=True, swap=swap, magic=True,
                                                sum_dot=True))
                     for M in (4, 64) for swap in (False, True)]  # x's sums on tensor cores
        for M, cfg in launches:
            x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
            bias = torch.randn(N, device="cuda").to(torch.bfloat16) if M % 2 else None
            y = int_gemm.int_weight_linear(x, weight, scale, offset, bias, config=cfg)
            _check(f"{M}x{N}x{K} int{bits} g{group} {cfg}", x, y, weight, scale, offset, bias)


@pytest.mark.gpu
@needs_gpu
def test_gpu_int_linear_in_a_cuda_graph() -> None:
    from kiln.kernels import int_gemm

    weight, scale, offset = _weight(4096, 4096, 4, 128, "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = int_gemm.int_weight_linear(x, weight, scale, offset)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int_gemm.int_weight_linear(x, weight, scale, offset)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    _check("graph", x, y, weight, scale, offset, None)
    torch.testing.assert_close(y, want, rtol=0, atol=float(want.abs().max()) * 1e-2)
