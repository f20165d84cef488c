"""Collectives used by the parallel layers. A layer whose mapping has one TP rank never
calls them, so single-rank models do not depend on the process-group state here."""

from __future__ import annotations

import torch
import torch.distributed as dist

_tp_group: dist.ProcessGroup | None = None


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    global _tp_group
    _tp_group = group


def tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        dist.all_reduce(x, group=_tp_group)
    return x


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


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """x as rank 0 of the default group holds it, on every rank (in place)."""
    dist.broadcast(x, src=0)
    return x
