"""Reports of tuning runs, rebuilt from the database: a table per op and a PNG plot."""

from __future__ import annotations

import math
from pathlib import Path

from .db import Database


def run_rows(db: Database, run_id: int) -> list[dict]:
    rows = db.run_results(run_id)
    for r in rows:
        r["tuned_s"] = r["shipped_s"] / r["speedup"] if r["shipped_s"] else None
        r["vs_mlx"] = r["mlx_s"] / r["tuned_s"] if r["mlx_s"] and r["tuned_s"] else None
    return rows


def geomean(values) -> float:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Speedup of the written heuristics over the shipped ones (and over MLX), per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [r["label"] or r["shape_key"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["speedup"] for r in rows], height=0.4,
            label="tuned / shipped heuristics", color="#3b7dd8")
    ax.barh([i - 0.2 for i in y], [r["vs_mlx"] or 0 for r in rows], height=0.4,
            label="tuned / MLX built-in op", color="#9bbf5a")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2gx"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("speedup (log scale; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
