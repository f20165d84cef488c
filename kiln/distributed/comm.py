"""Collectives used by the parallel layers. A layer whose mapping has one TP rank never
calls them, so single-rank models do not depend on the process-group state here."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_tp_group: dist.ProcessGroup | None = None
_custom = None  # kiln.distributed.custom_allreduce.CustomAllReduce for small messages


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    global _tp_group, _custom
    _tp_group, _custom = group, None


def setup_custom_all_reduce(device: torch.device, hidden_size: int, dtype: torch.dtype,
                            tp_size: int) -> bool:
    """Use the one-shot NVLink all-reduce for small messages of this TP group when every
    rank of it can (collective: all TP ranks call this). Returns whether it is on."""
    global _custom
    from kiln.distributed import custom_allreduce

    _custom = None
    if tp_size == 1 or device.type != "cuda":
        return False
    mine = custom_allreduce.create(_tp_group, device, hidden_size, dtype)
    ok = torch.tensor([int(mine is not None)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=_tp_group)
    _custom = mine if int(ok.item()) else None
    return _custom is not None


def tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """The sum over the TP group (a new tensor or x itself, reduced in place)."""
    if tp_size > 1:
        if _custom is not None and _custom.fits(x):
            return _custom.all_reduce(x)
        dist.all_reduce(x, group=_tp_group)
    return x


def tp_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float, tp_size: int
                               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(sum_tp(x) + residual), sum_tp(x) + residual) in one kernel where the
    custom all-reduce takes x; None where the caller must reduce and normalise apart."""
    if tp_size > 1 and _custom is not None and _custom.fits(x) and \
            residual.dtype == x.dtype and residual.stride(-1) == 1:
        return _custom.all_reduce_add_rms_norm(x, residual, weight, eps)
    return None


def tp_all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(_tp_group))]
    dist.all_gather(parts, x.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=-1)


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks of the default group."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_from(x: torch.Tensor, src: int) -> torch.Tensor:
    """x as global rank `src` holds it, on every rank (in place)."""
    dist.broadcast(x, src=src)
    return x


def broadcast_async(x: torch.Tensor, src: int) -> Any:
    """Start broadcasting x from global rank `src` (in place); returns the work to wait on.
    On gloo the host goes on meanwhile (a pipeline stage launches its next micro-batch)."""
    return dist.broadcast(x, src=src, async_op=True)


def broadcast_object_from(obj: object, src: int) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def pp_send(tensors: tuple[torch.Tensor, ...], next_rank: int) -> None:
    """Hand a stage's activations to the same TP rank of the next pipeline stage."""
    for t in tensors:
        dist.send(t.contiguous(), dst=next_rank)


def pp_recv(like: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device,
            prev_rank: int) -> tuple[torch.Tensor, ...]:
    return pp_recv_into(tuple(torch.empty(shape, dtype=dtype, device=device)
                              for shape in like), prev_rank)


def pp_recv_into(out: tuple[torch.Tensor, ...], prev_rank: int) -> tuple[torch.Tensor, ...]:
    """Receive the previous stage's activations into `out` (contiguous tensors)."""
    for t in out:
        dist.recv(t, src=prev_rank)
    return out
