"""One entry per hot op. Dispatches to a Triton kernel on CUDA, the torch reference elsewhere.

Layers call ops only through this module, so a new kernel is wired in one place.
Set KILN_TRITON=0 to force the reference path everywhere (for debugging).
"""

from __future__ import annotations

import os

import torch

from kiln.kernels import reference as ref


def _triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("KILN_TRITON", "1") != "0"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, fuses the residual add and returns (normed, x + residual)."""
    if residual is None:
        return ref.rms_norm(x, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ref.silu_and_mul(x)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
           head_dim: int) -> torch.Tensor:
    return ref.rotary(x, positions, cos_sin, head_dim)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    ref.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:  # noqa: F821
    return ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_starts_host,
                               meta.seq_lens_host, scale)
