"""kiln's CPU GEMM for integer weights (kiln/kernels/cpu_int.c) against float64 products of
the dequantized weights, and the integer layers' use of it."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import cpu_int
from kiln.kernels.reference_quant import dequantize_int_weight, pack_int4
from kiln.layers.weight_only import IntWeightMethod, quantize_int4_asymmetric

needs_kernel = pytest.mark.skipif(not cpu_int.available(), reason="kiln's CPU integer GEMM "
                                  "needs x86-64 with AVX-512F or AVX2 and a C compiler")


def _storage(bits: int, n: int, k: int, group: int, offset: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    if bits == 4:
        weight = pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    else:
        weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=gen) * 0.02 + 1e-3
    off = (torch.rand(n, groups, generator=gen) - 0.5) * 0.1 if offset else None
    return weight, scale, off


@needs_kernel
@pytest.mark.parametrize("bits, offset", [(4, True), (4, False), (8, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("n, k, group", [(40, 96, 32), (64, 256, 16), (33, 128, 128),
                                         (16, 72, 72)])
def test_kernel_is_as_close_to_float64_as_a_float32_gemm(bits, offset, rows, n, k, group):
    """Output counts not a multiple of 16 (padded tiles), row counts around the 8-row
    tile, per-channel groups (group = K), with and without offsets and bias."""
    weight, scale, off = _storage(bits, n, k, group, offset, seed=rows)
    w = dequantize_int_weight(weight, scale, off)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)) * 2
    bias = torch.randn(n)
    exact = x.double() @ w.double().T + bias.double()
    got = cpu_int.TiledWeight(weight, scale, off)(x, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    gemm_error = (torch.nn.functional.linear(x, w, bias).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * gemm_error + 1e-6


@needs_kernel
def test_tiles_hold_the_stored_bytes():
    """4-bit tiles keep each stored byte (two k of one output row) as it is: tile t, byte
    pair p, lane j is row 16 t + j's byte p; padding rows are zero."""
    weight, scale, off = _storage(4, 20, 64, 32, True)
    tiled = cpu_int.TiledWeight(weight, scale, off)
    assert tiled.weight.shape == (2, 32, 16)
    assert torch.equal(tiled.weight[1, 5, 3], weight[19, 5])
    assert torch.equal(tiled.weight[1, :, 4:], torch.zeros(32, 12, dtype=torch.uint8))
    assert tiled.scale.shape == (2, 2, 16) and tiled.scale[0, 1, 7] == scale[7, 1]


@needs_kernel
def test_int_layer_takes_the_kernel_for_decode_rows_only(monkeypatch):
    """An int4 layer on the CPU: decode-sized float32 steps through the kernel (tiles made
    once), longer ones (and other dtypes) through the dequantized float32 weight."""
    from kiln.layers.linear import ColumnLinear

    layer = ColumnLinear(256, 48, bias=True)
    method = IntWeightMethod("int4_wo", 4, 64, True)
    w = torch.randn(48, 256)
    method.store(layer, *quantize_int4_asymmetric(w, 64))
    layer.bias.data = torch.randn(48)
    deq = dequantize_int_weight(layer.weight, layer.weight_scale, layer.weight_offset)
    calls = []
    real = cpu_int.TiledWeight.__call__
    monkeypatch.setattr(cpu_int.TiledWeight, "__call__",
                        lambda self, x, b=None: calls.append(x.shape[0]) or real(self, x, b))
    for rows in (1, 8, cpu_int.MAX_ROWS, cpu_int.MAX_ROWS + 1):
        x = torch.randn(rows, 256)
        got = method.apply(layer, x, layer.bias)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, deq, layer.bias),
                                   rtol=1e-5, atol=1e-4)
    assert calls == [1, 8, cpu_int.MAX_ROWS]
    tiles = layer._cpu_tiles
    method.apply(layer, torch.randn(2, 3, 256), layer.bias)  # [batch, seq, K] -> rows
    assert layer._cpu_tiles is tiles and calls[-1] == 6
    method.apply(layer, torch.randn(2, 256, dtype=torch.bfloat16), None)
    assert len(calls) == 4  # bfloat16 activations: the float path
    method.store(layer, *quantize_int4_asymmetric(w * 2, 64))  # new weights, new tiles
    assert layer._cpu_tiles is None


def test_unavailable_kernel_falls_back(monkeypatch, tmp_path):
    """KILN_CPU_INT_KERNEL=0, or no compiler: available() is False, and `takes` says no."""
    monkeypatch.setattr(cpu_int, "_tried", False)
    monkeypatch.setattr(cpu_int, "_library", None)
    monkeypatch.setenv("KILN_CPU_INT_KERNEL", "0")
    assert not cpu_int.available()
    assert not cpu_int.takes(torch.randn(1, 64), 4, 32)
    monkeypatch.setattr(cpu_int, "_tried", False)
    monkeypatch.delenv("KILN_CPU_INT_KERNEL")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    assert cpu_int._compile("avx2") is None  # (a clear log line, no exception)
    assert cpu_int._compile(None) is None  # no AVX2 / AVX-512F: the same


@needs_kernel
def test_compiled_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    lib = cpu_int._compile(cpu_int.isa())
    built = list((tmp_path / "cpu_kernels").glob(f"cpu_int-{cpu_int.isa()}-*.so"))
    assert lib is not None and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert cpu_int._compile(cpu_int.isa()) is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not compiled again
    assert not list((tmp_path / "cpu_kernels").glob("*.so.*")) and \
        len(list((tmp_path / "cpu_kernels").iterdir())) == 1  # no temporary files left


@needs_kernel
@pytest.mark.parametrize("bits, offset", [(4, True), (4, False), (8, False), (8, True)])
def test_dequantize_is_the_reference_bit_for_bit(bits, offset):
    """The float32 weight of prompt-sized steps: q * scale (+ offset), rounded after each
    operation as the torch reference does (fp32 scales: products that round)."""
    weight, scale, off = _storage(bits, 37, 192, 64, offset, seed=bits)
    scale = scale * 1.2345678  # not a short fraction: the product rounds
    assert torch.equal(cpu_int.dequantize(weight, scale, off),
                       dequantize_int_weight(weight, scale, off))


needs_avx512 = pytest.mark.skipif(cpu_int.isa() != "avx512", reason="the AVX-512 build to "
                                  "compare with needs AVX-512F")


@needs_kernel
@needs_avx512
@pytest.mark.parametrize("bits, offset", [(4, True), (8, False), (8, True)])
def test_avx2_build_gives_the_avx512_bits(bits, offset, monkeypatch):
    """The AVX2 build (4 rows at once in two ymm halves; CPUs without AVX-512) sums each
    lane in the same order: the same bits as the AVX-512 build, rows 1-11 around both row
    blocks, padded tiles, bias."""
    weight, scale, off = _storage(bits, 40, 192, 64, offset, seed=bits)
    tiled, bias = cpu_int.TiledWeight(weight, scale, off), torch.randn(40)
    xs = [torch.randn(rows, 192) for rows in (1, 2, 3, 4, 5, 7, 9, 11)]
    want = [tiled(x, bias) for x in xs]
    monkeypatch.setenv("KILN_CPU_INT_ISA", "avx2")
    assert cpu_int.isa() == "avx2"
    monkeypatch.setattr(cpu_int, "_tried", False)
    monkeypatch.setattr(cpu_int, "_library", None)
    assert cpu_int.available()
    assert cpu_int.library()._name.split("/")[-1].startswith("cpu_int-avx2-")
    for x, w in zip(xs, want):
        assert torch.equal(tiled(x, bias), w), x.shape
