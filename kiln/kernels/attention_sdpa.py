"""Fresh prompts' attention through torch's scaled_dot_product_attention (on by default;
KILN_PREFILL_SDPA=0 turns it off).

On an H200 with torch 2.11, SDPA's default backend for bf16 is cuDNN's attention: 0.99 ms
for an 8k-token causal prompt of Llama-3.1-8B's heads, against 1.49 ms for kiln's paged
Triton kernel and 1.72 ms for FlashAttention-2 (BENCHMARKS.md, 40th session). cuDNN takes
only dense batches here: its varlen form costs ~70 ms a call and aligns the causal mask
top-left, so only prompts with nothing cached before them (query length = context length,
where top-left is the right mask) come this way. Their keys and values are this step's
own: one index_select over the step's slot mapping gathers them from the cache (where the
rotary + KV-write kernel put them, already rotated; 1-byte caches dequantized as the
reference reads them), with no plan to make. Consecutive prompts of one length go in one
batched call, others one call each; decode rows at the head of a mixed step keep the
decode kernel.

The gather and the calls cost a fixed ~0.03 ms a layer (more for 1-byte caches, which are
dequantized on the way), so a step comes here only when its prompts' causal work is worth
it: sqrt(sum of squared prompt lengths) at least MIN_TOKENS (2048; 8192 for 1-byte
caches). Measured on the H200 (41st session, 8B heads, ms a layer, SDPA path / Triton):
bf16 1k 0.055 / 0.046, 2k 0.107 / 0.116, 8k 1.09 / 1.49, 32k 15.3 / 22.6, 16 x 1000
0.41 / 0.55, 64 x 256 0.24 / 0.28; e4m3 1k 0.121 / 0.048, 16 x 1000 0.64 / 0.57, 8k 1.18 /
1.67. A lone prompt's TTFT: 8k 225 -> 211 ms, 32k 1,424 -> 1,202 ms.

Not taken for sliding windows shorter than a prompt of the step, ALiBi, softcap, attention
sinks, V stored transposed (1-byte caches' default layout), float32, graph-captured steps,
chunks over a cached prefix, or steps below the size above: the Triton kernel keeps those.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENABLED = os.environ.get("KILN_PREFILL_SDPA", "1") != "0"
MIN_TOKENS = int(os.environ.get("KILN_PREFILL_SDPA_MIN_TOKENS", "2048"))
MIN_TOKENS_1BYTE = int(os.environ.get("KILN_PREFILL_SDPA_MIN_TOKENS_1BYTE", "8192"))


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
           decode_rows: int = 0, k_scale=None, softcap=None, alibi_slopes=None,
           key_rotary=None, sliding_window=None) -> bool:
    """Whether this step's prompt rows (sequences decode_rows..) can take this path."""
    if not ENABLED or softcap is not None or key_rotary is not None or alibi_slopes is not None:
        return False
    one_byte = k_cache.dtype in (torch.float8_e4m3fn, torch.int8) and k_scale is not None
    if q.dtype not in (torch.float16, torch.bfloat16) or (k_cache.dtype != q.dtype
                                                           and not one_byte):
        return False
    if v_cache.shape != k_cache.shape or not k_cache.is_contiguous():
        return False  # V transposed, or a cache this view cannot flatten
    longest, size = _fresh_prompts(meta, decode_rows)
    if size < (MIN_TOKENS_1BYTE if one_byte else MIN_TOKENS) or (
            sliding_window is not None and longest > sliding_window):
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _fresh_prompts(meta, decode_rows: int) -> tuple[int, float]:
    """(the longest prompt, sqrt of the sum of squared prompt lengths) of sequences
    decode_rows.. when every one of them is whole (nothing cached before it), else (0, 0);
    once a step, not once a layer."""
    key = ("sdpa_prompts", decode_rows)
    found = meta.host_cache.get(key)
    if found is None:
        starts, lens, longest, work = meta.query_starts_host, meta.seq_lens_host, 0, 0
        if lens and len(starts) == len(lens) + 1:  # (graph-captured steps have no copy)
            for i in range(decode_rows, len(lens)):
                new = starts[i + 1] - starts[i]
                if new != lens[i]:  # a chunk over a cached prefix
                    longest = work = 0
                    break
                longest, work = max(longest, new), work + new * new
        found = meta.host_cache[key] = (longest, work ** 0.5)
    return found


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, **common):
    from kiln.kernels.attention_decode import paged_attention_decode

    paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=1,
                           out=out, **common)


def _gather(cache: torch.Tensor, slots: torch.Tensor, cache_scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    values = cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    if cache.dtype == dtype:
        return values
    return (values.float() * cache_scale.view(-1, 1)).to(dtype)


def _groups(starts: list[int], first: int) -> list[tuple[int, int, int]]:
    """(first row, prompts, length) of each run of consecutive prompts of one length, from
    sequence `first` on."""
    runs: list[tuple[int, int, int]] = []
    for i in range(first, len(starts) - 1):
        n = starts[i + 1] - starts[i]
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
        else:
            runs.append((starts[i], 1, n))
    return runs


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta, scale: float, decode_rows: int = 0,
                         out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None,
                         sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention's result for a step (q [T, heads, d]) whose sequences from
    decode_rows on are whole prompts: the first decode_rows rows through the decode
    kernel (with the model's sliding window, which no prompt here is longer than), the
    prompts through SDPA over their own keys and values."""
    if out is None:
        out = torch.empty_like(q)
    if decode_rows:
        _decode(q[:decode_rows], k_cache, v_cache, meta.block_tables[:decode_rows],
                meta.seq_lens[:decode_rows], scale, out[:decode_rows], k_scale=k_scale,
                v_scale=v_scale, sliding_window=sliding_window)
    first = meta.query_starts_host[decode_rows]
    slots = meta.slot_mapping[first:]
    k = _gather(k_cache, slots, k_scale, q.dtype)
    v = _gather(v_cache, slots, v_scale, q.dtype)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    for row, count, n in _groups(meta.query_starts_host, decode_rows):
        end = row + count * n
        qb, kb, vb = (t[a:b].view(count, n, t.shape[1], dim).transpose(1, 2)
                      for t, a, b in ((q, row, end), (k, row - first, end - first),
                                      (v, row - first, end - first)))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                           enable_gqa=heads != kv_heads)
        out[row:end] = o.transpose(1, 2).reshape(end - row, heads, dim)
    return out
