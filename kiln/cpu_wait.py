"""OpenMP's waiting on a small machine that something else keeps busy.

torch's CPU kernels run OpenMP parallel regions on a thread per physical core, and GNU
OpenMP threads spin while they wait for each other at the end of every region. When
another process holds one of those cores, a thread of every region waits for a core its
spinning sibling will not give up: on the 2-core machine CI runs on, with one core busy,
SmolLM2's batch-1 decode ran at 0.7-0.9 tok/s against 15 with passive waiting (threads
sleep instead), and 8 x 64 tokens at 36 tok/s against 89 (benchmarks/results/
cpu-2026-12-04-s35/). On an idle machine passive waiting costs ~30% (147 against 103 tok/s
at 8 x 64), so the kiln command chooses at start, before torch is imported (OpenMP reads
its settings once): passive when, over 50 ms, at least half a core's worth of the
machine's time went to other work. Only on machines of 2-8 CPUs (a bigger one leaves
torch's threads free cores) and only where the user set none of OMP_WAIT_POLICY,
GOMP_SPINCOUNT, OMP_NUM_THREADS. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def busy_cores(window: float = 0.05, stat: str = "/proc/stat") -> float | None:
    """How many CPUs' worth of time went to anything but idling over `window` seconds
    (steal included: another guest's use of this VM's CPUs), or None where /proc/stat
    cannot tell (not Linux)."""
    try:
        with open(stat) as f:
            before = [int(v) for v in f.readline().split()[1:9]]
        time.sleep(window)
        with open(stat) as f:
            after = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if len(delta) < 5 or total <= 0:
        return None
    idle = delta[3] + delta[4]  # idle, iowait
    return (total - idle) / total * (os.cpu_count() or 1)


def choose_openmp_wait(environ: Mapping[str, str] | None = None,
                       modules: Mapping[str, object] | None = None,
                       cpus: int | None = None, busy: float | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` (os.environ) when the machine is small and
    busy (see the module docstring); returns the policy set, or None. busy: measured here
    when not given."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if "torch" in modules or any(environ.get(k) for k in _SETTINGS) or not 2 <= cpus <= 8:
        return None
    busy = busy_cores() if busy is None else busy
    if busy is None or busy < 0.5:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"  # type: ignore[index]
    return "PASSIVE"
