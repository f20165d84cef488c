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


def broadcast_from(x: torch.Tensor, src: int) -> torch.Tensor:
    """x as global rank `src` holds it, on every rank (in place)."""
    dist.broadcast(x, src=src)
    return x


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
    out = []
    for shape in like:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=prev_rank)
        out.append(t)
    return tuple(out)
