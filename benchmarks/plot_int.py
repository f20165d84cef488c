"""Bar charts of the integer-weight kernel sweeps (int_gemv_bench.py, int_batch_bench.py):
per linear of a Llama-3.1-8B layer, microseconds a call of bf16 cuBLAS, of kiln's choice
when the sweep ran ("auto") and of the fastest launch of the grid, int4 and int8 side by
side (one row of panels per batch size in the int_batch sweep).

    python benchmarks/plot_int.py int_gemv.json [int_batch.json ...] --out int.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

SHAPES = ("qkv", "o", "gate_up", "down")
COLORS = {"bf16 cuBLAS": "#7f8c8d", "kiln (auto)": "#c0392b", "best launch": "#2980b9"}


def panels(results: list[dict]) -> dict[int, dict[str, dict[str, list[float]]]]:
    """rows (M) -> weights (int4, int8) -> series -> microseconds per shape."""
    times: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for r in results:
        times[(r.get("M", 1), r["kind"], r["shape"])].append((r["us"], str(r["config"])))
    out: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(dict)
    for m in sorted({key[0] for key in times}):
        for kind in ("int4", "int8"):
            if not any((m, kind, s) in times for s in SHAPES):
                continue
            series: dict[str, list[float]] = {name: [] for name in COLORS}
            for shape in SHAPES:
                runs = times.get((m, kind, shape), [])
                auto = [us for us, c in runs if c == "auto"]
                series["bf16 cuBLAS"].append(min(times.get((m, "bf16", shape), [(0.0, "")]))[0])
                series["kiln (auto)"].append(auto[0] if auto else 0.0)
                series["best launch"].append(min(runs)[0] if runs else 0.0)
            out[m][kind] = series
    return out


def plot(results: list[dict], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = panels(results)
    ncols = max(len(v) for v in rows.values())
    fig = Figure(figsize=(5.2 * ncols, 3.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (m, kinds) in enumerate(rows.items()):
        for j, (kind, series) in enumerate(kinds.items()):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            width = 0.8 / len(series)
            for k, (name, values) in enumerate(series.items()):
                ax.bar([x + k * width for x in range(len(SHAPES))], values, width, label=name,
                       color=COLORS[name])
            ax.set_xticks([x + width for x in range(len(SHAPES))], list(SHAPES))
            total = {name: sum(v) for name, v in series.items()}
            ax.set_title(f"{kind}, {m} row{'s' if m > 1 else ''}: a layer "
                         + " / ".join(f"{t:.0f}" for t in total.values()) + " us", fontsize=9)
            ax.set_ylabel("us a call")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default="int.png")
    args = ap.parse_args()
    results, devices = [], set()
    for name in args.inputs:
        with open(name) as f:
            data = json.load(f)
        results += data["results"]
        devices.add(data.get("device", "?"))
    plot(results, args.out, "integer-weight linears, Llama-3.1-8B shapes, "
         + ", ".join(sorted(devices)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
