"""1-byte KV caches (float8_e4m3fn, int8 with per-KV-head scales) in the Triton kernels vs
the torch reference (kiln.kernels.reference: quantize_kv, paged_attention, ...).

CPU: Triton's interpreter in a spawned worker, as in tests/test_kernels.py (whose worker
setup this reuses), plus one patch: the interpreter converts float <-> fp8 by truncating
bit fields (no round-to-nearest-even on ties, a carry out of the mantissa corrupts the
exponent, subnormals and saturation wrong), so the worker routes every conversion that
involves tl.float8e4nv through torch's (correct, RNE) conversion. The interpreted tests
therefore check the kernels' logic (scales, clamps, int8 rounding, paging, masks); the
GPU tests below check the hardware conversion (cvt.rn.satfinite) byte for byte. The
attention kernels read e4m3 with integer ops only (float16 bits of value * 2^-8, no
float conversion): test_e4m3_bits checks that decoding for every code.

    pytest tests/test_kernels_kvquant.py            # CPU, interpreter
    pytest -m gpu tests/test_kernels_kvquant.py     # CUDA, Llama-3.1-8B shapes
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import torch

from kiln.kernels import reference as ref
from tests import test_kernels as cpu
from tests import test_kernels_gpu as gpu

FP8, INT8 = torch.float8_e4m3fn, torch.int8
QMAX = {FP8: ref.FP8_MAX, INT8: ref.INT8_MAX}
CACHE_DTYPES = pytest.mark.parametrize("cache_dtype", [FP8, INT8], ids=["fp8", "int8"])

# Attention tolerances against the reference over the same 1-byte cache: (dtype, atol per
# unit of max |V|, rtol). The kernel multiplies the exact stored values (converted to q's
# dtype) and folds the scales into the float32 scores and output; the reference
# dequantizes to q's dtype first and runs SDPA. An output is a weighted mean of V rows, so
# rounding errors scale with max |V| (up to ~15 here: 3 randn plus every int8/fp8 code),
# not with the output (which can cancel to ~0). float32: exp2 and sum order only
# (measured <= 1e-5 at max |V| 12; kernel and reference are each ~7e-6 from a float64
# oracle). float16: 2^-8 max |V| covers the reference's float16 rounding of value*scale
# plus the kernel's float16 probabilities, 2^-11 relative each (measured <= 1e-2 at max
# |V| 12; the kernel is 4e-3 from the float64 oracle, the reference up to 1e-2).
ATTN_F32 = (torch.float32, 4e-6, 1e-5)
ATTN_F16 = (torch.float16, 2.0 ** -8, 4e-3)

# Values (in units of the scale) on rounding ties and edges: e4m3 ties go to the even
# mantissa (17 -> 16, 19 -> 20, 232 -> 224, 248 -> 256, 3*2^-10 -> 2^-8, 2^-10 -> 0),
# beyond 448 saturate; int8 ties go to even (2.5 -> 2, -3.5 -> -4), beyond 127 clamp.
FP8_EDGES = [17.0, 19.0, 232.0, 248.0, -17.0, 460.0, -600.0, 2.0 ** -10, 3 * 2.0 ** -10,
             -(2.0 ** -9), 0.4375, 0.0, 1.0, -448.0, 0.001, 300.0]
INT8_EDGES = [2.5, -2.5, 0.5, -0.5, 1.5, -3.5, 126.5, 127.5, -200.0, 126.49, 0.0, 7.0,
              -127.0, 0.25, 64.5, -0.75]


def _init_worker() -> None:
    cpu._init_worker()  # TRITON_INTERPRET=1 before any kernel import, numpy patch
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    as_torch = {tl.float8e4nv: FP8, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
                tl.float32: torch.float32}

    def convert_fp8(data: Any, src: Any, dst: Any, rounding: Any) -> Any:
        """Bits of `data` (a src-typed numpy array) converted to dst, as uint<bits>."""
        if tl.float8e4nv not in (src, dst):
            return convert(data, src, dst, rounding)
        arr = np.ascontiguousarray(data).reshape(-1)
        out = torch.from_numpy(arr).view(as_torch[src]).to(as_torch[dst])
        bits = np.dtype(f"uint{dst.primitive_bitwidth}")
        return out.view(torch.uint8).numpy().view(bits).reshape(np.shape(data))

    interpreter._convert_float = convert_fp8


@pytest.fixture(scope="module")
def interp() -> Iterator[Callable[..., Any]]:
    """run(check, *args): calls check(*args) in the interpreter worker."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[gpu]')")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker) as pool:
        yield lambda check, *args: pool.submit(check, *args).result()


def _scales(x: torch.Tensor, cache_dtype: torch.dtype, gen: torch.Generator | None = None,
            ) -> torch.Tensor:
    """Per-KV-head float32 scales of x [..., kv_heads, d]: amax / qmax, times 0.8 - 1.3 so
    that some heads saturate (clamp) and the heads differ."""
    amax = x.float().abs().flatten(0, -3).amax(dim=(0, 2))
    jitter = 0.8 + 0.5 * torch.rand(amax.shape, generator=gen).to(amax.device)
    return (amax / QMAX[cache_dtype] * jitter).contiguous()


def _quantized(cache: torch.Tensor, scale: torch.Tensor, cache_dtype: torch.dtype
               ) -> torch.Tensor:
    """A [blocks, block_size, kv_heads, d] cache stored as the reference stores it, with
    every code a cache can hold (subnormals, +-0, +-448 / +-127; no NaN, no int8 -128)
    written into slot 0 of each block, so that reading them is checked exactly too."""
    out = ref.quantize_kv(cache.flatten(0, 1), scale, cache_dtype).view(cache.shape)
    codes = torch.arange(256, device=cache.device)
    codes = codes[(codes & 0x7F) != 0x7F] if cache_dtype == FP8 else codes[codes != 0x80]
    width = cache.shape[2] * cache.shape[3]
    pick = (torch.arange(width, device=cache.device)[None, :]
            + 97 * torch.arange(cache.shape[0], device=cache.device)[:, None]) % len(codes)
    out.view(torch.uint8)[:, 0] = codes[pick].to(torch.uint8).view(-1, *cache.shape[2:])
    return out


def _equal_bytes(name: str, out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape, name
    a, b = out.view(torch.uint8), expected.view(torch.uint8)
    bad = (a != b).nonzero()
    assert len(bad) == 0, (f"{name}: {len(bad)} bytes differ, first at {bad[0].tolist()}: "
                           f"{out[tuple(bad[0])].float().item()} vs "
                           f"{expected[tuple(bad[0])].float().item()}")


# ---- checks (run in the interpreter worker) ------------------------------------------
def check_rotary_kv(dtype: torch.dtype, cache_dtype: torch.dtype, heads: int, kv_heads: int,
                    head_dim: int) -> None:
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    torch.manual_seed(0)
    tokens, block_size = 10, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype) * 2
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    positions = torch.tensor([0, 1, 2, 17, 33, 100, 255, 5, 6, 0])
    slots = torch.tensor([5, 16, -1, 40, 63, 0, 31, 70, 2, -1])  # -1: padding, not written
    kv_shape = (tokens, kv_heads, head_dim)
    k_scale = _scales(k.reshape(kv_shape), cache_dtype)
    v_scale = _scales(v.reshape(kv_shape), cache_dtype)
    caches = [_quantized(torch.randn(5, block_size, kv_heads, head_dim), s, cache_dtype)
              for s in (k_scale, v_scale)]
    ref_caches = [c.clone() for c in caches]
    cos_sin = cpu._cos_sin(head_dim)
    args = (q, k, v, positions, cos_sin)
    q_rot = rotary_and_write_kv(*args, *caches, slots, head_dim, k_scale, v_scale)
    ref_q = ref.rotary_and_write_kv(*args, *ref_caches, slots, head_dim, k_scale, v_scale)
    cpu._close("q", q_rot, ref_q, 1e-5, 1e-5)
    _equal_bytes("k_cache", caches[0], ref_caches[0])
    _equal_bytes("v_cache", caches[1], ref_caches[1])

    # Ties and edges, exactly: position 0 leaves k as is (cos 1, sin 0) and power-of-two
    # scales make x / scale exactly the listed value.
    edges = torch.tensor(FP8_EDGES if cache_dtype == FP8 else INT8_EDGES)
    vals = edges[torch.arange(kv_heads * head_dim) % len(edges)].view(1, kv_heads, head_dim)
    pow2 = 2.0 ** -torch.arange(kv_heads, dtype=torch.float32)
    k_edge = (vals * pow2.view(1, -1, 1) / 8).to(dtype)
    v_edge = (vals.flip(-1) * pow2.view(1, -1, 1) * 4).to(dtype)
    q1 = torch.randn(1, heads * head_dim, dtype=dtype)
    one = (torch.tensor([0]), cos_sin)
    rotary_and_write_kv(q1, k_edge, v_edge, *one, *caches, torch.tensor([77]), head_dim,
                        pow2 / 8, pow2 * 4)
    ref.rotary_and_write_kv(q1, k_edge, v_edge, *one, *ref_caches, torch.tensor([77]),
                            head_dim, pow2 / 8, pow2 * 4)
    _equal_bytes("k_cache ties", caches[0], ref_caches[0])
    _equal_bytes("v_cache ties", caches[1], ref_caches[1])


def _quantized_batch(seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int,
                     head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype):
    q, k_cache, v_cache, tables, starts = cpu._paged_batch(seq_lens, q_lens, heads, kv_heads,
                                                           head_dim, torch.float32)
    k_scale, v_scale = _scales(k_cache, cache_dtype), _scales(v_cache * 3, cache_dtype)
    k_q = _quantized(k_cache, k_scale, cache_dtype)
    v_q = _quantized(v_cache * 3, v_scale, cache_dtype)
    return q.to(dtype), k_q, v_q, k_scale, v_scale, tables, starts


def check_decode(dtype: torch.dtype, atol: float, rtol: float, cache_dtype: torch.dtype,
                 heads: int, kv_heads: int, head_dim: int, num_splits: int | None,
                 key_rotary: bool = False, heads_per_program: int | None = None) -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    seq_lens = [1, 17, 100, 64, 0]  # the last row is CUDA-graph padding: output zeros
    q, k_q, v_q, k_scale, v_scale, tables, starts = _quantized_batch(
        seq_lens, [1] * 5, heads, kv_heads, head_dim, dtype, cache_dtype)
    scale = head_dim ** -0.5
    table = cpu._cos_sin(head_dim) if key_rotary else None
    out = paged_attention_decode(q, k_q, v_q, tables, torch.tensor(seq_lens).int(), scale,
                                 num_splits=num_splits, block_n=16, k_scale=k_scale,
                                 v_scale=v_scale, key_rotary=table,
                                 heads_per_program=heads_per_program)
    expected = ref.paged_attention(q[:4], k_q, v_q, tables, starts[:5], seq_lens[:4], scale,
                                   k_scale, v_scale, key_rotary=table)
    vmax = ref.dequantize_kv(v_q, v_scale, torch.float32).abs().max().item()
    cpu._close("decode", out[:4], expected, atol * vmax, rtol)
    assert torch.equal(out[4], torch.zeros_like(out[4])), "padding row is not zero"


def check_prefill(dtype: torch.dtype, atol: float, rtol: float, cache_dtype: torch.dtype,
                  heads: int, kv_heads: int, head_dim: int, block_m: int | None,
                  block_n: int | None, key_rotary: bool = False) -> None:
    from kiln.kernels.attention_prefill import paged_attention_prefill

    # Full prefills, a chunk of 30 after 70 prefix-cached tokens, a decode row, mixed.
    seq_lens, q_lens = [1, 17, 100, 50, 33], [1, 17, 30, 1, 33]
    q, k_q, v_q, k_scale, v_scale, tables, starts = _quantized_batch(
        seq_lens, q_lens, heads, kv_heads, head_dim, dtype, cache_dtype)
    scale = head_dim ** -0.5
    table = cpu._cos_sin(head_dim) if key_rotary else None
    out = paged_attention_prefill(q, k_q, v_q, tables, torch.tensor(starts).int(),
                                  torch.tensor(seq_lens).int(), max(q_lens), scale,
                                  block_m=block_m, block_n=block_n, k_scale=k_scale,
                                  v_scale=v_scale, key_rotary=table)
    expected = ref.paged_attention(q, k_q, v_q, tables, starts, seq_lens, scale, k_scale,
                                   v_scale, key_rotary=table)
    vmax = ref.dequantize_kv(v_q, v_scale, torch.float32).abs().max().item()
    cpu._close("prefill", out, expected, atol * vmax, rtol)


def check_mixed(dtype: torch.dtype, atol: float, rtol: float, cache_dtype: torch.dtype) -> None:
    """A mixed step whose first sequences are decode rows: those through the decode kernel,
    the rest through the prefill kernel (paged_attention_mixed), and kiln.functional's
    dispatch counting them, against the reference."""
    from kiln import functional as KF
    from kiln.kernels.attention_prefill import paged_attention_mixed
    from kiln.layers.attention import AttentionMetadata

    heads, kv_heads, head_dim = 8, 2, 64
    seq_lens, q_lens = [40, 9, 100, 50, 33], [1, 1, 30, 1, 33]
    q, k_q, v_q, k_scale, v_scale, tables, starts = _quantized_batch(
        seq_lens, q_lens, heads, kv_heads, head_dim, dtype, cache_dtype)
    scale = head_dim ** -0.5
    expected = ref.paged_attention(q, k_q, v_q, tables, starts, seq_lens, scale, k_scale,
                                   v_scale)
    vmax = ref.dequantize_kv(v_q, v_scale, torch.float32).abs().max().item()
    lens = torch.tensor(seq_lens).int()
    out = paged_attention_mixed(q, k_q, v_q, tables, torch.tensor(starts).int(), lens,
                                max(q_lens), scale, 2, k_scale=k_scale, v_scale=v_scale)
    cpu._close("mixed", out, expected, atol * vmax, rtol)
    KF._triton = lambda x: True  # this worker only
    KF.MIXED_DECODE_ROWS = True  # (the default; KILN_MIXED_DECODE_ROWS=0 turns it off)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), block_tables=tables,
        seq_lens=lens, query_start_loc=torch.tensor(starts).int(), query_starts_host=starts,
        seq_lens_host=seq_lens, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    assert KF.leading_decode_rows(meta) == 2
    out = KF.paged_attention(q, k_q, v_q, meta, scale, k_scale, v_scale)
    cpu._close("functional mixed", out, expected, atol * vmax, rtol)


def check_functional(cache_dtype: torch.dtype) -> None:
    """kiln.functional's CUDA branch (kernels fed the scales) against its CPU branch."""
    from kiln import functional as KF
    from kiln.layers.attention import AttentionMetadata

    heads, kv_heads, head_dim = 4, 2, 32
    seq_lens, q_lens = [5, 40, 17], [5, 3, 1]
    q, k_q, v_q, k_scale, v_scale, tables, starts = _quantized_batch(
        seq_lens, q_lens, heads, kv_heads, head_dim, torch.float32, cache_dtype)
    tokens = starts[-1]
    slots = torch.tensor([(tables[i, p // 16] * 16 + p % 16).item() for i, (n, m) in
                          enumerate(zip(seq_lens, q_lens)) for p in range(n - m, n)])
    kv = torch.randn(tokens, 2 * kv_heads * head_dim)
    positions = torch.tensor([p for n, m in zip(seq_lens, q_lens) for p in range(n - m, n)])
    cos_sin = cpu._cos_sin(head_dim)
    results = []
    for on_triton in (False, True):
        KF._triton = lambda x, on_triton=on_triton: on_triton  # this worker only
        k_c, v_c = k_q.clone(), v_q.clone()
        q_rot = KF.rotary_and_write_kv(q.view(tokens, -1), *kv.chunk(2, -1), positions,
                                       cos_sin, k_c, v_c, slots, head_dim, k_scale, v_scale)
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, seq_lens=torch.tensor(seq_lens).int(),
            query_start_loc=torch.tensor(starts).int(), query_starts_host=starts,
            seq_lens_host=seq_lens, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
        out = KF.paged_attention(q_rot.view(tokens, heads, head_dim), k_c, v_c, meta, 0.2,
                                 k_scale, v_scale)
        decode = KF.paged_attention(q_rot.view(tokens, heads, head_dim)[:3], k_c, v_c,
                                    AttentionMetadata(
            slot_mapping=slots[:3], block_tables=tables, seq_lens=meta.seq_lens,
            query_start_loc=torch.arange(4).int(), query_starts_host=[0, 1, 2, 3],
            seq_lens_host=seq_lens, max_query_len=1, max_seq_len=max(seq_lens)),
            0.2, k_scale, v_scale)
        results.append((k_c, v_c, out, decode))
    (k_ref, v_ref, out_ref, dec_ref), (k_c, v_c, out, decode) = results
    _equal_bytes("functional k_cache", k_c, k_ref)
    _equal_bytes("functional v_cache", v_c, v_ref)
    cpu._close("functional prefill", out, out_ref, 1e-5, 1e-5)
    cpu._close("functional decode", decode, dec_ref, 1e-5, 1e-5)


def check_e4m3_bits() -> None:
    """Every e4m3 code but NaN, read as float16 bits by the attention kernels' integer
    conversion, is exactly its value * 2^-8 (signed zeros and subnormals included): one
    value per op (e4m3_bytes, head_dim % 4 != 0) and four per int32 word (load_kv_words,
    every byte position of a word)."""
    import triton
    import triton.language as tl

    from kiln.kernels import paged

    # The interpreter runs a kernel's source in its module's globals (no closures); this
    # runs in the worker only, after TRITON_INTERPRET is set.
    globals().update(tl=tl, paged=paged)

    @triton.jit
    def kernel(cache_ptr, bytes_ptr, words_ptr, ROWS: tl.constexpr, D: tl.constexpr):
        offs = tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(bytes_ptr + offs, paged.e4m3_bytes(tl.load(cache_ptr + offs), tl.float16))
        rows = tl.arange(0, ROWS)
        tl.store(words_ptr + offs, paged.load_kv_words(cache_ptr, rows * D, rows < ROWS,
                                                       tl.float16, ROWS, D, D, False))

    codes = torch.arange(256, dtype=torch.int32)
    codes = torch.cat([codes, codes.roll(1), codes.roll(2), codes.roll(3)]).to(torch.uint8)
    cache = codes.view(FP8)
    out = [torch.full((len(codes),), float("nan"), dtype=torch.float16) for _ in range(2)]
    kernel[(1,)](cache, *out, ROWS=len(codes) // 16, D=16)
    finite = (codes & 0x7F) != 0x7F
    want = (cache.float() * 2.0 ** -8).to(torch.float16)[finite]
    for name, got in zip(("e4m3_bytes", "load_kv_words"), out):
        _equal_bytes(name, got[finite], want)


def check_scale_arguments() -> None:
    """A 1-byte cache without (well-formed) scales is refused on the host; a 16-bit cache
    ignores them."""
    from kiln.kernels.paged import kv_scale_args

    cache = torch.zeros(2, 16, 4, 8, dtype=FP8)
    good = torch.ones(4)
    assert kv_scale_args(cache, cache, good, good) == (good, good)
    for k_scale, v_scale in ((None, good), (good, None), (torch.ones(3), good),
                             (good, torch.ones(4, dtype=torch.float16)),
                             (good, torch.ones(8)[::2])):
        with pytest.raises(AssertionError):
            kv_scale_args(cache, cache, k_scale, v_scale)
    with pytest.raises(AssertionError):  # e5m2 is no cache dtype of kiln's
        e5m2 = cache.view(torch.float8_e5m2)
        kv_scale_args(e5m2, e5m2, good, good)
    half = torch.zeros(2, 16, 4, 8, dtype=torch.float16)
    assert kv_scale_args(half, half, None, None) == (half, half)


# ---- CPU tests -------------------------------------------------------------------------
@CACHE_DTYPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (3, 3, 80)])
def test_rotary_and_write_kv(interp, dtype, cache_dtype, heads, kv_heads, head_dim) -> None:
    interp(check_rotary_kv, dtype, cache_dtype, heads, kv_heads, head_dim)


@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,num_splits", [
    (8, 2, 64, 4), (3, 3, 80, 1), (4, 1, 64, None), (4, 2, 42, 2)])  # 42: V read as bytes
def test_decode_attention(interp, dtype, atol, rtol, cache_dtype, heads, kv_heads, head_dim,
                          num_splits) -> None:
    interp(check_decode, dtype, atol, rtol, cache_dtype, heads, kv_heads, head_dim,
           num_splits)


@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_m,block_n", [
    (8, 2, 64, 16, 16), (3, 3, 80, None, None), (4, 2, 42, 16, 32),
    (8, 2, 64, None, None)])  # 33 tokens x 4 heads: BLOCK_M 128, prefill_config's BLOCK_N
def test_prefill_attention(interp, dtype, atol, rtol, cache_dtype, heads, kv_heads, head_dim,
                           block_m, block_n) -> None:
    interp(check_prefill, dtype, atol, rtol, cache_dtype, heads, kv_heads, head_dim, block_m,
           block_n)


# Several KV heads a program over a 1-byte cache: each head's k_scale and v_scale.
@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
@pytest.mark.parametrize("heads_per_program", [2, 4])
def test_decode_attention_heads_per_program(interp, dtype, atol, rtol, cache_dtype,
                                            heads_per_program) -> None:
    interp(check_decode, dtype, atol, rtol, cache_dtype, 8, 4, 64, None, False,
           heads_per_program)


# Attention sinks over a 1-byte cache: keys stored before rotary, rotated as read.
@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_key_rotary(interp, dtype, atol, rtol, cache_dtype, num_splits) -> None:
    interp(check_decode, dtype, atol, rtol, cache_dtype, 8, 2, 64, num_splits, True)


@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (None, None)])
def test_prefill_attention_key_rotary(interp, dtype, atol, rtol, cache_dtype, block_m,
                                      block_n) -> None:
    interp(check_prefill, dtype, atol, rtol, cache_dtype, 8, 2, 64, block_m, block_n, True)


@CACHE_DTYPES
@pytest.mark.parametrize("dtype,atol,rtol", [ATTN_F32, ATTN_F16], ids=["f32", "f16"])
def test_mixed_step_decode_rows_first(interp, dtype, atol, rtol, cache_dtype) -> None:
    interp(check_mixed, dtype, atol, rtol, cache_dtype)


@CACHE_DTYPES
def test_functional_dispatch(interp, cache_dtype) -> None:
    interp(check_functional, cache_dtype)


def test_scale_arguments(interp) -> None:
    interp(check_scale_arguments)


def test_e4m3_bits(interp) -> None:
    interp(check_e4m3_bits)


def test_register_cap_setting() -> None:
    """KILN_KV8_DECODE_MAXNREG: unset is no cap; a count ptxas takes, or one clear line."""
    from kiln.kernels.attention_decode import _register_cap

    assert _register_cap("") is None
    assert _register_cap("168") == 168
    for bad in ("12", "300", "many", "-1"):
        with pytest.raises(ValueError, match="KILN_KV8_DECODE_MAXNREG"):
            _register_cap(bad)


# ---- GPU tests (Llama-3.1-8B shapes) -----------------------------------------------------
needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 would run the kernels on the host"),
]
HEADS, KV_HEADS, HEAD_DIM, BLOCK = gpu.HEADS, gpu.KV_HEADS, gpu.HEAD_DIM, gpu.BLOCK_SIZE


def _close_to_f32(name: str, out: torch.Tensor, expected: torch.Tensor, v_q: torch.Tensor,
                  v_scale: torch.Tensor) -> None:
    """A bf16 kernel output against the float32 oracle (the reference run on q.float()).

    Beyond float32, the kernel rounds only p (for the p @ v MMA) and the output to bf16,
    2^-9 relative each, so |error| <= 2^-9 (max |V| + |out|); allowed: 2^-7 max |V| +
    2^-8 |out| (a torch model of the kernel's numerics at these shapes stays <= 3.4e-3
    max |V|). With an e4m3 cache both products run in float16 (q: bf16 -> fp16 exact at
    these magnitudes; K, V: exact bit patterns of value * 2^-8), p is rounded to 2^-11
    instead, so the same bound holds with room. The bf16 reference is no oracle here: it
    rounds value * scale to bf16 before SDPA and lands up to 0.09 from float32 where the
    kernel stays within 0.02.
    """
    vmax = ref.dequantize_kv(v_q, v_scale, torch.float32).abs().max().item()
    gpu._close(name, out.float(), expected, atol=2.0 ** -7 * vmax, rtol=2.0 ** -8)


def _gpu_quantized(seq_lens: list[int], q_lens: list[int], cache_dtype: torch.dtype,
                   table_width: int | None = None):
    q, k_cache, v_cache, tables, starts = gpu._paged(seq_lens, q_lens, table_width)
    gen = torch.Generator().manual_seed(len(seq_lens))
    k_scale, v_scale = _scales(k_cache, cache_dtype, gen), _scales(v_cache, cache_dtype, gen)
    return (q, _quantized(k_cache, k_scale, cache_dtype), _quantized(v_cache, v_scale,
            cache_dtype), k_scale, v_scale, tables, starts)


def _gpu(fn: Callable[..., None]) -> Callable[..., None]:
    """The GPU marks, and both cache dtypes."""
    for mark in needs_gpu:
        fn = mark(fn)
    return CACHE_DTYPES(fn)


@_gpu
def test_gpu_rotary_and_write_kv(cache_dtype) -> None:
    """At position 0 (rotary leaves k as is) both caches match the reference byte for byte,
    ties and edges included: the hardware's cvt.rn.satfinite and the int8 rounding against
    torch's conversions. At other positions V still does, and K is exactly the 16-bit
    path's rot(k) quantized; that rot(k) differs from the reference's by up to one bf16
    ulp of the products (the compiler fuses one product of the rotation into an FMA: the
    bf16 test compares it with a tolerance), and where the two products cancel that is
    many e4m3 codes near zero, so K is compared with the reference as values."""
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    tokens, max_pos, num_blocks = 4096, 8192, 600
    torch.manual_seed(3)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda",
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:tokens]
    slots[1::97] = -1  # padding tokens are not written
    # Token 0: ties and edges, exact on heads 0, 1 (power-of-two scales).
    pow2 = 2.0 ** -torch.arange(KV_HEADS, device="cuda", dtype=torch.float32)
    edges = torch.tensor(FP8_EDGES if cache_dtype == FP8 else INT8_EDGES, device="cuda")
    vals = edges[torch.arange(KV_HEADS * HEAD_DIM, device="cuda") % len(edges)]
    k[0] = v[0] = (vals.view(KV_HEADS, -1) * pow2[:, None]).flatten().to(torch.bfloat16)
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    k_scale = _scales(k.reshape(tokens, KV_HEADS, HEAD_DIM)[1:], cache_dtype)
    v_scale = _scales(v.reshape(tokens, KV_HEADS, HEAD_DIM)[1:], cache_dtype)
    k_scale[:2], v_scale[:2] = pow2[:2], pow2[:2]
    random_positions = torch.randint(0, max_pos, (tokens,), device="cuda")
    for positions in (torch.zeros_like(random_positions), random_positions):
        caches = [torch.randint(-100, 100, (num_blocks, BLOCK, KV_HEADS, HEAD_DIM),
                                device="cuda", dtype=torch.int8).view(cache_dtype)
                  for _ in range(2)]
        ref_caches = [c.clone() for c in caches]
        args = (q, k, v, positions, cos_sin)
        q_rot = rotary_and_write_kv(*args, *caches, slots, HEAD_DIM, k_scale, v_scale)
        ref_q = ref.rotary_and_write_kv(*args, *ref_caches, slots, HEAD_DIM, k_scale,
                                        v_scale)
        gpu._close("q", q_rot, ref_q, **gpu.BF16)
        _equal_bytes("v_cache", caches[1], ref_caches[1])
        if not positions.any():
            _equal_bytes("k_cache at position 0", caches[0], ref_caches[0])
            continue
        written = torch.zeros(num_blocks * BLOCK, dtype=torch.bool, device="cuda")
        written[slots[slots >= 0]] = True
        k_out = caches[0].flatten(0, 1)[written]
        bf16 = [torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda",
                            dtype=torch.bfloat16) for _ in range(2)]
        rotary_and_write_kv(*args, *bf16, slots, HEAD_DIM)  # the 16-bit path's rot(k)
        own = ref.quantize_kv(bf16[0].flatten(0, 1)[written], k_scale, cache_dtype)
        _equal_bytes("k_cache vs the 16-bit path's rot(k)", k_out, own)
        # vs the reference: one bf16 ulp of each product (<= 2^-7 |k_d| and 2^-7 |k_d'|,
        # d' = d -+ d / 2: the fused one; 0.03 alone missed a product above 4, failing once
        # in the 24th session's three runs), one quantization step (int8: the scale; e4m3:
        # 2^-3 relative, 2^-9 subnormal) and the sum's rounding
        got = ref.dequantize_kv(k_out, k_scale, torch.float32)
        want = ref.dequantize_kv(ref_caches[0].flatten(0, 1)[written], k_scale, torch.float32)
        step = k_scale.view(1, -1, 1) * (1.0 if cache_dtype == INT8 else 2.0 ** -9)
        rtol = 0.016 + (0.125 if cache_dtype == FP8 else 0.0)
        mag = k.float().view(tokens, KV_HEADS, HEAD_DIM).abs()
        mag = mag + mag.roll(HEAD_DIM // 2, dims=-1)  # |k_d| + |k_d'|
        kept = torch.nonzero(slots >= 0).flatten()
        mag = mag[kept[torch.argsort(slots[kept])]]  # in slot order, as k_out
        bad = (got - want).abs() > 0.01 + 2.0 ** -7 * mag + step + rtol * want.abs()
        assert not bad.any(), f"k_cache: {bad.sum().item()} values off the reference"


@_gpu
@pytest.mark.parametrize("seq_lens,q_lens", [
    ([512, 1000, 77, 2048], [512, 1000, 77, 2048]),  # plain prefill
    ([3000, 4096, 130, 700], [200, 1, 130, 1]),  # chunked prefill + decode rows (mixed)
])
def test_gpu_prefill_attention(cache_dtype, seq_lens, q_lens) -> None:
    from kiln.kernels.attention_prefill import paged_attention_prefill

    q, k_q, v_q, k_scale, v_scale, tables, starts = _gpu_quantized(seq_lens, q_lens,
                                                                   cache_dtype)
    scale = HEAD_DIM ** -0.5
    out = paged_attention_prefill(
        q, k_q, v_q, tables, torch.tensor(starts, device="cuda").int(),
        torch.tensor(seq_lens, device="cuda").int(), max(q_lens), scale, k_scale=k_scale,
        v_scale=v_scale)
    expected = ref.paged_attention(q.float(), k_q, v_q, tables, starts, seq_lens, scale,
                                   k_scale, v_scale)
    _close_to_f32("prefill", out, expected, v_q, v_scale)


@_gpu
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_decode_attention(cache_dtype, num_splits) -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    batch, ctx = 64, 4096
    seq_lens = torch.randint(1, ctx + 1, (batch,), generator=torch.Generator().manual_seed(0))
    seq_lens = [ctx, *seq_lens.tolist()[1:]]
    q, k_q, v_q, k_scale, v_scale, tables, _ = _gpu_quantized(seq_lens, [1] * batch,
                                                              cache_dtype, ctx // BLOCK)
    scale = HEAD_DIM ** -0.5
    out = paged_attention_decode(q, k_q, v_q, tables,
                                 torch.tensor(seq_lens, device="cuda").int(), scale,
                                 num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    expected = ref.paged_attention(q.float(), k_q, v_q, tables, list(range(batch + 1)),
                                   seq_lens, scale, k_scale, v_scale)
    _close_to_f32("decode", out, expected, v_q, v_scale)


@_gpu
@pytest.mark.parametrize("heads_per_program", [2, 8])
def test_gpu_decode_attention_heads_per_program(cache_dtype, heads_per_program) -> None:
    """Several KV heads a program over a 1-byte cache: 300 short contexts (1-300 tokens)
    against the float32 oracle."""
    from kiln.kernels.attention_decode import paged_attention_decode

    seq_lens = torch.randint(1, 301, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    q, k_q, v_q, k_scale, v_scale, tables, _ = _gpu_quantized(seq_lens, [1] * 300,
                                                              cache_dtype, 320 // BLOCK)
    out = paged_attention_decode(q, k_q, v_q, tables,
                                 torch.tensor(seq_lens, device="cuda").int(), HEAD_DIM ** -0.5,
                                 k_scale=k_scale, v_scale=v_scale,
                                 heads_per_program=heads_per_program)
    expected = ref.paged_attention(q.float(), k_q, v_q, tables, list(range(301)), seq_lens,
                                   HEAD_DIM ** -0.5, k_scale, v_scale)
    _close_to_f32("decode", out, expected, v_q, v_scale)


@_gpu
@pytest.mark.parametrize("cap", [168, 128])
def test_gpu_decode_attention_register_cap(cache_dtype, cap) -> None:
    """KILN_KV8_DECODE_MAXNREG's cap makes ptxas spill, never changes a result: the same
    bits as without it, at Llama-3.1-8B's heads and a batch of mixed lengths."""
    from kiln.kernels.attention_decode import paged_attention_decode

    seq_lens = [4096, 1, 17, 1500, 3333, 64, 2048, 999]
    q, k_q, v_q, k_scale, v_scale, tables, _ = _gpu_quantized(seq_lens, [1] * 8, cache_dtype,
                                                              4096 // BLOCK)
    lens = torch.tensor(seq_lens, device="cuda").int()
    args = (q, k_q, v_q, tables, lens, HEAD_DIM ** -0.5)
    plain = paged_attention_decode(*args, k_scale=k_scale, v_scale=v_scale, num_splits=1)
    capped = paged_attention_decode(*args, k_scale=k_scale, v_scale=v_scale, num_splits=1,
                                    max_registers=cap)
    assert torch.equal(plain, capped)


@_gpu
def test_gpu_v_transposed_reads_the_same(cache_dtype) -> None:
    """V stored transposed inside each block (KILN_KV_V_TRANSPOSED; paged.v_transposed):
    decode (one split, the launcher's splits, two heads a program), prefill over a cached
    prefix and a mixed step read what the usual layout gives, within the float32 oracle's
    bound, at Llama-3.1-8B's heads and mixed lengths."""
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_prefill import paged_attention_mixed, paged_attention_prefill

    seq_lens, q_lens = [4096, 1, 17, 1500, 333, 64], [1, 1, 17, 700, 333, 1]
    q, k_q, v_q, k_scale, v_scale, tables, starts = _gpu_quantized(seq_lens, q_lens,
                                                                   cache_dtype, 4096 // BLOCK)
    v_t = v_q.permute(0, 2, 3, 1).contiguous()
    lens = torch.tensor(seq_lens, device="cuda").int()
    qsl = torch.tensor(starts, device="cuda").int()
    scale, scales = HEAD_DIM ** -0.5, dict(k_scale=k_scale, v_scale=v_scale)
    dec = q[qsl[1:].long() - 1]  # each sequence's last query as a decode row
    runs = {
        "decode": lambda v: paged_attention_decode(dec, k_q, v, tables, lens, scale, **scales),
        "decode, 1 split": lambda v: paged_attention_decode(dec, k_q, v, tables, lens, scale,
                                                            num_splits=1, **scales),
        "decode, 2 heads": lambda v: paged_attention_decode(
            dec, k_q, v, tables, lens, scale, num_splits=1, heads_per_program=2, **scales),
        "prefill": lambda v: paged_attention_prefill(q, k_q, v, tables, qsl, lens,
                                                     max(q_lens), scale, **scales),
        "mixed": lambda v: paged_attention_mixed(q, k_q, v, tables, qsl, lens, max(q_lens),
                                                 scale, 2, **scales),
    }
    expected = ref.paged_attention(q.float(), k_q, v_q, tables, starts, seq_lens, scale,
                                   k_scale, v_scale)
    for name, run in runs.items():
        usual, transposed = run(v_q), run(v_t)
        # one bf16 ulp of the largest output: the layouts' launches may take different key
        # tiles (int8 decode: 64 keys on the usual layout, 128 transposed), so their online
        # softmax rounds differently (H200, 27th session: 0.03125 at outputs up to ~6)
        bound = 2.0 ** -7 * usual.float().abs().max().item()
        assert (transposed.float() - usual.float()).abs().max().item() <= bound, name
        if name in ("prefill", "mixed"):
            _close_to_f32(name, transposed, expected, v_q, v_scale)


@_gpu
def test_gpu_decode_attention_cuda_graph(cache_dtype) -> None:
    """Captured once, replayed with other seq_lens (incl. 0 = padding), queries and scale
    values (read on the device at replay)."""
    from kiln.kernels.attention_decode import paged_attention_decode

    batch, max_len = 16, 8192
    q, k_q, v_q, k_scale, v_scale, tables, _ = _gpu_quantized([max_len] * batch, [1] * batch,
                                                              cache_dtype)
    seq_lens = torch.full((batch,), max_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5

    def step() -> torch.Tensor:
        return paged_attention_decode(q, k_q, v_q, tables, seq_lens, scale,
                                      max_seq_len=max_len, k_scale=k_scale, v_scale=v_scale)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
        lens[-1] = 0 if trial % 2 else lens[-1]
        seq_lens.copy_(torch.tensor(lens))
        q.copy_(torch.randn_like(q))
        k_scale.mul_(1.5)
        v_scale.mul_(0.5)
        graph.replay()
        live = [i for i, n in enumerate(lens) if n > 0]
        expected = ref.paged_attention(q[live].float(), k_q, v_q, tables[live],
                                       list(range(len(live) + 1)), [lens[i] for i in live],
                                       scale, k_scale, v_scale)
        _close_to_f32(f"replay {trial}", out[live], expected, v_q, v_scale)
        if len(live) < batch:
            assert not out[-1].any(), "padding row is not zero"


def test_prefill_launch_follows_the_grid() -> None:
    """Full 128-row tiles: 4 warps where the grid has two programs an SM or more, 8 (e4m3:
    128 keys, 2 stages) below that, e.g. one 1k-token prompt alone; int8 keeps its launch."""
    from kiln.kernels.attention_prefill import prefill_config

    for cache in (torch.bfloat16, torch.float8_e4m3fn, torch.int8):
        big, small = (prefill_config(cache, 128, 128, s) for s in (False, True))
        if cache == torch.int8:
            assert big == small
            continue
        assert (big.num_warps, small.num_warps) == (4, 8) and big.heavy_first and \
            small.heavy_first
        assert small.block_n == (128 if cache == torch.float8_e4m3fn else 64)
    assert prefill_config(torch.bfloat16, 64, 128, True) == prefill_config(torch.bfloat16, 64, 128)


def test_leading_decode_rows() -> None:
    """Decode rows ahead of a prompt are counted (once a step: cached in host_cache); none
    without a prompt after them, without a host copy, or behind a prompt."""
    from kiln.functional import leading_decode_rows
    from kiln.layers.attention import AttentionMetadata

    def meta(starts: list[int]) -> AttentionMetadata:
        t = torch.zeros(1)
        return AttentionMetadata(t, t, t, t, starts, [], 1, 1)

    assert leading_decode_rows(meta([0, 1, 2, 3, 10])) == 3
    assert leading_decode_rows(meta([0, 1, 2, 3])) == 0  # all decode rows
    assert leading_decode_rows(meta([0, 7, 8])) == 0  # a prompt first
    assert leading_decode_rows(meta([])) == 0  # a graph's static metadata
    m = meta([0, 1, 5])
    assert leading_decode_rows(m) == 1 and m.host_cache["leading_decode_rows"] == 1
