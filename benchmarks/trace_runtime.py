"""The CUDA runtime calls in a `kiln bench ... --profile DIR` trace (recorded with the host's
activity, the default): calls, total and longest time by name, so that a call that blocks
the host (a stream or event synchronize, a copy from pageable memory, an allocation) stands
out beside the launches.

    python benchmarks/trace_runtime.py DIR/trace.json [--top 20]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from trace_gaps import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    calls: dict[str, list[float]] = collections.defaultdict(list)
    for e in load(args.trace):
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime":
            calls[e["name"]].append(e.get("dur", 0) / 1000)
    rows = sorted(calls.items(), key=lambda kv: -sum(kv[1]))[:args.top]
    print(f"{'CUDA runtime call':40s} {'calls':>8s} {'total ms':>10s} {'max ms':>8s}")
    for name, durs in rows:
        print(f"{name[:40]:40s} {len(durs):8d} {sum(durs):10.2f} {max(durs):8.3f}")


if __name__ == "__main__":
    main()
