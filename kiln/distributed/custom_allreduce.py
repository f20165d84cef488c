"""One-shot all-reduce for small tensor-parallel messages over NVLink, optionally fused
with the residual add and RMSNorm that follow it.

A decode step of a TP engine all-reduces a few KB twice per layer; NCCL's latency for
such a message (launch + protocol) is several times the time the bytes take over NVLink.
Here every rank pushes its partial row into a slot of every rank's symmetric buffer
(PyTorch symmetric memory, plain peer-to-peer stores: no NVLink multicast), raises a flag
on each peer, waits for the peers' flags on its own buffer, and sums the slots in rank
order. All ranks therefore add the same numbers in the same order and get bit-identical
results, which keeps the replicated residual stream identical across ranks.

Reuse without a second barrier: slots and flags come in two parities, and a rank cannot
run more than one call ahead of its peers (each call waits for every peer's flag of that
call), so a call never overwrites a slot a peer may still read. The parity is a counter
per program in device memory, advanced by the kernel itself, so it stays right inside
CUDA graphs, whatever the number of calls per graph.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl
from kiln.kernels.pdl import pdl_start

log = logging.getLogger("kiln")

_SPIN_LIMIT = 1 << 26  # ~1-2 min of polling: a peer that never arrives (a desync, a dead
# rank) yields garbage rather than a hung GPU; the engine's watchdog reports the dead rank


@triton.jit
def _signal(flag_ptr):
    tl.atomic_xchg(flag_ptr, 1, sem="release", scope="sys")


@triton.jit
def _wait(flag_ptr, SPIN_LIMIT: tl.constexpr):
    spins = 0
    while (tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys") != 1) & (spins < SPIN_LIMIT):
        spins += 1
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, 0, sem="relaxed", scope="sys")


@triton.jit
def _one_shot_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    data_ptrs, flag_ptrs, counter_ptr,
    n_cols, stride_x, stride_res, stride_out, stride_res_out, slot_elems, max_rows, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_N: tl.constexpr, FUSE_NORM: tl.constexpr,
    SPIN_LIMIT: tl.constexpr, PDL: tl.constexpr,
):
    """One program per row: push the row to every rank, barrier per row, reduce in rank
    order; with FUSE_NORM also s = reduced + residual (stored), y = w * rms_norm(s)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    count = tl.load(counter_ptr + row)
    parity = count % 2
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    # slot (parity, source rank, row) of every destination rank
    slot = ((parity * WORLD + RANK) * max_rows + row).to(tl.int64) * slot_elems
    for q in tl.static_range(WORLD):
        base = tl.load(data_ptrs + q).to(tl.pointer_type(x_ptr.dtype.element_ty))
        tl.store(base + slot + cols, x, mask=mask)
    tl.debug_barrier()
    flag = (parity * max_rows + row) * WORLD
    for q in tl.static_range(WORLD):
        if q != RANK:
            peer_flags = tl.load(flag_ptrs + q).to(tl.pointer_type(tl.int32))
            _signal(peer_flags + flag + RANK)
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for q in tl.static_range(WORLD):
        if q != RANK:
            _wait(own_flags + flag + q, SPIN_LIMIT)
    own = tl.load(data_ptrs + RANK).to(tl.pointer_type(x_ptr.dtype.element_ty))
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for q in tl.static_range(WORLD):
        src = ((parity * WORLD + q) * max_rows + row).to(tl.int64) * slot_elems
        acc += tl.load(own + src + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    s = acc.to(x_ptr.dtype.element_ty)
    if FUSE_NORM:
        r = tl.load(res_ptr + row.to(tl.int64) * stride_res + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row.to(tl.int64) * stride_res_out + cols, s, mask=mask)
        sf = s.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(sf * sf, axis=0) / n_cols + eps)
        normed = (sf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols,
                 (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, s, mask=mask)
    tl.store(counter_ptr + row, count + 1)


class CustomAllReduce:
    """Symmetric buffers and flags for one TP group; `fits(x)` says whether a tensor goes
    this way (CUDA, rows <= max_rows, last dim <= max_cols), else the caller uses NCCL."""

    def __init__(self, group, device: torch.device, max_rows: int, max_cols: int,
                 dtype: torch.dtype) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_rows, self.max_cols, self.dtype = max_rows, max_cols, dtype
        elems = 2 * self.world * max_rows * max_cols
        self.buffer = symm_mem.empty(elems, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(self.buffer, group.group_name)
        flag_bytes = 2 * max_rows * self.world * 4
        if handle.signal_pad_size < flag_bytes:
            raise RuntimeError(f"signal pad of {handle.signal_pad_size} B < {flag_bytes} B")
        self.handle = handle  # keeps the peers' mappings alive
        self.data_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        self.counters = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.block_n = triton.next_power_of_2(max_cols)

    def fits(self, x: torch.Tensor) -> bool:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        return (x.is_cuda and x.dtype == self.dtype and 0 < rows <= self.max_rows
                and x.shape[-1] <= self.max_cols and x.stride(-1) == 1)

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None,
             weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        rows = x2.shape[0]
        out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        out2 = out.view(-1, n)
        if residual is not None:
            res2 = residual.reshape(-1, n)
            res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            res_out2 = res_out.view(-1, n)
        else:
            res2, res_out, res_out2 = x2, None, out2
        block_n = triton.next_power_of_2(n)
        use_pdl = pdl.ALLREDUCE and pdl.enabled(x)  # opt-in: untested on two GPUs
        _one_shot_kernel[(rows,)](
            x2, res2, weight if weight is not None else x2, out2, res_out2,
            self.data_ptrs, self.flag_ptrs, self.counters,
            n, x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0),
            self.max_cols, self.max_rows, eps,
            RANK=self.rank, WORLD=self.world, BLOCK_N=block_n,
            FUSE_NORM=residual is not None, SPIN_LIMIT=_SPIN_LIMIT, PDL=use_pdl,
            num_warps=min(max(block_n // 512, 1), 8), **pdl.launch_args(use_pdl),
        )
        return out, res_out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, None, 0.0)[0]

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, res = self._run(x, residual, weight, eps)
        assert res is not None
        return out, res


_used_group_names: set[str] = set()


def create(group, device: torch.device, hidden_size: int, dtype: torch.dtype,
           max_rows: int = 64) -> CustomAllReduce | None:
    """The custom all-reduce for this TP group, or None where it cannot run (not CUDA,
    no symmetric memory, no peer access); the reason is logged and NCCL is used.

    Symmetric memory keeps per-process state by group name, and a process that tore one
    engine's process group down gets the same names for the next; rather than meet a
    stale rendezvous, a group name is used once per process."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    if group.group_name in _used_group_names:
        log.info("custom all-reduce: group %s was used by an earlier engine of this "
                 "process; using NCCL", group.group_name)
        return None
    _used_group_names.add(group.group_name)
    try:
        return CustomAllReduce(group, device, max_rows, hidden_size, dtype)
    except Exception as exc:  # an optional fast path: NCCL always works
        log.info("custom all-reduce unavailable (%s: %s); using NCCL", type(exc).__name__, exc)
        return None
