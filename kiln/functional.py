"""One entry per hot op. Dispatches to a Triton kernel on CUDA, the torch reference elsewhere.

Layers call ops only through this module, so a new kernel is wired in one place.
Set KILN_TRITON=0 to force the reference path everywhere (for debugging). Kernel
modules are imported on first CUDA use only, so CPU runs never need triton.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from kiln.kernels import reference as ref

if TYPE_CHECKING:
    from kiln.layers.attention import AttentionMetadata


def _triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("KILN_TRITON", "1") != "0"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, fuses the residual add and returns (normed, x + residual)."""
    if _triton(x):
        from kiln.kernels import rms_norm as kernel

        if residual is None:
            return kernel.rms_norm(x, weight, eps)
        return kernel.add_rms_norm(x, residual, weight, eps)
    if residual is None:
        return ref.rms_norm(x, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton(x):
        from kiln.kernels.silu_mul import silu_and_mul as kernel

        return kernel(x)
    return ref.silu_and_mul(x)


def rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, head_dim: int,
) -> torch.Tensor:
    """Neox rotary on q and k, k and v written into the paged cache; returns rotary(q).

    q [T, heads*head_dim], k and v [T, kv_heads*head_dim] (any row stride, e.g. slices of
    the fused QKV output); cos_sin [max_pos, head_dim] float32 = [cos | sin]; slots < 0
    are not written (padding tokens).
    """
    if _triton(q):
        from kiln.kernels.rotary_kv import rotary_and_write_kv as kernel

        return kernel(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, head_dim)
    return ref.rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache,
                                   slot_mapping, head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of q [T, heads, d] over each sequence's paged context.

    On CUDA a decode step (max_query_len == 1: token i is sequence i) takes the
    split-K decode kernel, whose launch depends only on static shapes (batch rows and
    block-table width), so it can be captured in a CUDA graph; anything else takes the
    varlen prefill kernel.
    """
    if _triton(q):
        if meta.max_query_len == 1:
            from kiln.kernels.attention_decode import paged_attention_decode

            return paged_attention_decode(q, k_cache, v_cache, meta.block_tables,
                                          meta.seq_lens, scale)
        from kiln.kernels.attention_prefill import paged_attention_prefill

        return paged_attention_prefill(q, k_cache, v_cache, meta.block_tables,
                                       meta.query_start_loc, meta.seq_lens,
                                       meta.max_query_len, scale)
    return ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_starts_host,
                               meta.seq_lens_host, scale)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
) -> torch.Tensor:
    """Token ids [B] int64 from logits [B, V] with per-row parameters [B], no host sync.

    temperature <= 0 is greedy; top_k <= 0, top_p >= 1, min_p <= 0 switch a filter off.
    Draws use the counter-based noise of (seeds, steps), identical on both paths.
    """
    if _triton(logits):
        from kiln.kernels.sampling import sample_tokens as kernel

        return kernel(logits, temperature, top_k, top_p, min_p, seeds, steps)
    return ref.sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, steps)
