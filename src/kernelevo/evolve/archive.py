"""Islands of programs, each with a quality-diversity grid, and how parents are sampled.

The grid's axes are what distinguishes one heuristic from another for a reader and for
generalisation: **program size in rules** (a program of 3 rules and one of 20 that score
alike are not alike: the small one is the readable one and the less likely to have memorised
the training shapes) and **distinct configurations it selects over the training shapes** (one
configuration for everything, a few per regime, one per shape: how far it specialises). Each
cell keeps its best program, so evolution keeps small generalists next to specialists
instead of collapsing onto one lineage.

Parents come from the island's best (a tournament of three: exploitation) or from a random
cell of its grid (exploration); every `migration_interval` iterations each island's best
moves to the next island in a ring.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

RULE_EDGES = (2, 4, 8, 16)  # cells: 1-2, 3-4, 5-8, 9-16, 17+ rules
CONFIG_EDGES = (1, 2, 4, 8)  # cells: 1, 2, 3-4, 5-8, 9+ configurations


def cell(rules: int, configs: int) -> tuple[int, int]:
    return bisect.bisect_left(RULE_EDGES, rules), bisect.bisect_left(CONFIG_EDGES, configs)


@dataclass
class Member:
    id: int
    text: str
    score: float  # fitness: geometric-mean speedup over the shipped heuristics, training shapes
    rules: int
    configs: int
    proposer: str
    firm: bool = False  # the score rests on re-measured pairs
    details: object = None  # the ProgramScore behind it (for prompts)

    @property
    def cell(self) -> tuple[int, int]:
        return cell(self.rules, self.configs)

    def key(self) -> tuple:
        """Higher is better: score, then fewer rules, then older."""
        return (round(self.score, 6), -self.rules, -self.id)


@dataclass
class Island:
    population: int
    members: list[Member] = field(default_factory=list)
    grid: dict[tuple[int, int], Member] = field(default_factory=dict)

    def add(self, m: Member) -> bool:
        """Adds a program; True when it is the island's new best."""
        if any(x.id == m.id for x in self.members):
            return False
        best = self.best
        self.members.append(m)
        self.members.sort(key=Member.key, reverse=True)
        elites = {id(x) for x in self.grid.values()}
        while len(self.members) > self.population:  # drop the worst that is no cell's elite
            for victim in reversed(self.members):
                if id(victim) not in elites:
                    self.members.remove(victim)
                    break
            else:
                break
        holder = self.grid.get(m.cell)
        if holder is None or m.key() > holder.key():
            self.grid[m.cell] = m
        return best is None or m.key() > best.key()

    @property
    def best(self) -> Member | None:
        return self.members[0] if self.members else None


class Archive:
    def __init__(self, islands: int, population: int, rng: random.Random, exploit: float = 0.7):
        self.islands = [Island(population) for _ in range(islands)]
        self.rng = rng
        self.exploit = exploit

    def add(self, island: int, m: Member) -> bool:
        return self.islands[island].add(m)

    def parent(self, island: int) -> Member:
        isl = self.islands[island]
        if not isl.members:
            isl = next(i for i in self.islands if i.members)
        if self.rng.random() < self.exploit or len(isl.grid) < 2:
            picks = self.rng.sample(isl.members, min(3, len(isl.members)))
            return max(picks, key=Member.key)
        return isl.grid[self.rng.choice(sorted(isl.grid))]

    def donor(self, island: int, exclude: int) -> Member | None:
        """Another program to borrow from: from any island, another cell if possible."""
        pool = [m for isl in self.islands for m in isl.members if m.id != exclude]
        return self.rng.choice(pool) if pool else None

    def inspirations(self, island: int, k: int = 3) -> list[Member]:
        """The best program overall and the elites of other cells (for a prompt)."""
        out = [self.best] if self.best else []
        cells = sorted({c for isl in self.islands for c in isl.grid})
        self.rng.shuffle(cells)
        for c in cells:
            holders = [isl.grid[c] for isl in self.islands if c in isl.grid]
            m = max(holders, key=Member.key)
            if all(m.id != o.id for o in out):
                out.append(m)
            if len(out) >= k:
                break
        return out

    def migrate(self) -> int:
        """Each island's best to the next island (ring); returns how many moved."""
        bests = [isl.best for isl in self.islands]
        moved = 0
        for i, b in enumerate(bests):
            if b is not None and len(self.islands) > 1:
                moved += self.islands[(i + 1) % len(self.islands)].add(b) or 0
        return moved

    @property
    def best(self) -> Member | None:
        bests = [isl.best for isl in self.islands if isl.best]
        return max(bests, key=Member.key) if bests else None

    def top(self, k: int) -> list[Member]:
        unique = {m.id: m for isl in self.islands for m in isl.members}
        return sorted(unique.values(), key=Member.key, reverse=True)[:k]

    def cells(self) -> dict[tuple[int, int], Member]:
        out: dict[tuple[int, int], Member] = {}
        for isl in self.islands:
            for c, m in isl.grid.items():
                if c not in out or m.key() > out[c].key():
                    out[c] = m
        return out
