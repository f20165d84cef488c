"""W4A16 / W8A16 decode GEMM on the tensor cores (up to 16 rows), split-K finished in the
kernel. Opt-in (KILN_INT_DOT=1) until measured on a GPU.

The CUDA-core GEMV (kiln.kernels.int_gemm._gemv1_kernel) turns every weight into a
float and multiplies it by hand; on an H200 it streamed 0.8-1.4 TB/s at the Llama-3.1-8B
shapes, bound by latency (~200 registers a thread leave few warps to hide HBM's) rather
than by its instruction count (a layout with 2.8 instead of 7.7 instructions a weight was
no faster: BENCHMARKS.md). Here the products go to the tensor cores as in a prefill tile
(16 rows; a decode step's 1-16 real rows, the rest zeros) and a thread holds little: a
[16, BLOCK_N] float32 accumulator and one K step of packed words.

The weight stays in kiln's storage (int8 [N, K] or two 4-bit values a byte, [N, K // 2],
read as 32-bit words: word j of a row holds k = PER j .. PER j + PER - 1, lowest bits
first). A K step of BLOCK_K lies inside one quantization group, so with
w[n, k] = q[n, k] s[n, g] + o[n, g]:

    sum_k x[m, k] w[n, k] = s[n, g] sum_k x[m, k] q[n, k] + o[n, g] sum_k x[m, k]

The q are small integers, exact in bf16 / fp16, so the tensor cores multiply x by q
itself, in PER products per step: product i takes nibble (byte) i of every word, i.e.
k = PER j + i for j in the step, against the x columns of the same k (a strided load of
x, which stays in L1). The group's scale and offset apply to the step's sum. Compared
with dequantizing first (the reference), the sums differ only in rounding order.
Split-K over SPLIT_K programs is finished in the kernel (kiln.kernels.split_k).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.kernels.split_k import decode_split, finish_rows, num_sms, split_k_buffers

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ROWS = 16


@triton.jit
def _int_dot_kernel(x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                    M, N, K, G, stride_xm, stride_wn, stride_sn, stride_om,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                    HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                    IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """out[:M, n block] = x[:M] @ dequant(w[n block])^T (+ bias); program_id(1) takes the
    SPLIT_K-th part of K it names (K a multiple of SPLIT_K * BLOCK_K, BLOCK_K dividing G).
    w_ptr: the storage as int32 words, stride_wn in words."""
    BLOCK_M: tl.constexpr = 16
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BIAS: tl.constexpr = 8388608.0 + (128.0 if BITS == 8 else 0.0)
    WORDS: tl.constexpr = BLOCK_K // PER
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = K // SPLIT_K
    k_start = tl.program_id(1) * k_len
    for k in range(k_start, k_start + k_len, BLOCK_K):
        words = tl.load(w_rows + (k // PER + offs_w)[None, :], mask=mask_n[:, None], other=0)
        step = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in tl.static_range(PER):
            u = (words >> (BITS * i)) & MASK
            if BITS == 8:  # int8 q as u = q + 128 (its bits xor 0x80)
                u = u ^ 0x80
            # u as the mantissa of 2^23: float(bits(2^23) | u) - 2^23 = u, no int->float op
            q = (u | 0x4B000000).to(tl.float32, bitcast=True) - BIAS
            x = tl.load(x_rows + (k + offs_w * PER + i)[None, :], mask=mask_m[:, None],
                        other=0.0)
            if IEEE:  # float32 inputs multiplied in full float32, as the reference does
                step = tl.dot(x, tl.trans(q), step, input_precision="ieee")
            else:
                step = tl.dot(x, tl.trans(q.to(x.dtype)), step)
            if HAS_OFFSET:
                x_sum += tl.sum(x.to(tl.float32), axis=1)
        group = k // G
        scale = tl.load(s_rows + group, mask=mask_n, other=0.0)
        acc += step * scale[None, :]
        if HAS_OFFSET:
            offset = tl.load(o_ptr + offs_n.to(tl.int64) * stride_sn + group, mask=mask_n,
                             other=0.0)
            acc += x_sum[:, None] * offset[None, :]
    finish_rows(acc, part_ptr, count_ptr, bias_ptr, out_ptr, pid_n, offs_m, offs_n, M, N,
                stride_om, SPLIT_K, HAS_BIAS, INTERPRET)


@dataclass(frozen=True)
class IntDotConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def int_dot_enabled() -> bool:
    return os.environ.get("KILN_INT_DOT", "0") == "1"


def int_dot_config(M: int, N: int, K: int, G: int, bits: int, device: torch.device
                   ) -> IntDotConfig | None:
    """A launch for these shapes, or None where the kernel does not apply: more than
    MAX_ROWS rows, or no K step of at least 16 words per product inside a group (int4
    needs groups of 128 or more, int8 of 64). First choices, not tuned on a GPU yet:
    KILN_INT_DOT_LAUNCH="block_n,block_k,split_k,warps,stages" overrides them."""
    per = 32 // bits
    block_k = 256  # the largest power of two dividing G, at most this
    while block_k > 16 * per and G % block_k:
        block_k //= 2
    if M > MAX_ROWS or G % block_k or K % block_k:
        return None
    override = os.environ.get("KILN_INT_DOT_LAUNCH")
    if override:
        bn, bk, split, warps, stages = (int(v) for v in override.split(","))
        if G % bk == 0 and K % (split * bk) == 0:
            return IntDotConfig(bn, bk, split, warps, stages)
    block_n = 32
    return IntDotConfig(block_n, block_k,
                        decode_split(triton.cdiv(N, block_n), K, block_k, num_sms(device)))


def int_dot_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   offset: torch.Tensor | None, bias: torch.Tensor | None,
                   cfg: IntDotConfig) -> torch.Tensor:
    """x [M <= 16, K] @ dequant(weight)^T -> [M, N] in x's dtype (see the module doc)."""
    M, K = x.shape
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8
    G = K // scale.shape[1]
    assert M <= MAX_ROWS and weight.stride(0) % 4 == 0 and weight.storage_offset() % 4 == 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(N, cfg.block_n)
    part, counters = split_k_buffers(cfg.split_k, M, N, tiles, out)
    _int_dot_kernel[(tiles, cfg.split_k)](
        x, weight.view(torch.int32), scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, part, counters, M, N, K, G,
        x.stride(0), weight.stride(0) // 4, scale.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BITS=bits, HAS_OFFSET=offset is not None,
        HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, IEEE=x.dtype == torch.float32,
        INTERPRET=_INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
