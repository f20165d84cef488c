"""Prompt attention through PyTorch's own FlashAttention-2 varlen kernel (opt-in:
KILN_PREFILL_FLASH=1, not yet measured on a GPU).

Issue #12 asks for prefill attention at the speed of SDPA's flash backend. kiln's Triton
kernel reads the paged cache directly and reaches 0.66x of it on 16-token blocks (0.81x on
64-token blocks with TMA tiles, 0.88x at best on contiguous K / V: the 25th and 22nd
sessions). FlashAttention-2's paged mode needs blocks of 256 tokens, so this path gathers
each prompt's context (its cached prefix and its new tokens, rotated keys as the cache holds
them) into contiguous K / V once a layer and runs `aten._flash_attention_forward` (the
kernel SDPA's flash backend calls) over the packed sequences, causal aligned to the end of
each context. The gather moves 4 bytes a key a KV head-dim lane (bf16 K and V): for an 8k
prompt of Llama-3.1-8B shape 32 MB a layer, ~10 us against ~1 ms of attention.

Taken for a step's prompts when the model is fp16 / bf16 with a cache of the same dtype or
a 1-byte one (e4m3, int8: gathered, then value * scale[head] in float32 rounded to the
model's dtype, as the reference reads them), and none of softcap, attention sinks, V stored
transposed: those keep the Triton kernel,
as do CUDA graph captures (the gather's size is the step's). Sliding windows and ALiBi go
to the kernel's own window and bias arguments. Decode rows at the head of a mixed step keep
the decode kernel. The slots of the gather are planned once a step (kept in the step's
AttentionMetadata.host_cache) and reused by every layer.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

ENABLED = os.environ.get("KILN_PREFILL_FLASH", "0") == "1"


@functools.cache
def _flash_arguments() -> frozenset[str]:
    """The names the installed torch's flash op takes ('' when it has none)."""
    try:
        schema = torch.ops.aten._flash_attention_forward.default._schema
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(a.name for a in schema.arguments)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
           k_scale=None, softcap=None, alibi_slopes=None, key_rotary=None,
           sliding_window=None) -> bool:
    """Whether this step's prompt rows can take the flash path (see the module doc)."""
    if not ENABLED or softcap is not None or key_rotary is not None:
        return False
    one_byte = k_cache.dtype in (torch.float8_e4m3fn, torch.int8) and k_scale is not None
    if q.dtype not in (torch.float16, torch.bfloat16) or (k_cache.dtype != q.dtype
                                                           and not one_byte):
        return False
    if v_cache.shape != k_cache.shape or q.shape[-1] > 256 or q.shape[-1] % 8:
        return False
    names = _flash_arguments()
    if "scale" not in names or (alibi_slopes is not None and "alibi_slopes" not in names) \
            or (sliding_window is not None and "window_size_left" not in names):
        return False
    if not meta.seq_lens_host or len(meta.query_starts_host) != len(meta.seq_lens_host) + 1:
        return False  # no host copy of the step's layout (graph-captured steps)
    if q.is_cuda and (torch.cuda.is_current_stream_capturing() or _capability(q.device) < (8, 0)):
        return False
    return True


@dataclass
class Plan:
    """Where a step's prompt rows start and what their contexts gather, for every layer."""

    first_row: int  # prompt rows are q[first_row:] (decode rows before them)
    slots: torch.Tensor  # [keys] int64: flat cache slot of each gathered key, packed by cu_k
    cu_q: torch.Tensor  # [prompts + 1] int32, from 0
    cu_k: torch.Tensor  # [prompts + 1] int32
    max_q: int
    max_k: int
    pinned: torch.Tensor | None = None  # the host side of an async copy (kept alive)


def plan(meta, block_size: int, decode_rows: int, sliding_window: int | None,
         device: torch.device) -> Plan:
    """The gather of sequences decode_rows.. of the step: each context from its first key
    any of its queries sees (all of it, or the window before its first new token)."""
    starts, lens = meta.query_starts_host[decode_rows:], meta.seq_lens_host[decode_rows:]
    cu_q, cu_k, firsts = [0], [0], []
    for i, seq_len in enumerate(lens):
        new = starts[i + 1] - starts[i]
        first = 0 if sliding_window is None else max(seq_len - new - sliding_window + 1, 0)
        firsts.append(first)
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + seq_len - first)
    n = len(lens)
    host = torch.tensor(cu_q + cu_k + firsts, dtype=torch.int32)
    pinned = None
    if device.type == "cuda":
        pinned = host.pin_memory()
        packed = pinned.to(device, non_blocking=True)
    else:
        packed = host.to(device)
    cu_q_dev, cu_k_dev, first_dev = packed[:n + 1], packed[n + 1:2 * n + 2], packed[2 * n + 2:]
    total = cu_k[-1]
    lengths = cu_k_dev[1:] - cu_k_dev[:-1]
    seq = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device, dtype=torch.int32) - cu_k_dev[seq] + first_dev[seq]
    tables = meta.block_tables[decode_rows:]
    slots = tables[seq, pos // block_size].long() * block_size + (pos % block_size).long()
    return Plan(decode_rows, slots, cu_q_dev, cu_k_dev,
                max(cu_q[i + 1] - cu_q[i] for i in range(n)),
                max(cu_k[i + 1] - cu_k[i] for i in range(n)), pinned)


def _attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, sliding_window, alibi_slopes):
    """FlashAttention-2 varlen, causal aligned to each context's end (CUDA only; the CPU
    tests put a torch stand-in here)."""
    extra = {}
    if sliding_window is not None:
        extra.update(window_size_left=sliding_window - 1, window_size_right=0)
    if alibi_slopes is not None:
        extra["alibi_slopes"] = alibi_slopes.float()
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale, **extra)[0]


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


def paged_attention_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta, scale: float, decode_rows: int = 0,
                          sliding_window: int | None = None,
                          alibi_slopes: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """paged_attention's result for a step (q [T, heads, d]) whose sequences from
    decode_rows on are prompts (or chunks of them): the first decode_rows rows (one token
    each) through the decode kernel, the prompts gathered and through FlashAttention."""
    if out is None:
        out = torch.empty_like(q)
    if decode_rows:
        _decode(q[:decode_rows], k_cache, v_cache, meta.block_tables[:decode_rows],
                meta.seq_lens[:decode_rows], scale, out[:decode_rows], k_scale=k_scale,
                v_scale=v_scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    key = ("flash_plan", decode_rows, sliding_window)
    step = meta.host_cache.get(key)
    if step is None:
        step = meta.host_cache[key] = plan(meta, k_cache.shape[1], decode_rows,
                                           sliding_window, q.device)
    if step.slots.numel() == 0:
        return out
    k = _gather(k_cache, step.slots, k_scale, q.dtype)
    v = _gather(v_cache, step.slots, v_scale, q.dtype)
    rows = q[step.first_row:]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out[step.first_row:] = _attend(rows, k, v, step.cu_q, step.cu_k, step.max_q, step.max_k,
                                   scale, sliding_window, alibi_slopes)
    return out
