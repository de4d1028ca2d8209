"""Reports of tuning runs, rebuilt from the database: a table per op and split, and a PNG.

Every time shown was observed: both sides of a written rule come from the same fresh-worker
re-timing (medians and quartiles of the pooled samples), a shape left to the shipped rules
shows the shipped choice's time from its A/A control. The speedup is the median of the
per-pair ratios with their quartiles, not a quotient of the two medians.
"""

from __future__ import annotations

from pathlib import Path

from .db import Database
from .measure import geomean


def run_rows(db: Database, run_id: int) -> list[dict]:
    rows = db.shape_results(run_id)
    for r in rows:
        r["speedup"] = 1.0 / r["ratio"] if r["ratio"] else None
        r["vs_mlx"] = r["mlx_ratio"] / r["ratio"] if r["mlx_ratio"] and r["ratio"] else None
        r["same"] = r["chosen_config"] == r["shipped_config"]
    return rows


def summary(rows: list[dict], split: str, op: str | None = None) -> float | None:
    chosen = [r["speedup"] for r in rows if r["split"] == split and (op is None or r["op"] == op)]
    return geomean(chosen) if chosen and all(chosen) else None


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Speedup of the written heuristics over the shipped ones per shape, training and
    held-out shapes apart, with the pair ratios' quartiles as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    splits = [s for s in ("train", "held-out") if any(r["split"] == s for r in rows)]
    heights = [sum(r["split"] == s for r in rows) for s in splits]
    fig, axes = plt.subplots(len(splits), 1, figsize=(10, 0.3 * sum(heights) + 1.8 * len(splits)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, split in zip(axes[:, 0], splits):
        mine = [r for r in rows if r["split"] == split]
        y = list(range(len(mine)))
        speedups = [r["speedup"] or 1.0 for r in mine]
        low = [s - 1.0 / r["ratio_q3"] if r["ratio_q3"] else 0.0 for s, r in zip(speedups, mine)]
        high = [1.0 / r["ratio_q1"] - s if r["ratio_q1"] else 0.0 for s, r in zip(speedups, mine)]
        colours = ["#bbbbbb" if r["same"] else "#3b7dd8" for r in mine]
        ax.barh(y, speedups, xerr=[low, high], color=colours, height=0.6, error_kw={"linewidth": 0.8})
        for i, r in enumerate(mine):
            if r["band"]:
                ax.plot([1 - r["band"], 1 + r["band"]], [i, i], color="#d85b3b", linewidth=2.5,
                        alpha=0.6, solid_capstyle="butt")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [r["label"] or r["shape_key"] for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        g = summary(rows, split)
        ax.set_title(f"{split} shapes: geometric mean {g:.3f}x" if g else f"{split} shapes", fontsize=8)
    axes[-1, 0].set_xlabel("speedup over the shipped heuristics (log scale; grey: shipped choice kept; "
                           "red: the shape's A/A noise band)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
