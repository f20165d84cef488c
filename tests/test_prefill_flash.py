"""The FlashAttention prompt path (KILN_PREFILL_FLASH=1, kiln.kernels.attention_flash) on
the CPU: its per-step plan (which cache slots each prompt's context gathers, the packed
query / key offsets, sliding windows), 1-byte caches and the split of a mixed step, with a
torch stand-in for the CUDA-only flash op, against the reference paged attention; and
which steps may take it. The flash op itself is checked on a GPU
(tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import attention_flash as flash
from kiln.kernels import reference as ref
from kiln.layers.attention import AttentionMetadata
from tests.test_kernels import _paged_batch

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 16


def varlen_causal(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window, alibi_slopes):
    """What FlashAttention-2 varlen computes (is_causal: the last query of a sequence sees
    its whole context; window (W - 1, 0); ALiBi -slope * distance), one sequence at a
    time in float64."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].double().transpose(0, 1)
        ki = k[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(group, 1).transpose(0, 1)
        vi = v[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(group, 1).transpose(0, 1)
        nq, nk = qi.shape[1], ki.shape[1]
        assert nq <= max_q and nk <= max_k
        row = torch.arange(nq)[:, None] + nk - nq  # each query's own key index
        col = torch.arange(nk)[None, :]
        scores = qi @ ki.transpose(1, 2) * scale
        if alibi_slopes is not None:
            scores = scores - alibi_slopes.double()[:, None, None] * (row - col).abs()
        hidden = col > row
        if sliding_window is not None:
            hidden |= col < row - (sliding_window - 1)
        scores = scores.masked_fill(hidden, float("-inf"))
        out[cu_q[i]:cu_q[i + 1]] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out


def reference_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, **extra):
    assert block_tables.shape[0] == q.shape[0] == seq_lens.shape[0]
    out.copy_(ref.paged_attention(q, k_cache, v_cache, block_tables,
                                  list(range(q.shape[0] + 1)), seq_lens.tolist(), scale,
                                  **extra))


def _meta(tables, starts, seq_lens) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long), block_tables=tables,
        seq_lens=torch.tensor(seq_lens).int(), query_start_loc=torch.tensor(starts).int(),
        query_starts_host=list(starts), seq_lens_host=list(seq_lens),
        max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
        max_seq_len=max(seq_lens))


@pytest.mark.parametrize("window,alibi,cache", [
    (None, False, None), (20, False, None), (None, True, None),
    (None, False, torch.float8_e4m3fn), (20, False, torch.int8)])
@pytest.mark.parametrize("decode_rows", [0, 2])
def test_flash_path_matches_reference(monkeypatch, window, alibi, cache, decode_rows) -> None:
    """cache: a 1-byte cache (gathered, then dequantized as the reference reads it)."""
    monkeypatch.setattr(flash, "_attend", varlen_causal)
    monkeypatch.setattr(flash, "_decode", reference_decode)
    # decode rows first (as the scheduler orders a mixed step), then a fresh prompt, a
    # later chunk over a cached prefix, a one-token prompt and a prompt of a block's length
    seq_lens, q_lens = [40, 17, 1, 33, 70, 16], [1, 1, 1, 33, 25, 16]
    seq_lens, q_lens = seq_lens[2 - decode_rows:], q_lens[2 - decode_rows:]
    q, k_cache, v_cache, tables, starts = _paged_batch(seq_lens, q_lens, HEADS, KV_HEADS,
                                                       HEAD_DIM, torch.float32, block_size=8)
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for i, n in enumerate(seq_lens):  # slots no context owns hold NaN: never gathered
        for t in range(n):
            used[tables[i, t // 8], t % 8] = True
    scales = {}
    if cache is not None:
        scales = dict(k_scale=torch.tensor([0.03, 0.05]), v_scale=torch.tensor([0.02, 0.04]))
        k_cache = (k_cache / scales["k_scale"].view(-1, 1)).clamp(-100, 100).round().to(cache)
        v_cache = (v_cache / scales["v_scale"].view(-1, 1)).clamp(-100, 100).round().to(cache)
    else:
        k_cache[~used], v_cache[~used] = float("nan"), float("nan")
    scale = HEAD_DIM ** -0.5
    slopes = ref.alibi_slopes(HEADS) if alibi else None
    meta = _meta(tables, starts, seq_lens)
    out = torch.full_like(q, float("nan"))
    got = flash.paged_attention_flash(q, k_cache, v_cache, meta, scale, decode_rows, window,
                                      slopes, out=out, **scales)
    assert got is out
    want = ref.paged_attention(q, k_cache, v_cache, tables, starts, seq_lens, scale,
                               sliding_window=window, alibi_slopes=slopes, **scales)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    step = meta.host_cache[("flash_plan", decode_rows, window)]
    # the plan is made once a step: a second layer reuses it
    flash.paged_attention_flash(q, k_cache, v_cache, meta, scale, decode_rows, window, slopes,
                                **scales)
    assert meta.host_cache[("flash_plan", decode_rows, window)] is step
    assert step.cu_q.tolist() == [s - decode_rows for s in starts[decode_rows:]]
    keys = [n - (0 if window is None else max(n - m - window + 1, 0))
            for n, m in zip(seq_lens[decode_rows:], q_lens[decode_rows:])]
    assert step.slots.numel() == sum(keys) and step.max_k == max(keys)


def test_which_steps_take_it(monkeypatch) -> None:
    q, k_cache, v_cache, tables, starts = _paged_batch([30, 12], [30, 4], HEADS, KV_HEADS,
                                                       HEAD_DIM, torch.bfloat16, block_size=8)
    meta = _meta(tables, starts, [30, 12])
    monkeypatch.setattr(flash, "ENABLED", True)
    assert flash.usable(q, k_cache, v_cache, meta)
    assert flash.usable(q, k_cache, v_cache, meta, sliding_window=8,
                        alibi_slopes=ref.alibi_slopes(HEADS))
    for one_byte in (torch.float8_e4m3fn, torch.int8):  # with their scales
        c = k_cache.to(one_byte)
        assert flash.usable(q, c, c, meta, k_scale=torch.ones(KV_HEADS))
        assert not flash.usable(q, c, c, meta)
    assert not flash.usable(q, k_cache.half(), v_cache.half(), meta)  # another 16-bit dtype
    assert not flash.usable(q.float(), k_cache.float(), v_cache.float(), meta)  # float32
    assert not flash.usable(q, k_cache, v_cache, meta, softcap=30.0)
    assert not flash.usable(q, k_cache, v_cache, meta, key_rotary=torch.zeros(64, HEAD_DIM))
    transposed = v_cache.permute(0, 2, 3, 1)  # V laid out [blocks, heads, dim, tokens]
    assert not flash.usable(q, k_cache, transposed, meta)
    captured = _meta(tables, starts, [30, 12])
    captured.query_starts_host, captured.seq_lens_host = [], []  # a graph-captured step
    assert not flash.usable(q, k_cache, v_cache, captured)
    monkeypatch.setattr(flash, "ENABLED", False)
    assert not flash.usable(q, k_cache, v_cache, meta)
