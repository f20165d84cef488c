"""One chart of where every issue target stands: the latest measurement as a share of its
goal (1.0 = met; for a time, goal / latest), from benchmarks/results/targets.json (the
table at the top of BENCHMARKS.md).

    python benchmarks/plot_targets.py [benchmarks/results/targets.json] --out targets.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default="benchmarks/results/targets.json")
    ap.add_argument("--out", default="benchmarks/results/targets.png")
    args = ap.parse_args()
    with open(args.data) as f:
        data = json.load(f)
    rows = [(f"#{r['issue']} {r['target']}", r["latest"] / r["goal"])
            for r in data["higher_is_better"]]
    rows += [(f"#{r['issue']} {r['target']}", r["goal"] / r["latest"])
             for r in data["lower_is_better"]]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.32 * len(rows) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names, shares = zip(*rows)
    ax.barh(range(len(rows)), shares, color=["#27ae60" if v >= 1 else "#c0392b"
                                             for v in shares])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latest / goal (1.0 = target met)")
    for i, v in enumerate(shares):
        ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=7)
    ax.set_title(f"kiln's targets, {data['updated']}\n{data['card']}", fontsize=9)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
