"""Model-zoo kernel features vs the torch reference on a CUDA GPU at real shapes (bf16):
sliding window + soft-capping (Gemma-2-9B), ALiBi (Bloom-7B1), partial rotary (Phi-2,
GPT-2), fused MoE (Mixtral-8x7B).

    pytest -m gpu tests/test_kernels_gpu_zoo.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kiln.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 would run the kernels on the host"),
]

BLOCK_SIZE = 16
ATTN = dict(atol=3e-2, rtol=2e-2)


def _close(name: str, out: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
           max_rel_norm: float = 1e-2) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype, name
    diff = out.float() - expected.float()
    rel = (diff.norm() / expected.float().norm().clamp_min(1e-30)).item()
    assert not out.isnan().any(), f"{name}: NaN"
    assert rel < max_rel_norm, f"{name}: relative error {rel:.2e}"
    assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol), \
        f"{name}: max abs error {diff.abs().max().item():.3e}"


def _paged(seq_lens, q_lens, heads, kv_heads, head_dim, scale_q=1.0):
    blocks = [-(-max(s, 1) // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks) + 8
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device="cuda",
                          dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device="cuda").int()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    for i, used in enumerate(blocks):
        tables[i, :used], order = order[:used], order[used:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", dtype=torch.bfloat16) * scale_q
    return q, k_cache, v_cache, tables, starts


# name: (heads, kv_heads, head_dim, scale, sliding_window, softcap, alibi)
FEATURES = {
    "gemma2-local": (16, 8, 256, 256 ** -0.5, 4096, 50.0, False),
    "gemma2-global": (16, 8, 256, 256 ** -0.5, None, 50.0, False),
    "mistral-window": (32, 8, 128, 128 ** -0.5, 1000, None, False),
    "bloom-alibi": (32, 32, 128, 128 ** -0.5, None, None, True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("seq_lens,q_lens", [
    ([512, 5000, 77, 2048], [512, 5000, 77, 2048]),  # prefill, one longer than the window
    ([6000, 8192, 130, 700], [200, 1, 130, 1]),  # chunked prefill + decode rows
])
def test_prefill_attention_features(feature, seq_lens, q_lens) -> None:
    from kiln.kernels.attention_prefill import paged_attention_prefill

    heads, kv_heads, head_dim, scale, window, softcap, alibi = FEATURES[feature]
    # Larger queries so that soft-capping bends real scores (|s| up to ~60).
    q, k_cache, v_cache, tables, starts = _paged(seq_lens, q_lens, heads, kv_heads, head_dim,
                                                 4.0 if softcap else 1.0)
    slopes = ref.alibi_slopes(heads).cuda() if alibi else None
    out = paged_attention_prefill(
        q, k_cache, v_cache, tables, torch.tensor(starts, device="cuda").int(),
        torch.tensor(seq_lens, device="cuda").int(), max(q_lens), scale,
        sliding_window=window, softcap=softcap, alibi_slopes=slopes)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale,
                                   sliding_window=window, softcap=softcap, alibi_slopes=slopes)
    _close(f"prefill {feature}", out, expected, **ATTN)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_attention_features(feature, batch) -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    heads, kv_heads, head_dim, scale, window, softcap, alibi = FEATURES[feature]
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 8193, (batch,), generator=gen).tolist()
    seq_lens[0] = 8192
    q, k_cache, v_cache, tables, _ = _paged(seq_lens, [1] * batch, heads, kv_heads, head_dim,
                                            4.0 if softcap else 1.0)
    slopes = ref.alibi_slopes(heads).cuda() if alibi else None
    out = paged_attention_decode(q, k_cache, v_cache, tables,
                                 torch.tensor(seq_lens, device="cuda").int(), scale,
                                 sliding_window=window, softcap=softcap, alibi_slopes=slopes)
    expected = ref.paged_attention(q, k_cache, v_cache, tables, list(range(batch + 1)),
                                   seq_lens, scale, sliding_window=window, softcap=softcap,
                                   alibi_slopes=slopes)
    _close(f"decode {feature}", out, expected, **ATTN)


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(32, 32, 80, 32), (12, 12, 64, 0)],
                         ids=["phi-2", "gpt2"])
def test_partial_rotary_and_write_kv(heads, kv_heads, head_dim, rotary_dim) -> None:
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    tokens, max_pos, num_blocks = 2048, 2048, 200
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda",
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    positions = torch.randint(0, max_pos, (tokens,), device="cuda")
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    slots[::97] = -1
    inv = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, device="cuda").float()
                            / max(rotary_dim, 1))
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    caches = [torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device="cuda",
                          dtype=torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q_rot = rotary_and_write_kv(q, k, v, positions, cos_sin, *caches, slots, head_dim)
    ref_q = ref.rotary_and_write_kv(q, k, v, positions, cos_sin, *ref_caches, slots, head_dim)
    _close("q", q_rot, ref_q, atol=2e-2, rtol=1.6e-2)
    _close("k_cache", caches[0], ref_caches[0], atol=2e-2, rtol=1.6e-2)
    assert torch.equal(caches[1], ref_caches[1])


@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_fused_moe_mixtral_shape(tokens) -> None:
    from kiln.kernels.moe import fused_moe

    experts, top_k, hidden, inter = 8, 2, 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16,
                      generator=gen) * 0.02
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16,
                     generator=gen) * 0.02
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    weights, ids = ref.moe_route(logits, top_k, renormalize=True)
    out = fused_moe(x, w13, w2, weights, ids)
    _close_rows("fused_moe", out, _moe_oracle(x, w13, w2, weights, ids))


def _fp8_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] weights as e4m3 with per-row scales [E, N] (FP8Method's storage)."""
    scale = w.float().abs().amax(-1).clamp_min(1e-6) / 448.0
    return (w.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_fused_moe_fp8_mixtral_shape(tokens) -> None:
    """FP8 experts (e4m3 tensor-core GEMMs, inputs quantized per token / per pair) against
    the reference's W8A8 simulation from the same e4m3 weights."""
    from kiln.kernels.moe import fused_moe

    experts, top_k, hidden, inter = 8, 2, 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    w13, s13 = _fp8_experts(torch.randn(experts, 2 * inter, hidden, device="cuda",
                                        generator=gen) * 0.02)
    w2, s2 = _fp8_experts(torch.randn(experts, hidden, inter, device="cuda",
                                      generator=gen) * 0.02)
    weights, ids = ref.moe_route(torch.randn(tokens, experts, device="cuda", generator=gen),
                                 top_k, renormalize=True)
    out = fused_moe(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2)
    expected = ref.fused_moe(x, w13, w2, weights, ids, s13, s2).float()
    rel = (out.float() - expected).norm(dim=-1) / expected.norm(dim=-1)
    # Tiles of 64+ rows run Hopper's wgmma, which sums e4m3 products in reduced precision
    # between the float32 promotions (every 128 of K, as DeepSeek-V3 and DeepGEMM do); its
    # last-bit differences flip some roundings of the bf16 intermediate and of its e4m3
    # quantization. Measured on an H200 at 2048 tokens: median row 4.8e-3, p99 1.8e-2,
    # max 2.9e-2 (with 16-row mma.sync tiles: median 1.5e-4). Quantizing the activations
    # at all moves a row by ~5%; a wrong scale, expert or row by 10-100%.
    assert not out.isnan().any()
    assert rel.median().item() < 1e-2, f"median row {rel.median().item():.2e}"
    assert rel.max().item() < 5e-2, f"worst row {rel.max().item():.2e}"


def _close_rows(name: str, out: torch.Tensor, expected: torch.Tensor) -> None:
    """Every token's output within 2% (relative norm) of the float32 oracle: the kernel
    keeps bf16 intermediates (each expert's output, as transformers does), which puts
    single elements a few ulps off (0.0625 measured at |y| ~ 8), while a wrong expert,
    weight or row would be ~100% off on its row."""
    diff = (out.float() - expected.float()).norm(dim=-1)
    rel = diff / expected.float().norm(dim=-1).clamp_min(1e-30)
    assert not out.isnan().any(), f"{name}: NaN"
    assert rel.max().item() < 2e-2, f"{name}: worst row {rel.max().item():.2e}"


def _moe_oracle(x, w13, w2, weights, ids) -> torch.Tensor:
    """The MoE in float32 from the same bf16 inputs (the bf16 reference rounds each
    expert's output and each partial sum: 2-4 ulps off at Mixtral's shapes)."""
    return ref.fused_moe(x.float(), w13.float(), w2.float(), weights.float(), ids).to(x.dtype)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fused_moe_cuda_graph(fp8) -> None:
    """Captured once, replayed with other routings: no host sync, same sizes."""
    from kiln.kernels.moe import fused_moe

    experts, top_k, hidden, inter, tokens = 8, 2, 1024, 2048, 16
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.05
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.05
    logits = torch.randn(tokens, experts, device="cuda")
    scales = {}
    if fp8:
        (w13, s13), (w2, s2) = _fp8_experts(w13), _fp8_experts(w2)
        scales = dict(w13_scale=s13, w2_scale=s2)

    def step() -> torch.Tensor:
        weights, ids = ref.moe_route(logits, top_k, True)
        return fused_moe(x, w13, w2, weights, ids, **scales)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(3):
        logits.copy_(torch.randn_like(logits) * (trial + 1))
        graph.replay()
        weights, ids = ref.moe_route(logits, top_k, True)
        want = ref.fused_moe(x, w13, w2, weights, ids, scales["w13_scale"],
                             scales["w2_scale"]) if fp8 else _moe_oracle(x, w13, w2, weights, ids)
        _close_rows(f"replay {trial}", out, want)
