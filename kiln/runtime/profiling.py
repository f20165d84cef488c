"""Named phases of an engine step, for profilers.

    with phase("kiln.forward"): ...

Off (the default), `phase` returns one shared no-op context: nothing is recorded and a
step pays a function call per phase. On (`enable()`, `kiln bench ... --profile DIR`, or
KILN_NVTX=1 in the environment), each phase is an NVTX range on CUDA machines, so
`nsys profile kiln bench latency ...` shows the step's phases on the timeline, and a
`torch.profiler` record_function, so torch profiler traces show them too.

The phases: kiln.schedule (the scheduler picks the step's requests), kiln.prepare (the
step's input tensors), kiln.forward (the model, eager or a CUDA graph replay, and the
logits), kiln.sample, kiln.wait_tokens (the host waits for the sampled tokens: the
step's one sync), kiln.detokenize (tokens applied, text, stop checks, outputs).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

PHASES = ("kiln.schedule", "kiln.prepare", "kiln.forward", "kiln.sample", "kiln.wait_tokens",
          "kiln.detokenize")
_enabled = os.environ.get("KILN_NVTX", "0") == "1"
_OFF = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


class _Phase:
    __slots__ = ("name", "record", "nvtx")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nvtx = torch.cuda.is_available()
        self.record = torch.profiler.record_function(name)

    def __enter__(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self.record.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.record.__exit__(*exc)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()


def phase(name: str) -> contextlib.AbstractContextManager:
    return _Phase(name) if _enabled else _OFF
