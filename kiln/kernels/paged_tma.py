"""K / V tiles of a paged cache read by TMA (Hopper's tensor memory accelerator): for KV
blocks at least as long as the attention kernel's key tile (`--block-size 64` or 128),
every tile lies inside one block, so a tile is one rectangular copy the hardware does on
its own, instead of a gather whose per-element addresses the warps compute (one 16-token
block at a time). Opt-in (KILN_PREFILL_TMA=1) for the prefill kernel until timed: on an
H200 a Triton causal kernel over contiguous K / V read this way reaches 0.88x SDPA at 8k
tokens with 128-key tiles and 8 warps, where kiln's paged gathers take 0.67x
(benchmarks/attn_prefill_tma.py, BENCHMARKS.md twenty-fourth session).

The descriptors view a cache [blocks, block_size, kv_heads, head_dim] as [blocks,
block_size, kv_heads * head_dim] (any block stride, rows contiguous) with boxes [1,
BLOCK_N, head_dim]: a tile is keys n0 .. n0 + BLOCK_N of one KV head in block
table[n0 // block_size]. Keys past a sequence's end (inside its last block) are read as
stored; the caller masks their scores and their values.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("KILN_PREFILL_TMA", "0") == "1"


def usable(k_cache: torch.Tensor, block_n: int, head_dim: int, block_d: int,
           rope_k: bool, v_t: bool) -> bool:
    """Whether the prefill kernel reads its tiles by TMA: opted in, a Hopper GPU (or the
    interpreter), tiles inside one block, head_dim a power of two, a 16-bit or e4m3 cache
    in the usual layout, keys rotated before they were cached."""
    if not ENABLED or rope_k or v_t or head_dim != block_d:
        return False
    if k_cache.dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        return False
    block_size = k_cache.shape[1]
    if block_size % block_n or k_cache.stride(-1) != 1 or k_cache.stride(2) != head_dim or \
            k_cache.stride(1) != k_cache.shape[2] * head_dim:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return k_cache.is_cuda and torch.cuda.get_device_capability(k_cache.device)[0] >= 9


def descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int):
    """(k_desc, v_desc): host-side tensor descriptors, boxes of [1, block_n, head_dim]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(cache: torch.Tensor) -> TensorDescriptor:
        blocks, block_size, kv_heads, head_dim = cache.shape
        return TensorDescriptor(cache, [blocks, block_size, kv_heads * head_dim],
                                [cache.stride(0), cache.stride(1), 1], [1, block_n, head_dim])

    return desc(k_cache), desc(v_cache)


@triton.jit
def tma_kv_tiles(k_desc, v_desc, table_row_ptr, n0, kv_head, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """K and V of keys n0 .. n0 + BLOCK_N (one block holds them all), each [BLOCK_N,
    HEAD_DIM] in the cache's dtype."""
    blk = tl.load(table_row_ptr + n0 // BLOCK_SIZE)
    k = k_desc.load([blk, n0 % BLOCK_SIZE, kv_head * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([blk, n0 % BLOCK_SIZE, kv_head * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
    return k, v
