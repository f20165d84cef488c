"""K / V tiles of a paged cache read by TMA (Hopper's tensor memory accelerator): for KV
blocks at least as long as the attention kernel's key tile (`--block-size 64` or 128),
every tile lies inside one block, so a tile is one rectangular copy the hardware does on
its own, instead of a gather whose per-element addresses the warps compute (one 16-token
block at a time). On by default on Hopper (KILN_PREFILL_TMA=0: off; =1: also under the
Triton interpreter). H200, 8B heads, 25th session (benchmarks/attn_prefill_tma.py):
causal prefill over 64-token blocks 0.84x / 0.81x SDPA at 4k / 8k tokens by TMA, 0.49x /
0.48x gathered with the same launch (64 keys, 4 warps, 3 stages), against 0.66x for
kiln's gathers over 16-token blocks; end to end, a lone 32k-token prompt's TTFT 1,282 ms
(64-token blocks, TMA) vs 1,407 (16-token blocks), 8k 212 vs 218 ms.

The descriptors view a cache [blocks, block_size, kv_heads, head_dim] as [blocks,
block_size, kv_heads * head_dim] (any block stride, rows contiguous) with boxes [1,
BLOCK_N, head_dim]: a tile is keys n0 .. n0 + BLOCK_N of one KV head in block
table[n0 // block_size]. Keys past a sequence's end (inside its last block) are read as
stored; the caller masks their scores and their values.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# None: on a Hopper GPU (not under the interpreter); True: wherever usable; False: never.
ENABLED: bool | None = {"0": False, "1": True}.get(os.environ.get("KILN_PREFILL_TMA", ""))


def usable(k_cache: torch.Tensor, block_n: int, head_dim: int, block_d: int,
           rope_k: bool, v_t: bool) -> bool:
    """Whether the prefill kernel reads its tiles by TMA: not turned off, a Hopper GPU (or
    the interpreter when turned on), tiles inside one block, head_dim a power of two, a
    16-bit or e4m3 cache in the usual layout, keys rotated before they were cached."""
    if ENABLED is False or rope_k or v_t or head_dim != block_d:
        return False
    if k_cache.dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        return False
    block_size = k_cache.shape[1]
    if block_size % block_n or k_cache.stride(-1) != 1 or k_cache.stride(2) != head_dim or \
            k_cache.stride(1) != k_cache.shape[2] * head_dim:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ENABLED is True
    return k_cache.is_cuda and _hopper(k_cache.device.index)


@functools.cache
def _hopper(index: int | None) -> bool:  # (asked on every prefill launch: once a device)
    return torch.cuda.get_device_capability(index)[0] >= 9


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
