"""Triton kernels vs the torch reference, on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when a function is decorated with @triton.jit: triton's own
library functions when triton is imported, ours when a kiln.kernels module is imported;
the choice then holds for the life of the process. Setting it here (or in conftest)
would leak into every test module after this one, including tests/test_kernels_gpu.py
when both run in one pytest process on a GPU machine. So each check runs in one spawned
worker process that sets the variable before importing any kernel; this module imports
no kernel itself and only forwards parameters and re-raises the worker's failures.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import torch

# Only look for triton here: importing it would decorate its own library functions
# (tl.sum, ...) for compilation in the worker too, before the worker can set the variable.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")

F32 = (torch.float32, 1e-5, 1e-5)
BF16 = (torch.bfloat16, 1e-2, 1.6e-2)  # the interpreter truncates to bf16: ~2 ulp
F16 = (torch.float16, 4e-3, 4e-3)  # the interpreter's tl.dot cannot take bf16
# rotary rounds two products and their (cancelling) sum: 3 truncations of values ~2-4
ROT_BF16 = (torch.bfloat16, 6e-2, 1.6e-2)


def _init_worker() -> None:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before TRITON_INTERPRET could be set")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    # numpy >= 2.4 refuses int() of the interpreter's 1-element scalars, which
    # range(tensor) needs; read them with .item() instead.
    patch = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


@pytest.fixture(scope="module")
def interp() -> Iterator[Callable[..., Any]]:
    """run(check, *args, **kw): calls check(*args, **kw) in the interpreter worker."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker) as pool:
        yield lambda check, *args, **kw: pool.submit(check, *args, **kw).result()


def _close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape)
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{name}: {err}"


# ---- checks (run in the worker) ------------------------------------------------------
def check_rms_norm(dtype: torch.dtype, atol: float, rtol: float, shape: tuple[int, ...],
                   with_residual: bool) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.rms_norm import add_rms_norm, rms_norm

    torch.manual_seed(0)
    wide = torch.randn(*shape[:-1], shape[-1] + 8, dtype=dtype)
    x = wide[..., 3:3 + shape[-1]]  # rows with a stride: a slice of a wider output
    weight = torch.randn(shape[-1], dtype=dtype)
    if with_residual:
        residual = torch.randn(shape, dtype=dtype)
        out, summed = add_rms_norm(x, residual, weight, 1e-6)
        ref_out, ref_summed = ref.add_rms_norm(x, residual, weight, 1e-6)
        _close("residual", summed, ref_summed, atol, rtol)
    else:
        out, ref_out = rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6)
    _close("rms_norm", out, ref_out, atol, rtol)


def check_silu_mul(dtype: torch.dtype, atol: float, rtol: float) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.silu_mul import gelu_tanh_and_mul, silu_and_mul

    torch.manual_seed(0)
    x = torch.randn(7, 2 * 123, dtype=dtype) * 3
    _close("silu_mul", silu_and_mul(x), ref.silu_and_mul(x), atol, rtol)
    x[0, :5] = torch.tensor([-30.0, -8.0, 0.0, 8.0, 30.0])  # GELU's saturated tails
    _close("gelu_tanh_mul", gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x), atol, rtol)


def _cos_sin(head_dim: int, max_pos: int = 256) -> torch.Tensor:
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def check_rotary_kv(dtype: torch.dtype, atol: float, rtol: float, heads: int, kv_heads: int,
                    head_dim: int, rotary_dim: int | None = None, rotate_k: bool = True) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    torch.manual_seed(0)
    tokens, block_size = 9, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    positions = torch.tensor([0, 1, 2, 17, 33, 100, 255, 5, 6])
    slots = torch.tensor([5, 16, -1, 40, 63, 0, 31, 70, 2])  # -1: padding, not written
    caches = [torch.randn(5, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    cos_sin = _cos_sin(head_dim if rotary_dim is None else rotary_dim)
    q_rot = rotary_and_write_kv(q, k, v, positions, cos_sin, *caches, slots, head_dim,
                                rotate_k=rotate_k)
    ref_q = ref.rotary_and_write_kv(q, k, v, positions, cos_sin, *ref_caches, slots, head_dim,
                                    rotate_k=rotate_k)
    _close("q", q_rot, ref_q, atol, rtol)
    _close("k_cache", caches[0], ref_caches[0], atol if rotate_k else 0, rtol if rotate_k else 0)
    _close("v_cache", caches[1], ref_caches[1], 0, 0)


def _paged_batch(seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, block_size: int = 16):
    """Random caches with shuffled blocks, tables wider than needed, packed queries."""
    torch.manual_seed(0)
    blocks = [-(-max(s, 1) // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, dtype=torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks) + 2, dtype=torch.int32)
    for i, used in enumerate(blocks):
        tables[i, :used], order = order[:used], order[used:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, starts


def check_prefill(dtype: torch.dtype, atol: float, rtol: float, heads: int, kv_heads: int,
                  head_dim: int, block_m: int | None, block_n: int | None,
                  window: int | None = None, softcap: float | None = None,
                  alibi: bool = False, key_rotary: bool = False, **launch: Any) -> None:
    """launch: more paged_attention_prefill options (num_stages, heavy_first, ...)."""
    from kiln.kernels import reference as ref
    from kiln.kernels.attention_prefill import paged_attention_prefill

    # Full prefill, chunked prefill over a cached prefix, and decode rows, mixed.
    seq_lens, q_lens = [1, 7, 33, 123, 50], [1, 7, 9, 40, 1]
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, heads, kv_heads,
                                                       head_dim, dtype)
    scale = head_dim ** -0.5
    slopes = ref.alibi_slopes(heads) if alibi else None
    table = _cos_sin(head_dim) if key_rotary else None
    out = paged_attention_prefill(q, k_cache, v_cache, tables, torch.tensor(starts).int(),
                                  torch.tensor(seq_lens).int(), max(q_lens), scale,
                                  block_m=block_m, block_n=block_n, sliding_window=window,
                                  softcap=softcap, alibi_slopes=slopes, key_rotary=table,
                                  **launch)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale,
                                   sliding_window=window, softcap=softcap, alibi_slopes=slopes,
                                   key_rotary=table)
    _close("prefill", out, expected, atol, rtol)


def check_decode(dtype: torch.dtype, atol: float, rtol: float, heads: int, kv_heads: int,
                 head_dim: int, num_splits: int | None, window: int | None = None,
                 softcap: float | None = None, alibi: bool = False,
                 key_rotary: bool = False, heads_per_program: int | None = None,
                 fused_reduce: bool | None = None) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.attention_decode import paged_attention_decode

    seq_lens = [1, 7, 33, 123, 64, 0]  # the last row is CUDA-graph padding: output zeros
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, [1] * 6, heads, kv_heads,
                                                       head_dim, dtype)
    scale = head_dim ** -0.5
    slopes = ref.alibi_slopes(heads) if alibi else None
    table = _cos_sin(head_dim) if key_rotary else None
    out = paged_attention_decode(q, k_cache, v_cache, tables, torch.tensor(seq_lens).int(),
                                 scale, num_splits=num_splits, block_n=16,
                                 sliding_window=window, softcap=softcap, alibi_slopes=slopes,
                                 key_rotary=table, heads_per_program=heads_per_program,
                                 fused_reduce=fused_reduce)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts[:6], seq_lens[:5], scale,
                                   sliding_window=window, softcap=softcap, alibi_slopes=slopes,
                                   key_rotary=table)
    if key_rotary:  # the batched decode reference rotates the same way
        batched = ref.paged_attention_decode(q[:5], k_cache, v_cache, tables, seq_lens[:5],
                                             scale, key_rotary=table)
        _close("decode reference", batched, expected[:5], atol, rtol)
    _close("decode", out[:5], expected[:5], atol, rtol)
    assert torch.equal(out[5], torch.zeros_like(out[5])), "padding row is not zero"


def check_sampling(candidates: int) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.sampling import sample_tokens

    torch.manual_seed(0)
    # (temperature, top_k, top_p, min_p): greedy, plain, top-k, top-p, top-k + top-p,
    # min-p, all three, k = 1, p = 0, k >= V; three rows each (flat to peaked logits, so
    # that a wrong cut changes the winner), fresh noise per row.
    settings = torch.tensor([[0.0, 0, 1.0, 0.0], [1.0, 0, 1.0, 0.0], [0.7, 5, 1.0, 0.0],
                             [1.0, 0, 0.8, 0.0], [1.3, 40, 0.9, 0.0], [1.0, 0, 1.0, 0.05],
                             [2.0, 60, 0.7, 0.01], [1.0, 1, 1.0, 0.0], [1.0, 0, 0.0, 0.0],
                             [1.0, 500, 0.95, 0.0]]).repeat(3, 1)
    rows, vocab = settings.shape[0], 300
    logits = torch.randn(rows, vocab) * torch.tensor([0.5, 1.5, 4.0]).repeat_interleave(10)[:, None]
    logits[:, 7] = float("-inf")  # a banned token
    temperature, top_k, top_p, min_p = settings.unbind(1)
    seeds = torch.randint(-2**62, 2**62, (rows,))
    steps = torch.randint(0, 10_000, (rows,))
    args = (logits, temperature, top_k.long(), top_p, min_p, seeds, steps)
    theta = torch.full((rows,), float("nan"))
    out = sample_tokens(*args, candidates=candidates, block_v=128, theta_out=theta)
    expected = ref.sample_tokens(*args)
    assert torch.equal(out, expected), (out.tolist(), expected.tolist())
    # The kept sets themselves, not just the winners.
    sampled = temperature > 0
    c = torch.tensor(1.4426950408889634) / temperature[sampled, None]
    y = (logits[sampled].amax(-1, keepdim=True) - logits[sampled]) * c
    probs = torch.softmax(logits[sampled] / temperature[sampled, None], dim=-1)
    kept = (y <= theta[sampled, None]) & (torch.exp2(-y) >= min_p[sampled, None])
    kept &= probs > 0  # zero-probability (banned) tokens can never win anyway
    ref_kept = ref.filter_probs(probs, top_k[sampled].long(), top_p[sampled],
                                min_p[sampled]) > 0
    mismatch = (kept != ref_kept).sum(-1)
    assert not mismatch.any(), (mismatch.tolist(), kept.sum(-1).tolist())


def check_greedy(dtype: torch.dtype, vocab: int, chunk: int) -> None:
    """kiln.kernels.sampling.greedy_tokens = torch.argmax: random rows, equal maxima in
    several chunks (the first wins), an all -inf row (index 0), a NaN (taken as largest)."""
    from kiln.kernels.sampling import greedy_tokens

    torch.manual_seed(vocab)
    logits = (torch.randn(7, vocab) * 3).to(dtype)
    logits[1, :] = 1.0  # all equal: 0
    logits[2, vocab // 3] = logits[2, vocab - 1] = 50.0  # tie across chunks: the first
    logits[3, :] = float("-inf")
    logits[4, vocab - 1] = 60.0  # the last index, in the ragged last chunk
    logits[5, vocab // 2] = float("nan")
    got = greedy_tokens(logits, chunk=chunk)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1)), (got.tolist(), logits.argmax(-1).tolist())
    assert got[2].item() == vocab // 3 and got[3].item() == 0 and got[5].item() == vocab // 2


def check_functional_dispatch() -> None:
    """The CUDA branch of kiln.functional (kernels fed from AttentionMetadata)."""
    from kiln import functional as KF
    from kiln.kernels import reference as ref
    from kiln.layers.attention import AttentionMetadata

    seq_lens, q_lens = [5, 40, 17], [5, 3, 1]
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, 4, 2, 32,
                                                       torch.float32)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, 0.2)
    decode_expected = ref.paged_attention(q[:3], k_cache, v_cache, tables, [0, 1, 2, 3],
                                          seq_lens, 0.2)
    KF._triton = lambda x: True  # CPU tensors, kernels interpreted (this worker only)
    for lens in (q_lens, [1, 1, 1]):
        qs = [0, *torch.tensor(lens).cumsum(0).tolist()]
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(qs[-1], dtype=torch.int64), block_tables=tables,
            seq_lens=torch.tensor(seq_lens).int(), query_start_loc=torch.tensor(qs).int(),
            query_starts_host=qs, seq_lens_host=seq_lens, max_query_len=max(lens),
            max_seq_len=max(seq_lens))
        out = KF.paged_attention(q[:qs[-1]], k_cache, v_cache, meta, 0.2)
        _close("functional", out, expected if lens == q_lens else decode_expected, 1e-5, 1e-5)
    x = torch.randn(3, 64)
    _close("functional rms", KF.rms_norm(x, torch.ones(64), 1e-6),
           ref.rms_norm(x, torch.ones(64), 1e-6), 1e-5, 1e-5)


def check_fused_moe(dtype: torch.dtype, atol: float, rtol: float, tokens: int, experts: int,
                    top_k: int, block_m: int | None) -> None:
    from kiln.kernels import reference as ref
    from kiln.kernels.moe import align_by_expert, fused_moe

    torch.manual_seed(0)
    hidden, inter = 48, 40  # not multiples of the tiles
    x = torch.randn(tokens, hidden, dtype=dtype)
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.2
    w2 = torch.randn(experts, hidden, inter, dtype=dtype) * 0.2
    weights, ids = ref.moe_route(torch.randn(tokens, experts), top_k, renormalize=False)
    ids[0] = torch.arange(top_k)  # at least one expert with a single pair, one unused
    _close("fused_moe", fused_moe(x, w13, w2, weights, ids, block_m=block_m),
           ref.fused_moe(x, w13, w2, weights, ids), atol, rtol)
    # Every pair sits exactly once in a block of its expert.
    sorted_pairs, block_experts = align_by_expert(ids, experts, 16)
    rows = sorted_pairs.view(-1, 16)
    for block, expert in zip(rows, block_experts.tolist()):
        real = block[block < tokens * top_k].long()
        assert expert < experts or real.numel() == 0
        assert (ids.reshape(-1)[real] == expert).all()
    assert sorted(sorted_pairs[sorted_pairs < tokens * top_k].tolist()) == \
        list(range(tokens * top_k))


# ---- tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol,rtol", [F32, BF16, F16])
@pytest.mark.parametrize("shape", [(5, 123), (3, 4, 32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(interp, dtype, atol, rtol, shape, with_residual) -> None:
    interp(check_rms_norm, dtype, atol, rtol, shape, with_residual)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, BF16])
def test_silu_and_mul(interp, dtype, atol, rtol) -> None:
    interp(check_silu_mul, dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, ROT_BF16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (3, 3, 32), (2, 1, 40)])
def test_rotary_and_write_kv(interp, dtype, atol, rtol, heads, kv_heads, head_dim) -> None:
    interp(check_rotary_kv, dtype, atol, rtol, heads, kv_heads, head_dim)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, ROT_BF16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(40, 16), (20, 6), (32, 0)],
                         ids=["neox", "phi-odd-half", "learned-positions"])
def test_partial_rotary_and_write_kv(interp, dtype, atol, rtol, head_dim, rotary_dim) -> None:
    """Partial rotary (GPT-NeoX, Phi): the first rotary_dim dims rotate, the rest are
    copied; rotary_dim 0 (GPT-2) only writes the cache."""
    interp(check_rotary_kv, dtype, atol, rtol, 4, 2, head_dim, rotary_dim)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (3, 3, 32), (6, 2, 40)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (None, None)])
def test_prefill_attention(interp, dtype, atol, rtol, heads, kv_heads, head_dim, block_m,
                           block_n) -> None:
    interp(check_prefill, dtype, atol, rtol, heads, kv_heads, head_dim, block_m, block_n)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (3, 3, 32)])
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_decode_attention(interp, dtype, atol, rtol, heads, kv_heads, head_dim,
                          num_splits) -> None:
    interp(check_decode, dtype, atol, rtol, heads, kv_heads, head_dim, num_splits)


# Windows shorter than a tile, between tiles, longer than some contexts; caps that bend
# the random scores (|s| up to ~4).
@pytest.mark.parametrize("window,softcap", [(5, None), (37, None), (None, 1.5), (20, 2.0)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (None, None)])
def test_prefill_attention_window_softcap(interp, window, softcap, block_m, block_n) -> None:
    interp(check_prefill, *F32, 6, 2, 32, block_m, block_n, window, softcap)


@pytest.mark.parametrize("window,softcap", [(5, None), (37, None), (None, 1.5), (20, 2.0)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_window_softcap(interp, window, softcap, num_splits) -> None:
    interp(check_decode, *F32, 6, 2, 32, num_splits, window, softcap)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("num_splits,window", [(4, None), (8, None), (4, 20)])
def test_decode_attention_fused_reduce(interp, dtype, atol, rtol, num_splits, window) -> None:
    """The splits combined by the last of them in the decode kernel
    (KILN_DECODE_FUSED_REDUCE): contexts with every split, some and none (the padding row)
    covered, a window, against the reference; the arrival counters are left zeroed."""
    interp(check_decode_fused, dtype, atol, rtol, num_splits, window)


def check_decode_fused(dtype: torch.dtype, atol: float, rtol: float, num_splits: int,
                       window: int | None) -> None:
    from kiln.kernels.split_k import split_k_counters

    check_decode(dtype, atol, rtol, 8, 2, 64, num_splits, window, fused_reduce=True)
    assert not split_k_counters(torch.device("cpu"), 12).any()


# Several KV heads a program (attention_decode_heads): one loop over (head, tile), the
# softmax restarted at each head, contexts of 1-123 tokens over 16-key tiles and a padding
# row; with and without the blocks loaded a tile ahead, windows and caps.
@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("heads_per_program,window,softcap", [
    (2, None, None), (4, None, None), (4, 37, None), (2, 5, 1.5)])
def test_decode_attention_heads_per_program(interp, dtype, atol, rtol, heads_per_program,
                                            window, softcap) -> None:
    interp(check_decode, dtype, atol, rtol, 8, 4, 32, None, window, softcap,
           heads_per_program=heads_per_program)


# ALiBi: 6 heads (not a power of two: Bloom's extra slopes), MQA and MHA groups.
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (6, 6), (4, 1)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (None, None)])
def test_prefill_attention_alibi(interp, heads, kv_heads, block_m, block_n) -> None:
    interp(check_prefill, *F32, heads, kv_heads, 32, block_m, block_n, None, None, True)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (6, 6), (4, 1)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_alibi(interp, heads, kv_heads, num_splits) -> None:
    interp(check_decode, *F32, heads, kv_heads, 32, num_splits, None, None, True)


# Attention sinks: keys cached before rotary, rotated at their index as the kernels read them.
@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (None, None)])
def test_prefill_attention_key_rotary(interp, dtype, atol, rtol, block_m, block_n) -> None:
    interp(check_prefill, dtype, atol, rtol, 6, 2, 32, block_m, block_n, None, None, False,
           True)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_key_rotary(interp, num_splits) -> None:
    interp(check_decode, *F32, 6, 2, 32, num_splits, None, None, False, True)


def test_rotary_and_write_kv_unrotated_keys(interp) -> None:
    interp(check_rotary_kv, *F32, 4, 2, 32, None, False)


@pytest.mark.parametrize("dtype,atol,rtol", [F32, F16])
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 4, 2, None), (37, 8, 2, 16),
                                                          (20, 6, 3, None)])
def test_fused_moe(interp, dtype, atol, rtol, tokens, experts, top_k, block_m) -> None:
    """Grouped GEMMs over expert-sorted pairs vs the per-expert loop (more experts than
    top-k, a decode-sized batch, a prefill-sized one)."""
    interp(check_fused_moe, dtype, atol, rtol, tokens, experts, top_k, block_m)


def test_uniform_noise_is_strictly_inside_0_1() -> None:
    """u == 1 would make E = -log(u) = 0: p / 0 = inf, or NaN (which argmax picks) for a
    filtered-out token. The float32 noise must never round to 1 (nor reach 0)."""
    from kiln.kernels.reference import uniform_noise

    # Seed 407, step 0, token 108031 hashes to the largest 24-bit value: 1 with 24 bits.
    u = uniform_noise(torch.tensor([407, -3, 1 << 62]), torch.tensor([0, 5, 9]), 1 << 17)
    assert 0 < u.min().item() and u.max().item() < 1
    assert (-torch.log(u)).min().item() > 0


@pytest.mark.parametrize("candidates", [4096, 16], ids=["candidate-list", "whole-row"])
def test_sample_tokens_matches_reference(interp, candidates) -> None:
    interp(check_sampling, candidates)


@pytest.mark.parametrize("dtype,vocab,chunk", [(torch.float32, 1000, 256),
                                               (torch.bfloat16, 300, 64),
                                               (torch.float32, 100, 4096)])
def test_greedy_tokens_match_torch_argmax(interp, dtype, vocab, chunk) -> None:
    interp(check_greedy, dtype, vocab, chunk)


def test_functional_dispatch(interp) -> None:
    interp(check_functional_dispatch)


def test_kernels_compile_for_hopper() -> None:
    """Every launch configuration compiles for sm_90 (no GPU needed) into the code we mean:
    no local-memory spills on the hot kernels, 16-byte loads, tensor-core dots."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels.compile_check import reports

    found = {(r.kernel, r.variant): r for r in reports()}
    for (kernel, variant), r in found.items():
        # capped at 168 registers (KILN_KV8_DECODE_MAXNREG) the e4m3-cache decode kernel
        # spills, outside its main loop; under Triton 3.6 (the device's) so do the 16-bit
        # one with keys rotated as read (attention sinks: 16 bytes) and the int8 one on the
        # usual V layout (8 bytes), neither in its loop (compile_check.main_loop_sass)
        allowed = {"sample_kernel": 64}.get(kernel, {"fp8kv maxnreg=168": 256, "sinks": 16,
                                                     "int8kv": 8}.get(variant, 0))
        assert r.stack_bytes <= allowed, (kernel, variant, r)
        # 16-byte loads, or async copies for pipelined GEMMs (the MoE kernel); greedy's
        # merge reads 32 values a row, one a thread
        assert r.instructions["ld.global.v4"] + r.instructions["cp.async"] > 0 or \
            kernel == "argmax_merge_kernel", (kernel, variant, r)
    assert found[("prefill_kernel", "BLOCK_M=128")].instructions["wgmma.mma_async"] > 0
    for variant in ("TMA bs=64", "fp8kv TMA bs=64"):  # K / V tiles by TMA (paged_tma)
        assert found[("prefill_kernel", variant)].instructions["cp.async.bulk"] > 0
    assert found[("decode_kernel", "splits=32")].instructions["mma.sync"] > 0
    assert found[("decode_kernel", "fp8kv maxnreg=168")].registers <= 168  # the cap holds
    assert found[("decode_kernel", "fused reduce PDL")].instructions["griddepcontrol"] == 2
    assert found[("moe_gemm_kernel", "")].instructions["wgmma.mma_async"] > 0
    assert found[("moe_gemm_kernel", "fp8")].instructions["wgmma.mma_async"] > 0
    for variant in ("6144x4096", "4096x14336", "PDL", "GLU", "ROPE"):  # swapped bf16 GEMV
        assert found[("gemv_swap_kernel", variant)].instructions["wgmma.mma_async"] > 0
    # launched with PDL: griddepcontrol.wait, then launch_dependents
    assert found[("gemv_swap_kernel", "PDL")].instructions["griddepcontrol"] >= 2
    assert found[("gemv_swap_kernel", "6144x4096")].instructions["griddepcontrol"] == 0


@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "alibi", "fp8"])
def test_batched_decode_reference_equals_per_sequence(feature):
    """The CPU decode path (all sequences in one padded product) gives the per-sequence
    loop's results, with NaN in unwritten cache memory (torch.empty) left out."""
    from kiln.kernels import reference as ref

    torch.manual_seed(0)
    heads, kv_heads, d, bs = 8, 2, 16, 4
    seq_lens = [1, 7, 13, 4, 20]
    blocks = [-(-n // bs) for n in seq_lens]
    cache = torch.full((sum(blocks) + 3, bs, kv_heads, d), float("nan"))
    k_cache, v_cache = cache.clone(), cache.clone()
    table = torch.zeros(len(seq_lens), max(blocks) + 1, dtype=torch.int32)
    order = torch.randperm(sum(blocks) + 3)
    for i, (n, used) in enumerate(zip(seq_lens, blocks)):
        ids, order = order[:used], order[used:]
        table[i, :used] = ids
        for p in range(n):  # only the written slots hold numbers
            k_cache[ids[p // bs], p % bs] = torch.randn(kv_heads, d)
            v_cache[ids[p // bs], p % bs] = torch.randn(kv_heads, d)
    scales = {}
    if feature == "fp8":
        scales = dict(k_scale=torch.rand(kv_heads) + 0.5, v_scale=torch.rand(kv_heads) + 0.5)
        k_cache = (k_cache / scales["k_scale"].view(-1, 1)).to(ref.FP8)
        v_cache = (v_cache / scales["v_scale"].view(-1, 1)).to(ref.FP8)
    extra = {"window": dict(sliding_window=5), "softcap": dict(softcap=2.0),
             "alibi": dict(alibi_slopes=ref.alibi_slopes(heads))}.get(feature, {})
    q = torch.randn(len(seq_lens), heads, d)
    got = ref.paged_attention_decode(q, k_cache, v_cache, table, seq_lens, d ** -0.5,
                                     **scales, **extra)
    want = ref.paged_attention(q, k_cache, v_cache, table, list(range(len(seq_lens) + 1)),
                               seq_lens, d ** -0.5, **scales, **extra)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A pool with numbers everywhere (the CPU runtime's, zeroed when allocated, then
    # written): kv_finite skips zeroing the gathered padding, same results.
    for c in (k_cache, v_cache):
        c.copy_(torch.nan_to_num(c.float(), nan=3.0).to(c.dtype))
    got = ref.paged_attention_decode(q, k_cache, v_cache, table, seq_lens, d ** -0.5,
                                     **scales, **extra, kv_finite=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_linears_prepacked_for_onednn(tiny_engines, monkeypatch):
    """A CPU engine's float32 linears (and the LM head) carry a oneDNN packing that gives
    the plain product's results; KILN_CPU_PACK=0 leaves them plain."""
    from kiln import functional as KF
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    packed = [m for m in engine.runner.model.modules() if hasattr(m, "packed_weight")]
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert len(packed) == 4 * engine.config.model.num_layers + 1  # qkv, o, gate_up, down, head
    x = torch.randn(5, packed[0].weight.shape[1])
    torch.testing.assert_close(KF.linear(x, packed[0].weight, None, packed[0].packed_weight),
                               x @ packed[0].weight.T, atol=1e-5, rtol=1e-5)
    tokens = list(range(3, 40))
    got = sequence_logits(engine, tokens)
    monkeypatch.setenv("KILN_CPU_PACK", "0")
    plain = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    assert not any(hasattr(m, "packed_weight") for m in plain.runner.model.modules())
    torch.testing.assert_close(got, sequence_logits(plain, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
def test_cpu_linear_takes_the_packed_weight_from_four_rows(rows, monkeypatch):
    """Decode of 1-3 sequences reads the plain weight (MKL's GEMV is faster there), more rows
    the oneDNN packing; the same product either way."""
    from kiln import functional as KF

    if KF.pack_cpu_weight(torch.randn(8, 4)) is None:
        pytest.skip("this torch has no oneDNN packing")
    w, x = torch.randn(48, 32), torch.randn(rows, 32)
    calls = []
    plain = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a, **k: calls.append(1) or plain(*a, **k))
    got = KF.linear(x, w, None, KF.pack_cpu_weight(w))
    torch.testing.assert_close(got, x @ w.T, atol=1e-5, rtol=1e-5)
    assert bool(calls) == (rows < KF.PACKED_MIN_ROWS) and KF.PACKED_MIN_ROWS == 4


def test_cpu_kv_writes_keep_the_pool_finite():
    """kv_finite (the CPU runtime's zeroed pool): a request whose K/V overflow writes
    finite numbers, so another request's padded gather over that block stays finite.
    Written as 0: the float32 max that nan_to_num writes for inf, times a query of 4,
    overflowed to an inf score that the padding mask turned into NaN (a quarter of random
    queries did: the test passed or failed with the global RNG state earlier tests left)."""
    from kiln.kernels import reference as ref

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs = 4, 2, 8, 4
    k_cache, v_cache = torch.zeros(2, 4, bs, kv_heads, d).unbind(0)
    cos_sin = torch.cat([torch.ones(16, d // 2), torch.zeros(16, d // 2)], -1)
    q, k, v = (torch.randn(2, n * d, generator=gen) for n in (heads, kv_heads, kv_heads))
    k[0, 0], k[0, d], v[1, 3] = float("inf"), float("-inf"), float("nan")
    slots = torch.tensor([5, 6])
    ref.rotary_and_write_kv(q, k, v, torch.tensor([0, 1]), cos_sin, k_cache, v_cache, slots, d,
                            kv_finite=True)
    assert k_cache.isfinite().all() and v_cache.isfinite().all()
    assert k_cache.view(-1, kv_heads, d)[6].equal(k[1].view(kv_heads, d))  # the rest as is
    # Sequence 0 (3 tokens, block 0) is padded to sequence 1's 6 tokens with block 1, the
    # overflowed request's: its padding is gathered unzeroed, and its output stays finite,
    # whatever the query (+4 and -4 on the overflowed dims: inf scores either way).
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    for sign in (1.0, -1.0):
        query = torch.randn(2, heads, d, generator=gen)
        query[:, :, 0] = 4.0 * sign
        out = ref.paged_attention_decode(query, k_cache, v_cache, table, [3, 6], d ** -0.5,
                                         kv_finite=True)
        assert out.isfinite().all(), sign


def check_decode_long_tiles() -> None:
    from kiln.kernels import attention_decode
    from kiln.kernels import reference as ref

    seq_lens = [5, 2040]  # 2 splits of a 16k engine: 1,024 keys each at most
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, [1, 1], 4, 2, 32,
                                                       torch.float16)
    before, attention_decode.LONG_TILES = attention_decode.LONG_TILES, True  # restored
    try:
        out = attention_decode.paged_attention_decode(
            q, k_cache, v_cache, tables, torch.tensor(seq_lens).int(), 32 ** -0.5,
            num_splits=2, max_seq_len=16384)
    finally:
        attention_decode.LONG_TILES = before
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens,
                                   32 ** -0.5)
    _close("decode, 128-key tiles", out, expected, *F16[1:])


def test_decode_long_tiles(interp, monkeypatch) -> None:
    """16-bit caches whose splits can get >= 1024 keys in an engine of >= 16k tokens take
    128-key tiles, 3 stages, 4 warps (1-byte caches, shorter splits and shorter engines
    keep theirs; KILN_DECODE_LONG_TILES=0: never), and the kernel at that launch matches
    the reference over a 2,040-token context."""
    from kiln.kernels import attention_decode

    cfg = attention_decode.decode_config
    monkeypatch.setattr(attention_decode, "LONG_TILES", False)
    assert cfg(torch.bfloat16, 128, split_tokens=1024, context=32768) == (64, 2, 4, 0)
    monkeypatch.setattr(attention_decode, "LONG_TILES", True)
    assert cfg(torch.bfloat16, 128, split_tokens=1024, context=32768) == (128, 3, 4, 0)
    assert cfg(torch.float16, 128, split_tokens=4096, context=16384) == (128, 3, 4, 0)
    assert cfg(torch.bfloat16, 128, split_tokens=1024, context=8192) == (64, 2, 4, 0)
    assert cfg(torch.bfloat16, 128, split_tokens=1023, context=32736) == (64, 2, 4, 0)
    assert cfg(torch.bfloat16, 128, context=32768) == (64, 2, 4, 0)  # one split
    assert cfg(torch.int8, 128, split_tokens=4096, context=32768) == (64, 2, 4, 0)  # 1 byte
    interp(check_decode_long_tiles)


def test_decode_max_splits_setting() -> None:
    """KILN_DECODE_MAX_SPLITS: 32 unless set, another power of two, else one clear error."""
    from kiln.kernels.attention_decode import _max_splits

    assert _max_splits("") == 32 and _max_splits("64") == 64
    for bad in ("48", "0", "512", "x"):
        with pytest.raises(ValueError, match="a power of two from 1 to 256"):
            _max_splits(bad)
