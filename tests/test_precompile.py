"""kiln.runtime.precompile's bookkeeping on the CPU (the compiles themselves need a GPU:
tests/test_gpu_engine.py::test_parallel_compile_at_load): launches that would compile
are deferred once per kernel variant, compiled on the pool's threads, a failing compile
left to the real warm-up, and Triton's hook given back even when the pass fails."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch
from triton import knobs

from kiln.runtime.precompile import compile_in_parallel


class FakeKernel:
    def __init__(self, fail: bool = False) -> None:
        self.loaded: list[tuple[str, str]] = []
        self.fail = fail

    def preload(self, data: str) -> None:
        self.loaded.append((data, threading.current_thread().name))
        if self.fail:
            raise RuntimeError("out of resources")


def launch(kernel: FakeKernel, key: str) -> bool:
    """What Triton's JIT does on an in-memory cache miss: ask the cache hook first."""
    hook = knobs.runtime.jit_cache_hook
    return bool(hook and hook(key=key, repr=key, fn=SimpleNamespace(jit_function=kernel),
                              compile={"key": key, "specialization_data": f"spec {key}"},
                              is_manual_warmup=False, already_compiled=False))


def test_each_variant_compiled_once_on_the_threads() -> None:
    a, b, broken = FakeKernel(), FakeKernel(), FakeKernel(fail=True)
    skipped = []

    def run() -> None:
        for kernel, key in ((a, "k1"), (a, "k1"), (a, "k2"), (b, "k1"), (broken, "k3")):
            skipped.append(launch(kernel, key))

    before = knobs.runtime.jit_cache_hook
    count, seconds = compile_in_parallel(run, torch.device("cpu"), threads=3)
    assert knobs.runtime.jit_cache_hook is before
    assert all(skipped) and count == 4 and seconds >= 0
    assert sorted(d for d, _ in a.loaded) == ["spec k1", "spec k2"]
    assert [d for d, _ in b.loaded] == ["spec k1"] and len(broken.loaded) == 1
    main = threading.current_thread().name
    assert all(t != main for k in (a, b, broken) for _, t in k.loaded)


def test_a_failing_pass_still_compiles_what_it_found(caplog) -> None:
    """A skipped pass that fails (host code reading outputs no kernel wrote) is logged, the
    kernels it reached still compile, and Triton's hook is given back: the load goes on
    and the real warm-up compiles the rest one by one."""
    before = knobs.runtime.jit_cache_hook
    kernel = FakeKernel()

    def run() -> None:
        launch(kernel, "k1")
        raise ValueError("boom")

    count, _ = compile_in_parallel(run, torch.device("cpu"), threads=2)
    assert knobs.runtime.jit_cache_hook is before
    assert count == 1 and [d for d, _ in kernel.loaded] == ["spec k1"]
    assert "ValueError: boom" in caplog.text


def test_thread_count_from_the_environment(monkeypatch, caplog) -> None:
    """On by default (min(12, usable CPUs)); KILN_COMPILE_THREADS sets the count (0: off);
    a value that is not a number is named in a warning and the default kept."""
    from kiln.runtime import precompile

    monkeypatch.delenv("KILN_COMPILE_THREADS", raising=False)
    default = precompile._threads()
    assert 1 <= default <= 12
    monkeypatch.setenv("KILN_COMPILE_THREADS", "0")
    assert precompile._threads() == 0
    monkeypatch.setenv("KILN_COMPILE_THREADS", " 5 ")
    assert precompile._threads() == 5
    monkeypatch.setenv("KILN_COMPILE_THREADS", "many")
    with caplog.at_level("WARNING", logger="kiln.runtime.precompile"):
        assert precompile._threads() == default
    assert "'many'" in caplog.text
