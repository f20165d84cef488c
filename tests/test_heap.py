"""kiln.runtime.heap: serving processes freeze their start-up heap; library callers never."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kiln.runtime import heap


def test_freeze_only_where_allowed() -> None:
    """In a fresh interpreter: no freeze until allowed; then the whole heap is frozen, so a
    full collection has (nearly) nothing left to walk."""
    script = textwrap.dedent("""
        import gc, time
        import torch  # a heap like a serving process's
        from kiln.runtime import heap
        assert heap.freeze_startup_heap() == 0 and gc.get_freeze_count() == 0
        heap.allow_freeze()
        frozen = heap.freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 10_000, frozen
        assert len(gc.get_objects()) < frozen / 10, (len(gc.get_objects()), frozen)
        print("ok", frozen)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_frozen_heap_is_freed_at_exit() -> None:
    """A process that froze its heap (kiln bench, kiln serve) exits quietly: the frozen
    objects go back to the collector at exit, so Triton's bindings find none of theirs
    alive (they printed ~30 lines of "nanobind: leaked ..." after every `kiln bench`)."""
    script = textwrap.dedent("""
        import kiln.kernels.attention_prefill  # Triton's IR objects, held by the kernels
        from kiln.runtime import heap
        heap.allow_freeze()
        assert heap.freeze_startup_heap() > 10_000
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
    assert "leaked" not in done.stderr, done.stderr[:500]


def test_cli_called_in_process_leaves_the_heap_alone(tmp_path, monkeypatch) -> None:
    """main(argv) from a caller's process (tests, scripts) is not the kiln command: it
    must not freeze that process's objects."""
    from kiln.cli import main

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(heap, "_allowed", False)
    assert main(["cache", "list"]) == 0
    assert not heap._allowed
    assert heap.freeze_startup_heap() == 0


def test_collection_watch_counts_pauses() -> None:
    """CollectionWatch (kiln bench's "garbage collector paused the run" line) sees each
    collection inside its block, full ones apart, and nothing after it."""
    import gc

    with heap.CollectionWatch() as watch:
        gc.collect()
        gc.collect(0)
    gc.collect()
    got = watch.summary()
    assert got["collections"] >= 2 and got["full"] == 1, got
    assert got["ms"] >= got["full_max_ms"] > 0, got


def test_frozen_while_gives_everything_back() -> None:
    """LLM.generate's scope (a fresh interpreter): the heap is frozen inside and wholly
    unfrozen after, so an engine dropped later is freed; a heap frozen before (kiln's
    command line) stays frozen."""
    script = textwrap.dedent("""
        import gc
        from kiln.runtime import heap
        assert gc.get_freeze_count() == 0
        with heap.frozen_while():
            inside = gc.get_freeze_count()
        assert inside > 1000 and gc.get_freeze_count() == 0, inside
        gc.freeze()
        before = gc.get_freeze_count()
        with heap.frozen_while():
            pass
        assert gc.get_freeze_count() == before
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
