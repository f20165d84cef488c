"""Prompts' attention through torch's scaled_dot_product_attention (on by default;
KILN_PREFILL_SDPA=0 turns it off).

On an H200 with torch 2.11, SDPA's default backend for bf16 is cuDNN's attention: 0.99 ms
for an 8k-token causal prompt of Llama-3.1-8B's heads, against 1.49 ms for kiln's paged
Triton kernel and 1.72 ms for FlashAttention-2 (BENCHMARKS.md, 40th session). cuDNN takes
only dense batches here: its varlen form costs ~70 ms a call and aligns the causal mask
top-left. So a prompt with nothing cached before it (query length = context length, where
top-left is the right mask) is one causal call over the step's own keys and values: one
index_select over the step's slot mapping gathers them from the cache (where the rotary +
KV-write kernel put them, already rotated; 1-byte caches dequantized as the reference reads
them), with no plan to make; consecutive prompts of one length go in one batched call. A
chunk over a cached prefix (chunked prefill, a prefix-cache hit) is two calls, each
returning its log-sum-exp: the chunk against the prefix's keys (gathered by the block
table, no mask) and against its own (causal, top-left again), merged by their log-sum-exps
(out = own + (prefix - own) * sigmoid(lse_prefix - lse_own)). Decode rows at the head of a
mixed step keep the decode kernel.

The gather and the calls cost a fixed ~0.03 ms a layer (more for 1-byte caches, which are
dequantized on the way), so a step comes here only when its prompts' causal work is worth
it: sqrt(sum over its prompts of new tokens x (new + 2 x cached), i.e. of squared lengths
for whole prompts) at least MIN_TOKENS (2048; 8192 for 1-byte caches), with at most
MAX_CHUNKS chunks over cached prefixes (two calls each), each of at least MIN_CHUNK_TOKENS
(2048) new tokens or of 1024 over a long cache (chunk_pays). Measured on the H200 (41st
session, 8B heads, ms a layer, SDPA path / Triton): bf16 1k 0.055 / 0.046, 2k 0.107 /
0.116, 8k 1.09 / 1.49, 32k 15.3 / 22.6, 16 x 1000 0.41 / 0.55, 64 x 256 0.24 / 0.28; e4m3
1k 0.121 / 0.048, 16 x 1000 0.64 / 0.57, 8k 1.18 / 1.67; chunks 1024 over 3000 cached 0.28
/ 0.20, 2048 over 6000 0.50 / 0.66, 8192 over 24576 6.62 / 10.07. A lone prompt's TTFT: 8k
225 -> 211 ms, 32k 1,424 -> 1,202 ms in one chunk, 1,413 -> 1,193 ms in chunks of 8192
(the default budget).

Not taken for sliding windows shorter than a prompt of the step, ALiBi, softcap, attention
sinks, float32, graph-captured steps, or steps beyond the limits above: the Triton kernel
keeps those.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENABLED = os.environ.get("KILN_PREFILL_SDPA", "1") != "0"
MIN_TOKENS = int(os.environ.get("KILN_PREFILL_SDPA_MIN_TOKENS", "2048"))
MIN_TOKENS_1BYTE = int(os.environ.get("KILN_PREFILL_SDPA_MIN_TOKENS_1BYTE", "8192"))
MAX_CHUNKS = int(os.environ.get("KILN_PREFILL_SDPA_MAX_CHUNKS", "8"))
# a chunk over a cached prefix comes here with this many new tokens, or with at least
# SHORT_CHUNK_TOKENS over a cache long enough that sqrt(new x (new + 2 x cached)) reaches
# SHORT_CHUNK_WORK (H200, bf16, ms a layer SDPA / Triton: 41st 1024 over 3000 cached 0.28 /
# 0.20, 2048 over 6000 0.50 / 0.66; 44th 1024 over 1000 0.18 / 0.10, over 8000 0.32 / 0.49,
# over 24000 0.81 / 1.38, 1536 over 3000 0.25 / 0.34, over 12000 0.64 / 1.15, 2048 over
# 2000 0.27 / 0.30: the short chunks win from ~3,400 on that measure, lose at 2,700)
MIN_CHUNK_TOKENS = int(os.environ.get("KILN_PREFILL_SDPA_MIN_CHUNK_TOKENS", "2048"))
SHORT_CHUNK_TOKENS = int(os.environ.get("KILN_PREFILL_SDPA_SHORT_CHUNK_TOKENS", "1024"))
SHORT_CHUNK_WORK = int(os.environ.get("KILN_PREFILL_SDPA_SHORT_CHUNK_WORK", "3200"))
# 1-byte caches keep V transposed in their blocks ([kv heads, head_dim, block], the engine's
# default for them), gathered slot by slot (44th session, H200, FP8 + FP8 KV: a lone
# 32k prompt's TTFT 1,227 -> 941 ms, 8k 164 either way); KILN_PREFILL_SDPA_VT=0 leaves
# their prompts to the Triton kernel
V_TRANSPOSED = os.environ.get("KILN_PREFILL_SDPA_VT", "1") != "0"
# cuDNN's op takes fewer KV heads than query heads as they are (else K / V are repeated)
CUDNN_GQA = os.environ.get("KILN_SDPA_CUDNN_GQA", "1") == "1"


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
    if not k_cache.is_contiguous() or (v_cache.shape != k_cache.shape and not (
            V_TRANSPOSED and _v_transposed(k_cache, v_cache))):
        return False  # a cache this view cannot flatten, or V transposed (unless on)
    longest, size, chunks = _prompts(meta, decode_rows)
    if size < (MIN_TOKENS_1BYTE if one_byte else MIN_TOKENS) or len(chunks) > MAX_CHUNKS or (
            not all(chunk_pays(*c) for c in chunks)) or (
            sliding_window is not None and longest > sliding_window):
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _prompts(meta, decode_rows: int) -> tuple[int, float, tuple]:
    """(the longest context, sqrt of the prompts' summed causal work, the chunks over a
    cached prefix as (new, cached) tokens) of sequences decode_rows..; once a step, not once
    a layer. A chunk of n new tokens over c cached ones counts n x (n + 2c): a whole
    prompt's n²."""
    key = ("sdpa_prompts", decode_rows)
    found = meta.host_cache.get(key)
    if found is None:
        starts, lens = meta.query_starts_host, meta.seq_lens_host
        longest = work = 0
        chunks = []
        if lens and len(starts) == len(lens) + 1:  # (graph-captured steps have no copy)
            for i in range(decode_rows, len(lens)):
                new = starts[i + 1] - starts[i]
                longest, work = max(longest, lens[i]), work + new * (2 * lens[i] - new)
                if new != lens[i]:
                    chunks.append((new, lens[i] - new))
        found = meta.host_cache[key] = (longest, work ** 0.5, tuple(chunks))
    return found


def chunk_pays(new: int, cached: int) -> bool:
    """Whether a chunk of `new` tokens over `cached` ones goes through SDPA's two calls
    rather than the Triton kernel: MIN_CHUNK_TOKENS new tokens, or SHORT_CHUNK_TOKENS over a
    cache that makes sqrt(new x (new + 2 x cached)) at least SHORT_CHUNK_WORK."""
    return new >= MIN_CHUNK_TOKENS or (
        new >= SHORT_CHUNK_TOKENS and new * (new + 2 * cached) >= SHORT_CHUNK_WORK ** 2)


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, **common):
    from kiln.kernels.attention_decode import paged_attention_decode

    paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=1,
                           out=out, **common)


def _v_transposed(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    blocks, block, kv_heads, dim = k_cache.shape
    return v_cache.shape == (blocks, kv_heads, dim, block) and v_cache.is_contiguous()


def _gather(cache: torch.Tensor, slots: torch.Tensor, cache_scale: torch.Tensor | None,
            dtype: torch.dtype, block: int | None = None) -> torch.Tensor:
    """The cache's values at these slots, [N, kv heads, d] in dtype (dequantized by
    cache_scale a head); `block`: the cache holds V transposed in blocks of that size."""
    if block is None:
        values = cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    else:
        values = cache[slots // block, :, :, slots % block]
    if cache.dtype == dtype:
        return values
    return (values.float() * cache_scale.view(-1, 1)).to(dtype)


def _groups(starts: list[int], lens: list[int], first: int) -> tuple[list, list]:
    """(first row, prompts, length) of each run of consecutive whole prompts of one length,
    and (first row, sequence, new tokens) of each chunk over a cached prefix, from sequence
    `first` on."""
    runs: list[tuple[int, int, int]] = []
    chunks: list[tuple[int, int, int]] = []
    for i in range(first, len(starts) - 1):
        n = starts[i + 1] - starts[i]
        if n != lens[i]:
            chunks.append((starts[i], i, n))
        elif runs and runs[-1][2] == n and runs[-1][0] + runs[-1][1] * n == starts[i]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
        else:
            runs.append((starts[i], 1, n))
    return runs, chunks


def _prefix_slots(meta, seq: int, cached: int, block: int) -> torch.Tensor:
    """The cache slots of sequence seq's first `cached` tokens (once a step)."""
    key = ("sdpa_prefix", seq)
    slots = meta.host_cache.get(key)
    if slots is None:
        table = meta.block_tables[seq, :-(-cached // block)].long()
        offsets = torch.arange(block, device=table.device)
        slots = meta.host_cache[key] = (table[:, None] * block + offsets).view(-1)[:cached]
    return slots


def _attend(q, k, v, causal: bool, scale: float):
    """(out, log-sum-exp [B, H, L] in float32) of q [B, H, L, d] over k / v [B, KH, S, d]."""
    if k.shape[1] != q.shape[1] and not (q.is_cuda and CUDNN_GQA):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    return out, lse.reshape(q.shape[:3])


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta, scale: float, decode_rows: int = 0,
                         out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None,
                         sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention's result for a step (q [T, heads, d]) whose sequences from
    decode_rows on are prompts (whole, or chunks over a cached prefix): the first
    decode_rows rows through the decode kernel (with the model's sliding window, which no
    context here is longer than), the prompts through SDPA."""
    if out is None:
        out = torch.empty_like(q)
    if decode_rows:
        _decode(q[:decode_rows], k_cache, v_cache, meta.block_tables[:decode_rows],
                meta.seq_lens[:decode_rows], scale, out[:decode_rows], k_scale=k_scale,
                v_scale=v_scale, sliding_window=sliding_window)
    starts, lens = meta.query_starts_host, meta.seq_lens_host
    first = starts[decode_rows]
    slots = meta.slot_mapping[first:]
    block = k_cache.shape[1] if v_cache.shape != k_cache.shape else None  # V transposed
    k = _gather(k_cache, slots, k_scale, q.dtype)
    v = _gather(v_cache, slots, v_scale, q.dtype, block)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    runs, chunks = _groups(starts, lens, decode_rows)

    def split(t, a, count, n):  # rows a.. of t as [count, heads, n, d]
        return t[a:a + count * n].view(count, n, t.shape[1], dim).transpose(1, 2)

    for row, count, n in runs:
        o = F.scaled_dot_product_attention(
            split(q, row, count, n), split(k, row - first, count, n),
            split(v, row - first, count, n), is_causal=True, scale=scale,
            enable_gqa=heads != kv_heads)
        out[row:row + count * n] = o.transpose(1, 2).reshape(count * n, heads, dim)
    for row, seq, n in chunks:
        cached = lens[seq] - n
        prefix = _prefix_slots(meta, seq, cached, k_cache.shape[1])
        kp = _gather(k_cache, prefix, k_scale, q.dtype)
        vp = _gather(v_cache, prefix, v_scale, q.dtype, block)
        qs = split(q, row, 1, n)
        o_prefix, lse_prefix = _attend(qs, split(kp, 0, 1, cached), split(vp, 0, 1, cached),
                                       False, scale)
        o_own, lse_own = _attend(qs, split(k, row - first, 1, n), split(v, row - first, 1, n),
                                 True, scale)
        weight = torch.sigmoid(lse_prefix - lse_own).unsqueeze(-1).to(q.dtype)
        o = torch.lerp(o_own, o_prefix, weight)
        out[row:row + n] = o.transpose(1, 2).reshape(n, heads, dim)
    return out
