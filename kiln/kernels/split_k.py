"""Split-K finished inside the kernel: no zero-fill before it, no conversion after it.

A tile's K range is split over SPLIT_K programs (program_id(1) names the split). Each
stores its float32 partial sums in its own slice of a workspace ([SPLIT_K, elems]) and
counts itself in at a per-tile counter (an atomic with acquire-release order, after a
fence that makes every thread's stores visible device-wide); the program that arrives
last adds the slices in split order, so the result does not depend on arrival order
(unlike float atomics into one buffer), writes the output, and zeroes the counter for
the next call. The counters live in one zeroed buffer per device that every call leaves
zeroed again; calls on one stream run one after another, so they never overlap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def arrive(count_ptr, slot, lanes, INTERPRET: tl.constexpr):
    """Count this program in at counter `slot`, after a fence that makes every thread's
    stores so far visible device-wide (lanes: as split_k_fixup's); returns how many
    programs had arrived before it (acquire-release order: the last one reads theirs)."""
    if not INTERPRET:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [lanes],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")


@triton.jit
def split_k_fixup(acc, part_ptr, count_ptr, tile, offs, mask, elems, lanes,
                  SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    """acc: this program's partial sums at element offsets `offs` (any shape, < elems) of
    its tile's output. lanes: a small 1-D int32 tensor laid out over the program's threads
    (e.g. the tile's column offsets), on which the memory fence runs, so that every thread
    fences its own stores. Returns (the sum over all splits, whether this program is the
    last of its tile); only the last program's sum is complete."""
    pid_k = tl.program_id(1)
    tl.store(part_ptr + pid_k * elems + offs, acc, mask=mask)
    last = arrive(count_ptr, tile, lanes, INTERPRET) == SPLIT_K - 1
    total = tl.zeros(acc.shape, dtype=acc.dtype)  # float32, or int32 sums kept exact
    if last:
        if acc.dtype == tl.int32:  # GEMM tiles (int8_gemm): one partial in registers at once
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + s * elems + offs, mask=mask, other=0,
                                 cache_modifier=".cg")
        else:
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * elems + offs, mask=mask, other=0.0,
                                 cache_modifier=".cg")
        tl.store(count_ptr + tile, 0)
    return total, last


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_k_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The arrival counters (zeros, shared by every call on the device). First needed
    outside a CUDA-graph capture (the eager warm-up before it), since the buffer must
    outlive any graph's memory pool; it grows to the largest tile count seen."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters first needed inside a CUDA-graph capture; "
                               "run the shape once eagerly first")
        have = _COUNTERS[device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32,
                                               device=device)
    return have


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of tile pid: groups of GROUP_M row tiles walk the columns
    together (L2 reuse of the weight)."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The tile of program_id(0) (grouped_tile's order): its index, its row and column
    offsets and their masks."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m * num_n + pid_n, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def finish_tile(acc, out_ptr, bias_ptr, part_ptr, count_ptr, tile, offs_m, offs_n, mask_m,
                mask_n, M, N, stride_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_N] float32 tile (+ bias) in out's dtype; with SPLIT_K > 1,
    only the last split of the tile does, after adding the others' (split_k_fixup)."""
    mask = mask_m[:, None] & mask_n[None, :]
    last = True
    if SPLIT_K > 1:
        acc, last = split_k_fixup(acc, part_ptr, count_ptr, tile,
                                  offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], mask,
                                  M * N, offs_n, SPLIT_K, INTERPRET)
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_buffers(rows: int, n: int, splits: int, blocks: int, fixup: bool,
                    dtype: torch.dtype, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A split-K GEMV's output [rows, n] and workspace: (out, part, counters, atomic).
    Several splits meet either in the kernel (fixup: partials [splits, rows * n] in float32,
    summed by the last split of each of the `blocks` output blocks, out in dtype) or by
    float32 atomics into a zeroed out (atomic: the caller casts it to dtype); one split
    writes out in dtype. part and counters are out where unused."""
    atomic = splits > 1 and not fixup
    out = torch.zeros(rows, n, dtype=torch.float32, device=device) if atomic else \
        torch.empty(rows, n, dtype=dtype, device=device)
    if splits > 1 and fixup:
        return (out, torch.empty(splits, rows * n, dtype=torch.float32, device=device),
                split_k_counters(device, blocks), atomic)
    return out, out, out, atomic
