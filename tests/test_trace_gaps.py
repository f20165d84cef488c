"""benchmarks/trace_gaps.py on a hand-made Chrome trace: --by-launch charges each kernel
call its advance of the device's timeline, so PDL's overlapped starts are not counted
twice, and keys the kernels by grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kernel(name: str, ts: float, dur: float, grid: list[int]) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"grid": grid, "block": [128, 1, 1]}}


def test_by_launch_charges_each_call_its_advance(tmp_path):
    events = [
        _kernel("gemv", 0, 10, [10, 1, 1]),       # ends at 10: advances 10
        _kernel("norm", 5, 10, [4, 1, 1]),        # starts early (PDL), ends at 15: 5
        _kernel("norm", 12, 2, [4, 1, 1]),        # ends inside the one before: 0
        _kernel("gemv", 20, 5, [20, 1, 1]),       # another grid, after 5 us idle: 5
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 30},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = tmp_path / "gaps.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_gaps.py"),
                          str(trace), "--by-launch", "--min-gap-ms", "0.001", "--out",
                          str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["by_launch"]}
    assert set(rows) == {"gemv [10, 1, 1]", "norm [4, 1, 1]", "gemv [20, 1, 1]"}
    assert rows["gemv [10, 1, 1]"] == {"kernel": "gemv [10, 1, 1]", "calls": 1,
                                       "span_us": 10.0, "advance_us": 10.0}
    assert rows["norm [4, 1, 1]"]["calls"] == 2
    assert rows["norm [4, 1, 1]"]["span_us"] == 6.0  # (10 + 2) / 2
    assert rows["norm [4, 1, 1]"]["advance_us"] == 2.5  # (5 + 0) / 2
    assert rows["gemv [20, 1, 1]"]["advance_us"] == 5.0
    # the advances and the idle gap make up the trace's span (25 us)
    advances = sum(r["calls"] * r["advance_us"] for r in rows.values())
    assert advances + 5 == 25
    assert "adv us" in run.stdout
