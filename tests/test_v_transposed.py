"""V stored transposed inside each KV block (KILN_KV_V_TRANSPOSED, kiln.kernels.paged
.v_transposed): the write kernel puts every value where the usual layout has it, permuted,
and the decode, several-heads, prefill and mixed launches read the same attention from it
(interpreter), for e4m3, int8 and float32 caches, full and partial rotary."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import interp  # noqa: F401

KV_HEADS, HEADS, HEAD_DIM, BLOCK = 2, 8, 32, 16
LENS = [40, 17, 64]


def shuffled_tables(lens: list[int], block: int) -> tuple[torch.Tensor, int]:
    """(block tables of sequences of `lens` tokens over shuffled physical blocks, pool
    size with two blocks no sequence owns)."""
    per_seq = [-(-n // block) for n in lens]
    num_blocks = sum(per_seq) + 2
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    for i, used in enumerate(per_seq):
        tables[i, :used], order = order[:used], order[used:]
    return tables, num_blocks


def check_v_transposed(cache_dtype: torch.dtype, rotary_dim: int) -> None:
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_prefill import paged_attention_mixed, paged_attention_prefill
    from kiln.kernels.rotary_kv import rotary_and_write_kv

    torch.manual_seed(0)
    tables, num_blocks = shuffled_tables(LENS, BLOCK)
    positions = torch.cat([torch.arange(n) for n in LENS])
    slots = torch.cat([tables[i, torch.arange(n) // BLOCK].long() * BLOCK + torch.arange(n)
                       % BLOCK for i, n in enumerate(LENS)])
    tokens = len(positions)
    q = torch.randn(tokens, HEADS * HEAD_DIM)
    k, v = torch.randn(tokens, KV_HEADS * HEAD_DIM), torch.randn(tokens, KV_HEADS * HEAD_DIM)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.arange(128).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    scales = {}
    if cache_dtype.itemsize == 1:
        scales = dict(k_scale=torch.full((KV_HEADS,), 0.03), v_scale=torch.full((KV_HEADS,), 0.02))
    # stale (finite) values everywhere, as a pool holds after earlier requests: the usual
    # kernels mask keys past a context, the transposed read multiplies them by p = 0
    usual = [(torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM) * 20).to(cache_dtype)
             for _ in range(2)]
    k_t = usual[0].clone()
    v_t = usual[1].permute(0, 2, 3, 1).contiguous()
    q_rot = rotary_and_write_kv(q, k, v, positions, cos_sin, *usual, slots, HEAD_DIM,
                                **scales)
    rotary_and_write_kv(q, k, v, positions, cos_sin, k_t, v_t, slots, HEAD_DIM, **scales)

    def bits(x: torch.Tensor) -> torch.Tensor:
        return x.view(torch.uint8) if x.element_size() == 1 else x

    assert torch.equal(bits(k_t), bits(usual[0]))
    assert torch.equal(bits(v_t.permute(0, 3, 1, 2)), bits(usual[1]))
    assert not torch.equal(bits(usual[1][tables[1, 0]]), bits(v_t[tables[1, 0]]))  # laid out
    q3 = q_rot.view(tokens, HEADS, HEAD_DIM)
    lens = torch.tensor(LENS, dtype=torch.int32)
    starts = torch.tensor([0] + list(torch.tensor(LENS).cumsum(0)), dtype=torch.int32)
    last = starts[1:].long() - 1
    scale = HEAD_DIM ** -0.5
    cases = {
        "prefill": lambda kc, vc: paged_attention_prefill(q3, kc, vc, tables, starts, lens,
                                                          max(LENS), scale, **scales),
        "decode": lambda kc, vc: paged_attention_decode(q3[last], kc, vc, tables, lens, scale,
                                                        num_splits=1, **scales),
        "decode, 2 splits": lambda kc, vc: paged_attention_decode(
            q3[last], kc, vc, tables, lens, scale, num_splits=2, block_n=16, **scales),
        "decode, 2 heads a program": lambda kc, vc: paged_attention_decode(
            q3[last], kc, vc, tables, lens, scale, num_splits=1, heads_per_program=2,
            **scales),
    }
    # a mixed step: sequences 0 and 1 decode their last token, sequence 2 is a prompt
    mixed_q = torch.cat([q3[last[:2]], q3[starts[2]:]])
    mixed_starts = torch.tensor([0, 1, 2, 2 + LENS[2]], dtype=torch.int32)
    cases["mixed"] = lambda kc, vc: paged_attention_mixed(
        mixed_q, kc, vc, tables, mixed_starts, lens, LENS[2], scale, 2, **scales)
    for name, run in cases.items():
        want, got = run(*usual), run(k_t, v_t)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), \
            (name, (got - want).abs().max().item())


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.int8, torch.float32])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2])
def test_v_transposed_cache(interp, cache_dtype, rotary_dim) -> None:  # noqa: F811
    interp(check_v_transposed, cache_dtype, rotary_dim)


def test_cpu_reference_refuses_a_transposed_v_cache() -> None:
    from kiln import functional as KF
    from kiln.layers import AttentionMetadata

    k_cache = torch.zeros(3, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros(3, KV_HEADS, HEAD_DIM, BLOCK)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.int64), block_tables=torch.zeros(1, 1).int(),
        seq_lens=torch.ones(1).int(), query_start_loc=torch.tensor([0, 1]).int(),
        query_starts_host=[0, 1], seq_lens_host=[1], max_query_len=1, max_seq_len=1)
    with pytest.raises(ValueError, match="GPU kernels only"):
        KF.paged_attention(torch.zeros(1, HEADS, HEAD_DIM), k_cache, v_cache, meta, 1.0)


def test_which_layers_transpose_v(tiny_engines, monkeypatch) -> None:
    """KILN_KV_V_TRANSPOSED picks the layers a GPU engine with a 1-byte cache lays out
    transposed: not windowed ones (gemma2 alternates), not unrotated keys (attention
    sinks), not blocks larger than a kernel tile, not other caches or devices."""
    from kiln.runtime import model_runner
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    layers = LLMEngine(tiny_engines["gemma2"], RuntimeConfig(device="cpu")).runner.model \
        .attention_layers()
    cuda, e4m3 = torch.device("cuda"), torch.float8_e4m3fn
    monkeypatch.setattr(model_runner, "V_TRANSPOSED", False)  # KILN_KV_V_TRANSPOSED=0
    assert not any(model_runner.transposes_v(a, e4m3, 16, cuda) for a in layers)
    monkeypatch.setattr(model_runner, "V_TRANSPOSED", True)
    picks = [model_runner.transposes_v(a, e4m3, 16, cuda) for a in layers]
    assert picks == [a.sliding_window is None for a in layers] and any(picks) \
        and not all(picks)
    full = layers[picks.index(True)]
    assert model_runner.transposes_v(full, torch.int8, 16, cuda)
    assert not model_runner.transposes_v(full, torch.bfloat16, 16, cuda)
    assert not model_runner.transposes_v(full, e4m3, 16, torch.device("cpu"))
    assert not model_runner.transposes_v(full, e4m3, 64, cuda)
    monkeypatch.setattr(full, "rotate_keys", True)
    assert not model_runner.transposes_v(full, e4m3, 16, cuda)
