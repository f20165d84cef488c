"""Step phases for profilers, and `kiln bench ... --profile DIR` (CPU: the torch profiler's
CPU activity; on a GPU the same run adds kernels and NVTX ranges)."""

from __future__ import annotations

import json

import pytest

from kiln.runtime import profiling


def test_bench_profile_writes_a_trace_with_the_step_phases(tiny_engines, tmp_path, capsys):
    from kiln.cli import main

    out = tmp_path / "prof"
    code = main(["bench", "throughput", str(tiny_engines["llama"]), "--input-len", "12",
                 "--output-len", "6", "--num-requests", "4", "--device", "cpu",
                 "--profile", str(out), "--out", str(tmp_path / "r.json")])
    assert code in (0, None)
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # every phase of a plain CPU step is on the timeline
    assert set(profiling.PHASES) <= names, set(profiling.PHASES) - names
    printed = capsys.readouterr().out
    table = (out / "ops.txt").read_text()
    assert "kiln.forward" in printed and "aten::" in table
    assert not profiling.enabled()  # switched back off after the run
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["kiln"]["output_tok_s"] > 0
    # step times are reported (the stall a prompt chunk causes is bounded by max_num_tokens)
    step = result["kiln"]["step_ms"]
    assert result["kiln"]["steps"] >= 6 and 0 < step["p50"] <= step["p99"] <= step["max"]
    assert result["max_num_tokens"] > 0 and "step time p50" in printed
    # ... and split by kind: 4 prompts of 12 tokens, then 4 x 5 decode rows
    kinds = result["kiln"]["step_kinds"]
    assert kinds["prompt"]["prompt_tokens"] == 4 * 12
    assert kinds["prompt"]["decode_rows"] + kinds["decode"]["decode_rows"] == 4 * 5
    launched = kinds["prompt"]["steps"] + kinds["decode"]["steps"]
    assert launched == result["kiln"]["steps"]  # CPU: no overlap, every call launched one
    assert "decode steps:" in printed
    # the CPU compiles no Triton kernel: none reported
    assert result["kiln"]["compiles"]["count"] == 0 and "Triton compiled" not in printed


def test_step_kinds_charge_each_launch_the_next_call_under_overlap():
    from kiln.bench.report import step_kinds

    seconds = [0.5, 0.2, 0.1, 0.05]  # the last call launched nothing, applied the last step
    shapes = [(0, 100), (3, 0), (3, 0), None]
    waits = [0.0, 0.15, 0.01, 0.04]  # the host's waits for tokens, in the same calls
    assert step_kinds(seconds, shapes, overlap=True, waits=waits) == {
        "prompt": {"steps": 1, "seconds": 0.2, "decode_rows": 0, "prompt_tokens": 100,
                   "token_wait_seconds": 0.15},
        "decode": {"steps": 2, "seconds": 0.1 + 0.05, "decode_rows": 6, "prompt_tokens": 0,
                   "token_wait_seconds": 0.01 + 0.04}}
    assert step_kinds(seconds, shapes, overlap=False)["prompt"]["seconds"] == 0.5


def test_phases_are_free_when_off(monkeypatch):
    """Off, every phase is the same no-op context (no profiler object per step)."""
    profiling.enable(False)
    assert profiling.phase("kiln.forward") is profiling.phase("kiln.sample")
    profiling.enable(True)
    try:
        with profiling.phase("kiln.forward") as ctx:
            assert ctx is None
        assert profiling.phase("kiln.forward") is not profiling.phase("kiln.forward")
    finally:
        profiling.enable(False)


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False)])
def test_environment_switch(value, expected, monkeypatch):
    import importlib

    monkeypatch.setenv("KILN_NVTX", value)
    module = importlib.reload(profiling)
    try:
        assert module.enabled() is expected
    finally:
        monkeypatch.delenv("KILN_NVTX")
        importlib.reload(profiling)


def test_compile_watch_records_what_triton_compiles_and_restores_its_hooks():
    """CompileWatch takes Triton's JIT hooks while entered (called as Triton 3.x calls them:
    the cache hook before a compile, the post-compile hook after), passes each call on to a
    hook already set, and puts that hook back on exit. The GPU test
    tests/test_kernels_gpu.py::test_mixed_steps_compile_no_new_prefill_variant uses it on
    real compiles."""
    knobs = pytest.importorskip("triton").knobs.runtime
    seen = []
    def before(**kw):
        seen.append(kw["repr"])

    saved = knobs.jit_cache_hook, knobs.jit_post_compile_hook
    knobs.jit_cache_hook, knobs.jit_post_compile_hook = before, None
    try:
        class Fn:
            module, name = "kiln.kernels.x", "_kernel"

        with profiling.CompileWatch() as watch:
            for key in ("a", "b"):
                call = dict(key=key, repr=f"_kernel[{key}]", fn=Fn,
                            compile={"key": key}, is_manual_warmup=False,
                            already_compiled=False)
                assert not knobs.jit_cache_hook(**call)  # a true answer would skip the compile
                knobs.jit_post_compile_hook(**call)
        assert [e["kernel"] for e in watch.events] == ["kiln.kernels.x._kernel"] * 2
        assert watch.summary()["kernels"] == {"kiln.kernels.x._kernel": 2}
        assert seen == ["_kernel[a]", "_kernel[b]"]  # the hook set before still ran
        assert (knobs.jit_cache_hook, knobs.jit_post_compile_hook) == (before, None)
    finally:
        knobs.jit_cache_hook, knobs.jit_post_compile_hook = saved


def test_compiles_after_an_engine_load_are_logged_once_a_kernel(caplog):
    """After an engine's load (profiling.loading: its warm-up and graph capture) a Triton
    compile is a stalled step: logged as a warning naming the kernel, once a kernel; none
    while an engine loads."""
    knobs = pytest.importorskip("triton").knobs.runtime
    saved = knobs.jit_cache_hook, knobs.jit_post_compile_hook
    try:
        with profiling.loading():
            pass  # installs the process-wide watch
        counted = profiling._after_load.count, profiling._after_load.seconds

        class Fn:
            module, name = "kiln.kernels.x", "_late_kernel"

        def compile_once(key: str) -> None:
            call = dict(key=key, repr="r", fn=Fn, compile={"key": key},
                        is_manual_warmup=False, already_compiled=False)
            knobs.jit_cache_hook(**call)
            knobs.jit_post_compile_hook(**call)

        before = profiling.compiles_after_load()["kernel_compiles_after_load"]
        with caplog.at_level("WARNING", logger="kiln"):
            with profiling.loading():
                compile_once("during load")
            assert not caplog.records
            compile_once("in a step")
            compile_once("again")
            Fn.module = "torch._inductor.generated"  # another library's kernel: not kiln's
            compile_once("not ours")
        # every compile after load counts (engine.stats(), /metrics), each kernel told once
        assert profiling.compiles_after_load()["kernel_compiles_after_load"] == before + 2
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "kiln.kernels.x._late_kernel" in warned[0] \
            and "inside a step" in warned[0]
    finally:  # the process's counters as they were (a server test reads them later)
        watch = profiling._after_load
        watch.told.discard("kiln.kernels.x._late_kernel")
        watch.count, watch.seconds = counted
        knobs.jit_cache_hook, knobs.jit_post_compile_hook = saved
