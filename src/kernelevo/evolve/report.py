"""`kernelevo evolve report`: an evolution run, rebuilt from the database — the best
programs with their scores, the winner against its seed, what became of the proposals, the
tokens and cost, and a PNG of the best training and held-out scores over iterations."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .loop import unified_diff
from .store import EvolveRun, EvolveStore, ProgramRow


@dataclass
class RunReport:
    run: EvolveRun
    summary: dict
    best: list[ProgramRow]
    outcomes: Counter
    tokens_in: int
    tokens_out: int
    cost: float
    winner: ProgramRow | None
    seed: ProgramRow | None

    @property
    def diff(self) -> str:
        if self.winner is None or self.seed is None:
            return ""
        return unified_diff(self.seed.text, self.winner.text, f"{self.seed.proposer} (#{self.seed.id})",
                            f"winner (#{self.winner.id})")


def build(store: EvolveStore, run_id: int, top: int = 8) -> RunReport:
    run = store.run(run_id)
    if run is None:
        raise ValueError(f"no evolution run {run_id}")
    summary = json.loads(run.summary) if run.summary else {}
    programs = store.programs(run_id)
    scored = sorted((p for p in programs if p.train_score is not None),
                    key=lambda p: (-p.train_score, p.rules, p.id))
    proposals = store.proposals(run_id)
    winner = store.program(summary["winner"]) if summary.get("winner") else None
    lineage = store.lineage(winner.id) if winner else []
    return RunReport(run, summary, scored[:top], Counter(p.outcome for p in proposals),
                     sum(p.tokens_in or 0 for p in proposals), sum(p.tokens_out or 0 for p in proposals),
                     sum(p.cost or 0.0 for p in proposals), winner, lineage[0] if lineage else None)


def curves(programs: list[ProgramRow]) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """Per iteration the best training score so far; and the held-out scores observed."""
    best, xs, ys = None, [], []
    for p in sorted(programs, key=lambda p: (p.iteration, p.id)):
        if p.train_score is not None and (best is None or p.train_score > best):
            best = p.train_score
        if best is not None:
            xs.append(p.iteration)
            ys.append(best)
    held = sorted((p.iteration, p.held_out_score) for p in programs if p.held_out_score is not None)
    return xs, ys, held


def plot(store: EvolveStore, run_id: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    programs = store.programs(run_id)
    xs, ys, held = curves(programs)
    run = store.run(run_id)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.step(xs, ys, where="post", color="#3b7dd8", label="best training score so far")
    if held:
        ax.plot([h[0] for h in held], [h[1] for h in held], "o", color="#d85b3b",
                label="held-out score (running best, and the finalists)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("speedup over the shipped heuristics (geometric mean)")
    ax.set_title(f"kernelevo evolve, run {run_id} on {run.chip} ({run.workload})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
