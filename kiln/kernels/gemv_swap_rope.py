"""Rotary + KV-cache write in the QKV GEMV's epilogue (kiln.kernels.gemv_swap, ROPE).

At 1-16 decode rows the fused QKV projection is a swapped GEMV of 64 weight rows a
program. With the rows chosen as 32 dims of one head's first half and the 32 dims they
rotate with in its second half (neox rotary), a program holds both operands of its 32
rotations: the epilogue rounds them as the GEMM stores them, rotates q and k as
kiln.kernels.rotary_kv does (each product and the sum rounded to the model dtype), writes
rotary(q) to q_out and rotary(k) and v to their paged-cache slots. The rotary + KV-write
launch after the QKV GEMV is gone.

Heads narrower than 64 come several to a program (all their dims), each pair q, k or v by
its head. Taken (Attention.fused_qkv; KILN_SWAP_ROPE=0: not) where the rotary is full
(rotary_dim == head_dim; half a multiple of 32, or head_dim dividing 64), the cache is
16-bit in the model's dtype,
and keys are rotated before caching (not attention sinks); anything else keeps the
rotary kernel.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from kiln.kernels.paged import v_transposed

HALF = 32  # rotation pairs a program (BLOCK_W = 64 weight rows)


@dataclasses.dataclass
class RopeArgs:
    """What the epilogue needs beside the GEMV's: the tokens' positions, the rotary table
    [max_pos, head_dim] float32 = [cos | sin], the paged caches and each token's slot
    (< 0: not written), and the head counts of this rank."""

    positions: torch.Tensor
    cos_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_heads: int
    num_kv_heads: int

    def kernel_args(self, head_dim: int) -> dict:
        k, v = self.k_cache, self.v_cache
        block_size = k.shape[1]
        vs, vh, vd = (1, head_dim * block_size, block_size) if v_transposed(k, v) \
            else (k.stride(1), k.stride(2), 1)
        return dict(pos_ptr=self.positions, cs_ptr=self.cos_sin, kc_ptr=k, vc_ptr=v,
                    slot_ptr=self.slot_mapping, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, block_size=block_size,
                    stride_cs=self.cos_sin.stride(0), stride_cb=k.stride(0),
                    stride_cslot=k.stride(1), stride_ch=k.stride(2), stride_vs=vs,
                    stride_vh=vh, stride_vd=vd)


def takes(head_dim: int, cos_sin: torch.Tensor, k_cache: torch.Tensor,
          dtype: torch.dtype) -> bool:
    """Whether the epilogue can take a layer's rotary and cache (module doc)."""
    half = head_dim // 2
    return (cos_sin.dim() == 2 and cos_sin.shape[1] == head_dim and head_dim % 2 == 0
            and (half % HALF == 0 or 64 % head_dim == 0) and cos_sin.stride(1) == 1
            and k_cache.dtype == dtype and k_cache.numel() > 0 and k_cache.stride(-1) == 1)


@triton.jit
def _layout(pid_w, H: tl.constexpr, ROPE_HALF: tl.constexpr, BLOCK_W: tl.constexpr):
    """(first head, first dim) of a program's H dims of each half of BLOCK_W / (2 H) heads:
    half >= 32: 32 dims of one head (H = 32); head_dim < 64: 64 / head_dim whole heads."""
    PER_HEAD: tl.constexpr = ROPE_HALF // H  # programs a head
    return (pid_w // PER_HEAD) * (BLOCK_W // (2 * H)), (pid_w % PER_HEAD) * H


@triton.jit
def rope_rows(pid_w, ROPE_HALF: tl.constexpr, BLOCK_W: tl.constexpr):
    """The program's 64 weight rows, head by head: H dims of the head's first half, then
    the H they rotate with in its second half (ROPE_HALF = head_dim / 2; _layout)."""
    H: tl.constexpr = ROPE_HALF if ROPE_HALF < BLOCK_W // 2 else BLOCK_W // 2
    head0, j0 = _layout(pid_w, H, ROPE_HALF, BLOCK_W)
    rows_in = tl.arange(0, BLOCK_W)
    within = rows_in % (2 * H)
    return (head0 + rows_in // (2 * H)) * (2 * ROPE_HALF) + (within // H) * ROPE_HALF + j0 + \
        within % H


@triton.jit
def rope_epilogue(y, pid_w, offs_t, mask_t, q_ptr, stride_q, pos_ptr, cs_ptr, kc_ptr, vc_ptr,
                  slot_ptr, num_heads, num_kv_heads, block_size, stride_cs, stride_cb,
                  stride_cslot, stride_ch, stride_vs, stride_vh, stride_vd,
                  ROPE_HALF: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr):
    """y [BLOCK_W rows (rope_rows), BLOCK_T tokens] as the GEMM stores it: q heads rotated
    into q_ptr [tokens, num_heads * head_dim], k heads rotated and v heads as they are into
    the caches at each token's slot (kiln.kernels.rotary_kv's roundings). Each of the
    BLOCK_W / 2 pairs is q, k or v by its head (a program may hold several)."""
    H: tl.constexpr = ROPE_HALF if ROPE_HALF < BLOCK_W // 2 else BLOCK_W // 2
    GROUPS: tl.constexpr = BLOCK_W // (2 * H)  # heads a program
    head0, j0 = _layout(pid_w, H, ROPE_HALF, BLOCK_W)
    P: tl.constexpr = BLOCK_W // 2
    x1, x2 = tl.split(tl.permute(tl.reshape(y, [GROUPS, 2, H, BLOCK_T]), [0, 2, 3, 1]))
    x1 = tl.reshape(x1, [P, BLOCK_T])  # [pairs, tokens]
    x2 = tl.reshape(x2, [P, BLOCK_T])
    pair = tl.arange(0, P)
    head = head0 + pair // H
    d = j0 + pair % H  # each pair's dim in its head's first half
    dt = y.dtype
    pos = tl.load(pos_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    row = cs_ptr + pos[None, :] * stride_cs + d[:, None]
    cos = tl.load(row, mask=mask_t[None, :], other=0.0).to(dt).to(tl.float32)
    sin = tl.load(row + ROPE_HALF, mask=mask_t[None, :], other=0.0).to(dt).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    is_v = (head >= num_heads + num_kv_heads)[:, None]
    real = (head < num_heads + 2 * num_kv_heads)[:, None]  # the last program's may not be
    y1 = tl.where(is_v, x1, ((a1 * cos).to(dt).to(tl.float32)
                             + (-a2 * sin).to(dt).to(tl.float32)).to(dt))
    y2 = tl.where(is_v, x2, ((a2 * cos).to(dt).to(tl.float32)
                             + (a1 * sin).to(dt).to(tl.float32)).to(dt))
    is_q = (head < num_heads)[:, None] & mask_t[None, :]
    q_at = q_ptr + offs_t.to(tl.int64)[None, :] * stride_q + (head * (2 * ROPE_HALF) + d)[:, None]
    tl.store(q_at, y1, mask=is_q)
    tl.store(q_at + ROPE_HALF, y2, mask=is_q)
    slot = tl.load(slot_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    ok = (mask_t & (slot >= 0))[None, :]
    cell = (slot // block_size) * stride_cb  # [tokens]: the slot's block
    within = slot % block_size
    is_k = (head >= num_heads)[:, None] & ~is_v & ok
    k_at = kc_ptr + (cell + within * stride_cslot)[None, :] + \
        ((head - num_heads) * stride_ch + d)[:, None]
    tl.store(k_at, y1, mask=is_k)
    tl.store(k_at + ROPE_HALF, y2, mask=is_k)
    v_at = vc_ptr + (cell + within * stride_vs)[None, :] + \
        ((head - num_heads - num_kv_heads) * stride_vh + d * stride_vd)[:, None]
    tl.store(v_at, y1, mask=is_v & real & ok)
    tl.store(v_at + ROPE_HALF * stride_vd, y2, mask=is_v & real & ok)


def launch_shape(N: int, head_dim: int) -> int:
    """Programs of the QKV GEMV with the epilogue: 64 weight rows each (rope_rows)."""
    assert N % head_dim == 0 and ((head_dim // 2) % HALF == 0 or 64 % head_dim == 0), \
        (N, head_dim)
    return triton.cdiv(N, 64)
