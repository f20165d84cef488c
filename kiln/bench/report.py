"""Shared by the benchmark modes: percentiles, a text table, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean and p50/p90/p99 (linear interpolation) of `values` times `scale`."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(v * scale for v in values)

    def percentile(p: float) -> float:
        rank = (len(ordered) - 1) * p / 100
        low, high = math.floor(rank), math.ceil(rank)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    return {"mean": sum(ordered) / len(ordered),
            **{f"p{p}": percentile(p) for p in PERCENTILES}}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers), *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_writable(path: str | Path | None, option: str, folder: bool = False) -> None:
    """A KilnError, before any work, unless `path` (a file, or with folder a directory;
    None: not asked for) can be written: missing parents can be made, none is a file."""
    from kiln.errors import KilnError

    if path is None:
        return
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise KilnError(f"{option} {path} is a {'file' if folder else 'directory'}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise KilnError(f"{option} {path} is read-only")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KilnError(f"{option} {path}: {existing} is a file, not a directory")
    try:  # access() says yes to root everywhere: make something there instead
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise KilnError(f"{option} {path}: cannot write in {existing} "
                        f"({e.strerror or e})") from None


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot_lines(path: Path, title: str, x_label: str, x: Sequence[float],
               panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]]) -> None:
    """One panel per (y label, {series name: values}), side by side, written as PNG."""
    # The Agg canvas directly: no pyplot, so no global backend switch and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (y_label, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        drawn = False
        for name, values in series.items():
            points = [(a, b) for a, b in zip(x, values) if b is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
                drawn = True
        if len(x) > 1 and min(x) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(x), [str(v) for v in x])
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        if drawn:  # a panel with no value (TPOT, ITL of 1-token answers) has no legend
            ax.legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def step_kinds(seconds: list[float], shapes: list[tuple[int, int] | None],
               overlap: bool, waits: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Host step times split by what the step computed: "decode" (decode rows only) and
    "prompt" (prompt or recomputed tokens, with or without decode rows). With overlap
    scheduling a call launches step N and waits for step N-1's tokens, so its time is
    step N-1's device time: each launch is charged the next call's time. waits: the
    seconds each call spent waiting for sampled tokens (kiln.runtime.step.TOKEN_WAIT); a
    kind whose calls hardly wait kept its device waiting on the host instead."""
    waits = waits if waits is not None else [0.0] * len(seconds)
    if overlap:
        seconds, waits = seconds[1:] + [0.0], waits[1:] + [0.0]
    kinds: dict[str, dict[str, float]] = {}
    for t, wait, shape in zip(seconds, waits, shapes):
        if shape is None:
            continue
        decodes, others = shape
        k = kinds.setdefault("prompt" if others else "decode",
                             {"steps": 0, "seconds": 0.0, "decode_rows": 0, "prompt_tokens": 0,
                              "token_wait_seconds": 0.0})
        k["steps"] += 1
        k["seconds"] += t
        k["token_wait_seconds"] += wait
        k["decode_rows"] += decodes
        k["prompt_tokens"] += others
    return kinds
