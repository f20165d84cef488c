"""Decode attention over an e4m3 cache with e4m3 products (kiln.kernels
.attention_decode_fp8mma, opt-in KILN_DECODE_FP8_MMA): against float32 attention over the
dequantized cache and kiln's converting kernel (interpreter), its splits, its dispatch
from paged_attention_decode, its knobs; on a GPU at Llama-3.1-8B's head shapes."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401
from tests.test_v_transposed import shuffled_tables

BLOCK = 16


def make_case(lens: list[int], heads: int, kv_heads: int, head_dim: int, device: str = "cpu",
              seed: int = 0):
    """q (float32 on the CPU, bf16 on a GPU), an e4m3 K cache and V in both layouts (stale
    finite values in every slot, as a pool holds), tables, lens, per-KV-head scales."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tables, num_blocks = shuffled_tables(lens, BLOCK)
    tables = tables.to(device)
    k, v = ((torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen, device=device)
             * 100).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in "kv")
    q = torch.randn(len(lens), heads, head_dim, generator=gen, device=device)
    q[:, 1] *= 3.0  # heads of different ranges
    if device != "cpu":
        q = q.to(torch.bfloat16)
    scales = dict(k_scale=torch.rand(kv_heads, generator=gen, device=device) * 0.02 + 0.005,
                  v_scale=torch.rand(kv_heads, generator=gen, device=device) * 0.02 + 0.005)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, v.permute(0, 2, 3, 1).contiguous(), tables, lens_t, scales


def reference(q, k, v, tables, lens, scale, k_scale, v_scale) -> torch.Tensor:
    """float32 attention over the dequantized cache (empty sequences: zeros)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[2]
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n, device=q.device)
        blocks, slots = tables[i, pos // BLOCK].long(), pos % BLOCK
        kk = (k[blocks, slots].float() * k_scale[:, None]).repeat_interleave(group, 1)
        vv = (v[blocks, slots].float() * v_scale[:, None]).repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), kk) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), vv)
    return out


def check_accuracy(split: bool, num_splits: int, launch: tuple[int, int, int]) -> float:
    """The kernel's error relative to max |ref|, with kiln's converting kernel's beside it
    (returned: the ratio of the two)."""
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_decode_fp8mma import fp8mma_decode

    lens = [40, 200, 0, 129, 7]
    q, k, v, v_t, tables, lens_t, scales = make_case(lens, 8, 2, 32)
    scale = 32 ** -0.5
    ref = reference(q, k, v, tables, lens_t, scale, **scales)
    out = torch.full_like(q, float("nan"))
    fp8mma_decode(q, k, v_t, tables, lens_t, scale, scales["k_scale"], scales["v_scale"], out,
                  num_splits, split=split, launch=launch)
    kiln = paged_attention_decode(q, k, v, tables, lens_t, scale, num_splits=1, **scales)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # the empty sequence
    size = ref.abs().max()
    err, kiln_err = ((out - ref).abs().max() / size).item(), \
        ((kiln - ref).abs().max() / size).item()
    assert kiln_err < 1e-3, kiln_err  # float32 q: kiln's kernel converts exactly
    assert err < (2e-2 if split else 0.2), (err, kiln_err)
    return err


@pytest.mark.parametrize("num_splits,launch", [(1, (64, 4, 2)), (1, (128, 4, 2)),
                                               (2, (64, 4, 2))])
def test_hi_lo_terms_bring_the_error_down(interp, num_splits, launch) -> None:  # noqa: F811
    """q and p as one e4m3 term each err by percents; as a value and its rounding error,
    by a few tenths of a percent; splits of the context through the reduce agree."""
    split_err = interp(check_accuracy, True, num_splits, launch)
    one_term_err = interp(check_accuracy, False, num_splits, launch)
    assert split_err * 4 < one_term_err, (split_err, one_term_err)


def check_dispatch() -> None:
    """paged_attention_decode takes the e4m3-product kernel for an e4m3 cache on the
    transposed layout when KILN_DECODE_FP8_MMA is on and no launch is asked for."""
    from kiln.kernels import attention_decode_fp8mma as fp8mma
    from kiln.kernels.attention_decode import paged_attention_decode

    q, k, v, v_t, tables, lens_t, scales = make_case([33, 90], 8, 2, 32, seed=1)
    args = (q, k, v_t, tables, lens_t, 0.2)
    direct = fp8mma.fp8mma_decode(*args, scales["k_scale"], scales["v_scale"],
                                  torch.empty_like(q), 1)
    fp8mma.MODE = "0"
    converting = paged_attention_decode(*args, num_splits=1, **scales)
    tol = 1e-5 * converting.abs().max().item()
    assert not torch.allclose(converting, direct, atol=tol, rtol=0)
    fp8mma.MODE = "1"
    assert torch.equal(paged_attention_decode(*args, num_splits=1, **scales), direct)
    # a launch asked for, or the usual layout: the converting kernel
    for got in (paged_attention_decode(*args, num_splits=1, block_n=64, **scales),
                paged_attention_decode(q, k, v, tables, lens_t, 0.2, num_splits=1, **scales)):
        assert torch.allclose(got, converting, atol=tol, rtol=0)
    fp8mma.MODE = "nosplit"
    one_term = paged_attention_decode(*args, num_splits=1, **scales)
    assert not torch.equal(one_term, direct)
    assert (one_term - direct).abs().max() < 0.2 * direct.abs().max()
    fp8mma.MODE = "0"


def test_dispatch(interp) -> None:  # noqa: F811
    interp(check_dispatch)


def test_knobs_and_eligibility() -> None:
    from kiln.kernels import attention_decode_fp8mma as fp8mma

    with pytest.raises(ValueError, match="expected 0, 1 or nosplit"):
        fp8mma._mode("yes")
    with pytest.raises(ValueError, match="BLOCK_N,WARPS,STAGES"):
        fp8mma._launch("128,4")
    with pytest.raises(ValueError, match="BLOCK_N 64, 128 or 256"):
        fp8mma._launch("96,4,2")
    assert fp8mma._launch("64,8,3") == (64, 8, 3)
    q = torch.zeros(2, 8, 128)
    e4m3 = torch.zeros(5, BLOCK, 2, 128, dtype=torch.float8_e4m3fn)
    ok = (q, e4m3, True, 4, None, None, None, None)
    assert fp8mma.fp8mma_applies(*ok)
    assert not fp8mma.fp8mma_applies(q, e4m3, False, *ok[3:])  # the usual V layout
    assert not fp8mma.fp8mma_applies(q, e4m3.view(torch.int8), *ok[2:])
    assert not fp8mma.fp8mma_applies(*ok[:4], 4096, None, None, None)  # a window
    assert not fp8mma.fp8mma_applies(*ok[:5], 30.0, None, None)  # a softcap
    assert not fp8mma.fp8mma_applies(q, e4m3, True, 32, *ok[4:])  # 32 heads a KV head
    assert not fp8mma.fp8mma_applies(torch.zeros(2, 8, 96), e4m3[..., :96], *ok[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() < (8, 9),
                    reason="e4m3 products need an sm_89+ GPU")
@pytest.mark.parametrize("lens", [[1536] * 64, [256, 17, 1000, 0, 129] * 8])
def test_gpu_matches_the_converting_kernel(lens) -> None:
    """Llama-3.1-8B heads (32 / 8, d 128), bf16 q: within kiln's own error of float32
    attention, every launch the knob offers, one split and four."""
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_decode_fp8mma import fp8mma_decode

    q, k, v, v_t, tables, lens_t, scales = make_case(lens, 32, 8, 128, "cuda")
    scale = 128 ** -0.5
    ref = reference(q, k, v, tables, lens_t, scale, **scales)
    size = ref.abs().max()
    kiln_err = (paged_attention_decode(q, k, v_t, tables, lens_t, scale, num_splits=1,
                                       **scales).float() - ref).abs().max() / size
    for launch in ((64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 8, 2)):
        for num_splits in (1, 4):
            out = fp8mma_decode(q, k, v_t, tables, lens_t, scale, scales["k_scale"],
                                scales["v_scale"], torch.empty_like(q), num_splits,
                                launch=launch).float()
            err = (out - ref).abs().max() / size
            assert err < max(2 * kiln_err, 8e-3), (launch, num_splits, err, kiln_err)
