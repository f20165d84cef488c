"""Prefetch bytes from HBM into the L2 cache ahead of the kernel that will read them.

A small decode batch spends its step streaming weights, except during the kernels between
two GEMMs (norms, rotary, attention, SiLU*mul: ~17 us a layer of a bf16 Llama-3.1-8B at
batch 1), when HBM idles. `prefetch_l2` asks the L2 for the first bytes of the next
weight during them (kiln.runtime.l2_prefetch launches it on a side stream), so that the
GEMM finds part of its weight in L2 instead of HBM. It reads nothing into registers and
writes nothing: results do not change, only where the bytes come from.

One `cp.async.bulk.prefetch.L2` (sm_90+) a thread, CHUNK bytes each, so a few thousand
threads on a handful of SMs cover tens of MB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16384  # bytes a bulk prefetch (a multiple of 16)
PER_PROGRAM = 128  # chunks a program: 2 MB, 4 warps


@triton.jit
def _prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Chunks [pid * PER_PROGRAM, (pid + 1) * PER_PROGRAM) of the nbytes at ptr (uint8,
    16-byte aligned; nbytes a multiple of 16) asked into L2, one bulk prefetch a thread."""
    offs = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    size = tl.minimum(tl.maximum(nbytes - offs, 0), CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetchable(t: torch.Tensor) -> bool:
    """A tensor whose bytes prefetch_l2 can ask for: on a CUDA device of sm_90 or newer,
    contiguous, 16-byte aligned."""
    return (t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def prefetch_l2(t: torch.Tensor, max_bytes: int) -> int:
    """Ask the L2 for the first min(max_bytes, t's size) bytes of t (rounded down to 16);
    returns the bytes asked for (0: none, e.g. t not prefetchable)."""
    nbytes = min(max_bytes, t.numel() * t.element_size()) // 16 * 16
    if nbytes <= 0 or not prefetchable(t):
        return 0
    grid = (triton.cdiv(nbytes, CHUNK * PER_PROGRAM),)
    _prefetch_kernel[grid](t.view(-1).view(torch.uint8), nbytes, CHUNK, PER_PROGRAM,
                           num_warps=4)
    return nbytes
