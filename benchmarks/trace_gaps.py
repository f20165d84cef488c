"""Where the GPU sits idle in a `kiln bench ... --profile DIR` trace, and what the host was
doing meanwhile.

    python benchmarks/trace_gaps.py DIR/trace.json [--min-gap-ms 0.2] [--out gaps.json]

Reads the Chrome trace the torch profiler wrote, merges the device's kernels, copies and
memsets into busy intervals, and lists the idle gaps between them: total idle time, the
gaps by size, and for each host range (kiln's step phases and the outermost torch ops)
how much device idle time fell inside it. A GPU that waits on the host shows its gaps
inside kiln.schedule / kiln.prepare / kiln.detokenize; one that waits on itself (a sync
in the middle of a step) shows them inside the op that synced.

--by-kernel: every kernel by name (calls, device time, and the idle time just before each
call, however short): at batch 1, where a CUDA graph's small kernels and the gaps between
launches go.

--by-launch: every kernel by name and grid (so a layer's linears stand apart), with what
each call adds to the device's timeline: its end minus the latest end of everything that
started before it (0 if it ends earlier). With PDL a kernel starts while the one before
runs, and its span counts that overlap; the advance does not, and the advances plus the
idle gaps add up to the trace's span.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def host_ranges(events: list[dict]) -> list[tuple[float, float, str]]:
    """kiln's phases and the host's torch ops / python ranges, as (start, end, name)."""
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("user_annotation", "cpu_op",
                                                       "python_function", "cuda_runtime",
                                                       "cuda_driver"):
            continue
        out.append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    return out


def attribute(gaps: list[tuple[float, float]], ranges: list[tuple[float, float, str]]
              ) -> dict[str, float]:
    """Idle microseconds overlapped by each host range name (a gap counts once per name)."""
    ranges = sorted(ranges)
    starts = [r[0] for r in ranges]
    per_name: dict[str, float] = collections.defaultdict(float)
    longest = max((r[1] - r[0] for r in ranges), default=0)
    for g0, g1 in gaps:
        seen: dict[str, float] = {}
        lo = bisect.bisect_left(starts, g0 - longest)
        hi = bisect.bisect_right(starts, g1)
        for start, end, name in ranges[lo:hi]:
            overlap = min(end, g1) - max(start, g0)
            if overlap > 0:
                seen[name] = seen.get(name, 0) + overlap
        for name, us in seen.items():
            per_name[name] += min(us, g1 - g0)
    return per_name


def by_kernel(events: list[dict], top: int) -> list[dict]:
    """Per kernel name: calls, device us, and the idle us between the previous device
    event's end and each call's start (gaps over 1 ms left out: host stalls, not launch)."""
    device = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                    if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    end = None
    for start, stop, name in device:
        row = rows[name]
        row[0] += 1
        row[1] += stop - start
        if end is not None and 0 < start - end < 1000:
            row[2] += start - end
        end = stop if end is None else max(end, stop)
    total = sum(r[1] + r[2] for r in rows.values()) or 1.0
    ranked = sorted(rows.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))[:top]
    print(f"\n{'kernel':64s} {'calls':>7s} {'busy ms':>9s} {'idle ms':>9s} {'us/call':>8s} "
          f"{'share':>6s}")
    out = []
    for name, (calls, busy, idle) in ranked:
        print(f"{name[:64]:64s} {calls:7d} {busy / 1000:9.2f} {idle / 1000:9.2f} "
              f"{busy / calls:8.2f} {100 * (busy + idle) / total:5.1f}%")
        out.append({"kernel": name, "calls": calls, "busy_ms": busy / 1000,
                    "idle_before_ms": idle / 1000})
    return out


def by_launch(events: list[dict], top: int) -> list[dict]:
    """Per kernel name and grid: calls, span us (start to end) and advance us (the call's
    end past the latest end of every device event that started before it) a call."""
    device = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"],
                     tuple((e.get("args") or {}).get("grid") or ()))
                    for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    frontier = None
    for start, stop, name, grid in device:
        row = rows[f"{name[:52]} {list(grid)}" if grid else name[:64]]
        row[0] += 1
        row[1] += stop - start
        if frontier is None or stop > frontier:
            row[2] += stop - max(start, frontier if frontier is not None else start)
            frontier = stop
    total = sum(r[2] for r in rows.values()) or 1.0
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\n{'kernel [grid]':72s} {'calls':>7s} {'span us':>8s} {'adv us':>8s} {'share':>6s}")
    out = []
    for key, (calls, span, adv) in ranked:
        print(f"{key[:72]:72s} {calls:7d} {span / calls:8.2f} {adv / calls:8.2f} "
              f"{100 * adv / total:5.1f}%")
        out.append({"kernel": key, "calls": calls, "span_us": span / calls,
                    "advance_us": adv / calls})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-gap-ms", type=float, default=0.2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--detail", type=int, default=6, help="largest gaps shown in detail")
    ap.add_argument("--by-kernel", action="store_true",
                    help="also the kernels by name with the idle time before their calls")
    ap.add_argument("--by-launch", action="store_true",
                    help="also the kernels by name and grid with each call's advance of "
                         "the device's timeline (PDL overlaps left out)")
    args = ap.parse_args()
    events = load(args.trace)
    kernels = by_kernel(events, args.top) if args.by_kernel else None
    launches = by_launch(events, args.top) if args.by_launch else None
    busy = busy_intervals(events)
    if not busy:
        raise SystemExit("no device events in the trace (a CPU run?)")
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)
            if busy[i + 1][0] - busy[i][1] >= 1000 * args.min_gap_ms]
    idle_us = sum(b - a for a, b in gaps)
    sizes = sorted((b - a for a, b in gaps), reverse=True)
    print(f"device span {span / 1e6:.3f} s, busy {busy_us / 1e6:.3f} s "
          f"({100 * busy_us / span:.1f}%), idle in gaps >= {args.min_gap_ms} ms: "
          f"{idle_us / 1e6:.3f} s over {len(gaps)} gaps")
    buckets = [(0.2, 1), (1, 5), (5, 20), (20, 100), (100, 1e9)]
    for lo, hi in buckets:
        sel = [s for s in sizes if 1000 * lo <= s < 1000 * hi]
        if sel:
            print(f"  gaps {lo:>5} - {hi if hi < 1e9 else 'inf':>5} ms: {len(sel):6d}, "
                  f"{sum(sel) / 1e6:.3f} s")
    per_name = attribute(gaps, host_ranges(events))
    print("\nhost ranges overlapping the idle gaps (idle ms inside each; nested ranges "
          "each count):")
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:args.top]
    for name, us in ranked:
        print(f"  {us / 1000:10.1f} ms  {name[:90]}")
    print(f"\nthe {args.detail} largest gaps: the device work right after each (what the host "
          "was preparing) and the host ranges overlapping it most")
    device = sorted((e["ts"], e["name"]) for e in events
                    if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    device_ts = [t for t, _ in device]
    ranges = host_ranges(events)
    for g0, g1 in sorted(gaps, key=lambda g: g[0] - g[1])[:args.detail]:
        i = bisect.bisect_left(device_ts, g1)
        after = [name[:60] for _, name in device[i:i + 3]]
        inside = sorted(((min(e, g1) - max(s, g0), n) for s, e, n in ranges
                         if min(e, g1) - max(s, g0) > 0), reverse=True)[:6]
        print(f"  {(g1 - g0) / 1000:9.1f} ms at +{(g0 - busy[0][0]) / 1e6:.3f} s; next: {after}")
        for us, name in inside:
            print(f"      {us / 1000:9.1f} ms  {name[:80]}")
    if args.out:
        args.out.write_text(json.dumps({
            "span_s": span / 1e6, "busy_s": busy_us / 1e6, "idle_s": idle_us / 1e6,
            "gaps": len(gaps), "largest_gaps_ms": [s / 1000 for s in sizes[:50]],
            "idle_ms_by_host_range": {k: v / 1000 for k, v in ranked},
            "by_kernel": kernels, "by_launch": launches}, indent=1))


if __name__ == "__main__":
    main()
