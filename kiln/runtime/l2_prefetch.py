"""Weights asked into L2 while the kernels between two GEMMs run (small decode batches).

At a few rows a decode step streams the weights, one GEMM after another, and HBM idles
during the kernels in between (norm, rotary, attention, SiLU*mul). With a prefetch
budget set, each linear layer, once its GEMM is enqueued, forks a side stream that
asks the L2 for the first `budget` bytes of the next linear's weight (the next in
execution order: qkv -> o -> gate_up -> down -> the next layer's qkv ... -> the LM head),
so those kernels overlap the start of the next weight's read. Inside a CUDA graph the
fork and the join are edges of the graph; outside one, nothing is launched.

KILN_L2_PREFETCH_MB=N (0, the default: off) sets the budget; KILN_L2_PREFETCH_ROWS=R
(default 16) the largest decode batch it is captured for (larger batches are bound by
GEMM FLOPs, not weight bytes). sm_90+ only (the kernel uses cp.async.bulk.prefetch).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from kiln.kernels.l2_prefetch import prefetch_l2, prefetchable
from kiln.layers.linear import LinearBase

MIN_TENSOR_BYTES = 1 << 20  # smaller tensors (scales, biases) are not worth a launch


def _settings() -> tuple[int, int]:
    """(budget in bytes, largest batch) from the environment; a clear error when malformed."""
    values = []
    for name, default in (("KILN_L2_PREFETCH_MB", "0"), ("KILN_L2_PREFETCH_ROWS", "16")):
        text = os.environ.get(name, "") or default
        if not text.isdigit():
            raise ValueError(f"{name}={text!r}: a whole number")
        values.append(int(text))
    return values[0] << 20, values[1]


def linear_chain(model: nn.Module) -> list[nn.Module]:
    """The model's linear layers in the order a decode step runs them, then its LM head.
    Layers inside a mixture of experts are left out (a step reads only some experts)."""
    from kiln.layers.moe import SparseMoE

    skip = [name + "." for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    chain = [m for name, m in model.named_modules() if isinstance(m, LinearBase)
             and not any(name.startswith(s) for s in skip)]
    head = getattr(model, "lm_head", None)
    if head is not None and head not in chain:
        chain.append(head)
    return chain


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What a layer's GEMM reads, largest first: its own parameters and buffers of 1 MiB
    and more (the weight in whatever form its quantization method stores it)."""
    found = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
             if t.numel() * t.element_size() >= MIN_TENSOR_BYTES]
    return sorted(found, key=lambda t: -t.numel() * t.element_size())


class WeightPrefetch:
    """Forward hooks on the chain's layers that prefetch the next layer's weight on a side
    stream while `active(rows)` is entered for a batch of at most max_rows rows."""

    def __init__(self, model: nn.Module, budget: int, max_rows: int) -> None:
        self.budget, self.max_rows = budget, max_rows
        chain = linear_chain(model)
        self.next_weights = {id(a): [t for t in weight_tensors(b) if prefetchable(t)]
                             for a, b in zip(chain, chain[1:])}
        self.side = torch.cuda.Stream(device=next(model.parameters()).device)
        self.on = False
        self.forked = False
        self.requested = 0  # bytes asked for since the last active() began
        self.hooks = [m.register_forward_hook(self._after) for m in chain[:-1]]

    @classmethod
    def from_env(cls, model: nn.Module) -> WeightPrefetch | None:
        budget, rows = _settings()
        device = next(model.parameters()).device
        if budget == 0 or device.type != "cuda" or \
                torch.cuda.get_device_capability(device)[0] < 9:
            return None
        return cls(model, budget, rows)

    def _after(self, module: nn.Module, inputs: object, output: object) -> None:
        if not self.on:
            return
        tensors = self.next_weights.get(id(module))
        if not tensors:
            return
        self.side.wait_stream(torch.cuda.current_stream())  # after this GEMM is enqueued
        left = self.budget
        with torch.cuda.stream(self.side):
            for t in tensors:
                asked = prefetch_l2(t, left)
                left -= asked
                self.requested += asked
                if left < 16:
                    break
        self.forked = True

    @contextlib.contextmanager
    def active(self, rows: int) -> Iterator[None]:
        """Prefetch during the forward run inside (a decode step of `rows` rows), if it is
        small enough; the side stream joins the current one on the way out."""
        self.on, self.requested = rows <= self.max_rows, 0
        try:
            yield
        finally:
            self.on = False
            if self.forked:
                torch.cuda.current_stream().wait_stream(self.side)
                self.forked = False

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
