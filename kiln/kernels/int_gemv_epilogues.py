"""Epilogues of the one-row int4 GEMV (kiln.kernels.int_gemv_pairs) at batch-1 decode, each
saving the launch that follows the unfused GEMV, with its bits:

- GLU (`int4_glu`, KILN_INT_GLU=0: not): the merged [gate | up] weight; a program's rows are
  BLOCK_N / 2 gate rows and the up rows of the same columns, and the epilogue stores
  act(gate) * up rounded as kiln's SiLU*mul kernel rounds the stored GEMM
  (kiln.kernels.silu_mul.act_mul_values);
- rotary + KV write (`int4_rope`, KILN_INT_ROPE=0: not): the fused QKV weight; a program's rows
  are dims of a head's first half and the dims they rotate with
  (kiln.kernels.gemv_swap_rope.rope_rows), and the epilogue stores rotary(q) and writes
  rotary(k) and v into the paged caches as kiln.kernels.rotary_kv does.

K splits are summed in the kernel (split_k_fixup) at each row's own slot of the [N]
workspace; a launch that would sum them by float32 atomics takes no epilogue. Both run in
the launch kiln makes for the unfused GEMV of that shape (kiln.kernels.int_launch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kiln.kernels.gemv_swap_rope import rope_epilogue, rope_rows
from kiln.kernels.silu_mul import act_mul_values, glu_rows
from kiln.kernels.split_k import split_k_fixup

if TYPE_CHECKING:
    from kiln.kernels.gemv_swap_rope import RopeArgs


@triton.jit
def epilogue_rows(pid_n, N, BLOCK_N: tl.constexpr, GLU: tl.constexpr,
                  ROPE_HALF: tl.constexpr):
    """A program's BLOCK_N weight rows (of N) and whether each is real: GLU, BLOCK_N / 2
    columns of the gate half then the same of the up half; ROPE_HALF, rope_rows."""
    if GLU != 0:
        offs, valid = glu_rows(pid_n, N // 2, BLOCK_N)
    else:
        offs = rope_rows(pid_n, ROPE_HALF, BLOCK_N)
        valid = offs < N
    return offs, valid


@triton.jit
def rows_tile(offs_n, valid, stride_sn, GROUPS: tl.constexpr, WPG: tl.constexpr):
    """kiln.kernels.int_gemv._word_tile's tuple for the rows offs_n."""
    rows = offs_n.to(tl.int64)[:, None, None]
    g = tl.arange(0, GROUPS)[None, :, None]
    word = g * WPG + tl.arange(0, WPG)[None, None, :]
    return valid[:, None, None], rows, rows * stride_sn, g, word


@triton.jit
def epilogue_store(y, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, N,
                   BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   INTERPRET: tl.constexpr, GLU: tl.constexpr, pos_ptr, cs_ptr, kc_ptr,
                   vc_ptr, slot_ptr, num_heads, num_kv_heads, block_size, stride_cs,
                   stride_cb, stride_cslot, stride_ch, stride_vs, stride_vh, stride_vd,
                   ROPE_HALF: tl.constexpr):
    """A program's sums y [BLOCK_N] (its epilogue_rows) out through its epilogue, each row
    first rounded to out's dtype as the unfused GEMV stores it."""
    offs_n, valid = epilogue_rows(pid_n, N, BLOCK_N, GLU, ROPE_HALF)
    last = True
    if SPLIT_K > 1:  # each split's partials at the rows' own slots of its [N] workspace
        y, last = split_k_fixup(y, part_ptr, count_ptr, pid_n, offs_n, valid, N, offs_n,
                                SPLIT_K, INTERPRET)
    if last:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=valid, other=0.0).to(tl.float32)
        yb = y.to(out_ptr.dtype.element_ty)
        if GLU != 0:
            HALF: tl.constexpr = BLOCK_N // 2
            gate, up = tl.split(tl.permute(tl.reshape(yb, [2, HALF]), [1, 0]))
            cols = pid_n * HALF + tl.arange(0, HALF)
            tl.store(out_ptr + cols, act_mul_values(gate, up, GLU == 2), mask=cols < N // 2)
        else:  # one token: rope_epilogue's [rows, tokens] with one column
            offs_t = tl.arange(0, 1)
            rope_epilogue(yb[:, None], pid_n, offs_t, offs_t < 1, out_ptr, 0, pos_ptr,
                          cs_ptr, kc_ptr, vc_ptr, slot_ptr, num_heads, num_kv_heads,
                          block_size, stride_cs, stride_cb, stride_cslot, stride_ch,
                          stride_vs, stride_vh, stride_vd, ROPE_HALF, BLOCK_N, 1)


def _one_row_launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
                    ) -> tuple | None:
    """pairs_gemv's launch arguments (kiln.kernels.int_gemm.pairs_launch) of the launch
    kiln makes for the unfused one-row int4 GEMV of x and this weight, where it is the
    pairs GEMV and sums its K splits in the kernel; else None."""
    from kiln.kernels.int_gemv_pairs import pairs_launch, word_aligned
    from kiln.kernels.int_launch import int_gemm_config

    M, K = x.shape
    if M != 1 or weight.dtype != torch.uint8 or x.stride(-1) != 1:
        return None
    cfg = int_gemm_config(1, weight.shape[0], K, x.device, 4, K // scale.shape[1], x.dtype)
    launch = None if cfg.digits else pairs_launch(x, scale, cfg, 4, word_aligned(weight))
    if launch is None or not (cfg.fixup or triton.cdiv(K, launch[3]) == 1):
        return None
    return launch


def _launch(x, weight, scale, offset, bias, launch, **epilogue) -> torch.Tensor:
    from kiln.kernels.int_gemv_pairs import pairs_gemv

    return pairs_gemv(x, weight, scale, offset, bias, *launch, **epilogue)


def int4_glu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             offset: torch.Tensor | None, bias: torch.Tensor | None, act: int
             ) -> torch.Tensor | None:
    """act(gate) * up [1, N / 2] of one bfloat16 row x through an int4 [gate | up] weight
    (uint8 [N, K / 2], kiln.kernels.int_gemm's storage; act 1: SiLU, 2: tanh GELU), or None
    where the epilogue does not take the launch (_one_row_launch, odd rows)."""
    launch = _one_row_launch(x, weight, scale)
    if launch is None or weight.shape[0] % 2 or launch[0] % 2:  # launch[0]: block_n
        return None
    return _launch(x, weight, scale, offset, bias, launch, glu=act)


def int4_rope(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              offset: torch.Tensor | None, bias: torch.Tensor | None, rope: RopeArgs
              ) -> torch.Tensor | None:
    """rotary(q) [1, num_heads * head_dim] of one bfloat16 row x through an int4 fused QKV
    weight, rotary(k) and v written into rope's caches at the token's slot; None where the
    epilogue does not take the launch (_one_row_launch, or heads the program's rows do not
    tile: half a head a multiple of BLOCK_N / 2, or whole heads a program)."""
    launch = _one_row_launch(x, weight, scale)
    head_dim = rope.cos_sin.shape[1]
    if launch is None:
        return None
    block_n = launch[0]
    if weight.shape[0] != (rope.num_heads + 2 * rope.num_kv_heads) * head_dim or not (
            (head_dim // 2) % (block_n // 2) == 0 or block_n % head_dim == 0):
        return None
    return _launch(x, weight, scale, offset, bias, launch, rope=rope)
