"""The Python heap of a serving process: no full garbage collection walks the start-up heap.

A loaded engine's process holds a few hundred thousand Python objects (torch's and
transformers' modules, the tokenizer, the model's layers), and a full (generation 2)
collection walks every one of them: ~100 ms on the 2-core CPU CI runs on (SmolLM2,
186k objects), and one such pause stalled a step of an FP8 128 / 128 run on an H200 for
130 ms (BENCHMARKS.md, twenty-first session), what a client sees as a TPOT spike. After
start-up, freeze_startup_heap moves all of it to the permanent generation (gc.freeze),
so later collections walk only what serving creates. The engine's objects are never
freed then, which is what a serving process wants and a test process creating engine
after engine does not: processes that run kiln's command line (allow_freeze) or an
engine process of their own freeze; a library caller's process is frozen only while
LLM.generate runs (frozen_while), and everything goes back to the collector after it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)
_allowed = False
_unfreeze_at_exit = False


def allow_freeze() -> None:
    """This process runs kiln's command line (or is an engine process): it may freeze."""
    global _allowed
    _allowed = True


def freeze_startup_heap() -> int:
    """gc.collect() then gc.freeze() where allowed; the objects now frozen (0: not allowed)."""
    global _unfreeze_at_exit
    if not _allowed:
        return 0
    if not _unfreeze_at_exit:  # shutdown then frees them (Triton's bindings otherwise print
        atexit.register(gc.unfreeze)  # ~30 lines of "nanobind: leaked ..." at exit)
        _unfreeze_at_exit = True
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("froze %d start-up objects out of the garbage collector's walks", frozen)
    return frozen


@contextlib.contextmanager
def frozen_while() -> Iterator[None]:
    """The heap as it is now left out of the collector's walks inside the block, for a
    library caller's generation loop (LLM.generate): full collections there walk only what
    the loop makes, and on leaving everything goes back to the collector, so nothing
    outlives the process's own references. A process that froze its heap already (kiln's
    command line) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class CollectionWatch:
    """Garbage collections inside a with-block (gc.callbacks): how many of each generation
    and how long they paused the process, so that a run's step-time spikes can be told
    apart from the device's."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info.get("generation", 0), time.perf_counter() - self._started))

    def __enter__(self) -> CollectionWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        full = [s for g, s in self.pauses if g == 2]
        return {"collections": len(self.pauses), "full": len(full),
                "ms": round(1000 * sum(s for _, s in self.pauses), 2),
                "full_max_ms": round(1000 * max(full, default=0.0), 2)}
