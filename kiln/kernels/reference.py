"""Torch reference ops: the CPU path, and the oracle every Triton kernel is tested against.

Numerics follow HuggingFace transformers' Llama (norms in float32, rotary in the model
dtype) so that kiln matches it within dtype tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), reduced in float32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual; returns (rms_norm(r), r)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """Neox-style rotary on x [T, heads*head_dim]; cos_sin [max_pos, head_dim] = [cos|sin]."""
    tokens = x.shape[0]
    x = x.view(tokens, -1, head_dim)
    cos, sin = cos_sin[positions].to(x.dtype).unsqueeze(1).chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).view(tokens, -1)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into caches [blocks, block_size, kv_heads, d]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q [T, heads, d] holds the new tokens of all sequences back to back; sequence i owns
    q[query_starts[i]:query_starts[i+1]] and its context is the first seq_lens[i]
    tokens in the blocks block_tables[i]. New tokens are the last ones of the context.
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_starts[i], query_starts[i + 1]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        num_new = end - start
        # Query j (0-based among new tokens) sits at position seq_len - num_new + j.
        q_pos = torch.arange(seq_len - num_new, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[start:end] = o.transpose(0, 1)
    return out
