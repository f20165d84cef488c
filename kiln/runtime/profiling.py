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
import json
import logging
import os
import time
from collections.abc import Iterator
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


class CompileWatch:
    """Records the Triton kernels compiled (or loaded from Triton's disk cache) while it is
    entered: a compile inside a serving step stalls the device for 0.1-1.5 s, so a timed run
    should see none (the engine compiles at load: kiln.runtime.warmup). Uses Triton's JIT
    hooks, chaining any hook already set; nothing is recorded under TRITON_INTERPRET.

        with CompileWatch() as watch: ...
        watch.events  # [{"kernel": qualified name, "ms": time to compile or load, "repr": ...}]
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._started: dict[int, tuple[str, str, float]] = {}
        self._knobs: Any = None

    def _before(self, **kw: Any) -> Any:
        fn = kw["fn"]
        self._started[id(kw["compile"]["key"])] = (f"{fn.module}.{fn.name}", _spec(kw),
                                                   time.perf_counter())
        return self._chained[0](**kw) if self._chained[0] else None

    def _after(self, **kw: Any) -> Any:
        found = self._started.pop(id(kw["compile"]["key"]), None)
        if found:
            name, text, t0 = found
            self.events.append({"kernel": name, "ms": round(1000 * (time.perf_counter() - t0), 1),
                                "repr": text[:600]})
        return self._chained[1](**kw) if self._chained[1] else None

    def __enter__(self) -> CompileWatch:
        try:
            from triton import knobs
        except ImportError:  # no Triton (or one without JIT hooks): nothing to watch
            return self
        self._knobs = knobs.runtime
        self._chained = (self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook)
        self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._knobs is not None:
            self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._chained
            self._knobs = None

    def summary(self) -> dict[str, Any]:
        """{"count", "ms" (total), "kernels": {name: count}} for a benchmark's JSON."""
        kernels: dict[str, int] = {}
        for e in self.events:
            kernels[e["kernel"]] = kernels.get(e["kernel"], 0) + 1
        return {"count": len(self.events), "ms": round(sum(e["ms"] for e in self.events), 1),
                "kernels": kernels}


class _AfterLoad(CompileWatch):
    """The process-wide watch an engine's load installs: a compile of one of kiln's Triton
    kernels while no engine is loading is a step stalled by a launch the warm-up missed;
    logged once a kernel (other code's kernels, e.g. torch.compile's, are not kiln's)."""

    def __init__(self) -> None:
        super().__init__()
        self.told: set[str] = set()
        self.count, self.seconds = 0, 0.0  # compiles after load and their stalls

    def _after(self, **kw: Any) -> Any:
        result = super()._after(**kw)
        while self.events:
            e = self.events.pop()
            if _loading or not e["kernel"].startswith("kiln."):  # (others' kernels: theirs)
                continue
            self.count += 1
            self.seconds += e["ms"] / 1000
            if e["kernel"] not in self.told:
                self.told.add(e["kernel"])
                logging.getLogger("kiln").warning(
                    "Triton compiled %s inside a step (%.0f ms stall; %s): the engine's "
                    "warm-up missed this launch, please report it", e["kernel"], e["ms"],
                    e["repr"])
        return result


_after_load = _AfterLoad()
_loading = 0


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Around an engine's warm-up and graph capture, whose Triton compiles are expected; the
    first call installs the process-wide watch (_AfterLoad) that logs any other."""
    global _loading, _after_load
    try:
        from triton import knobs
        top = getattr(knobs.runtime.jit_post_compile_hook, "__self__", None)
    except ImportError:
        top = None
    if type(top).__name__ == "_AfterLoad":  # installed (by this module before a reload)
        _after_load = top
    elif _after_load._knobs is None:
        _after_load.__enter__()
    _loading += 1
    try:
        yield
    finally:
        _loading -= 1


def compiles_after_load() -> dict[str, float]:
    """Triton compiles in this process while no engine was loading, and their seconds
    (engine.stats(): /metrics shows them; each stalled a step)."""
    return {"kernel_compiles_after_load": _after_load.count,
            "kernel_compile_stall_seconds": round(_after_load.seconds, 3)}


def _spec(kw: dict[str, Any]) -> str:
    """The launch options and constexpr values of a compile, e.g. "num_warps=8
    num_stages=2 BLOCK_M=128 ...", and which arguments are specialised (16-byte aligned
    or divisible by 16), as far as this Triton's hook says; else Triton's own repr."""
    try:
        data = json.loads(kw["compile"]["specialization_data"])
        names = list(data["signature"])
        opts = data["options"]
        parts = [f"num_warps={opts['num_warps']}", f"num_stages={opts['num_stages']}"]
        for path, value in zip(data["constant_keys"], data["constant_vals"]):
            if data["signature"][names[path[0]]] == "constexpr":
                parts.append(f"{names[path[0]]}={value}")
        aligned = [names[path[0]] for path in data["attrs_keys"]]
        return " ".join(parts) + (f" aligned/div16: {','.join(aligned)}" if aligned else "")
    except Exception:  # another Triton's layout: its repr
        return kw.get("repr", "")
