"""Search strategies over kernel configurations.

Every candidate comes from a family's search space (families/), so the DSL schema's
constraints have pruned it before anything runs. A strategy proposes configurations a
few at a time and is told how each did (its time relative to the baseline: lower is
better; None when it failed).

- exhaustive: every configuration of the space, in a fixed order (small spaces).
- random: a seeded sample without replacement.
- evolve: a population that breeds by tournament, crossover within a family and
  constraint-aware mutation (one or two parameters moved to a neighbouring value of their
  search list, the result kept only if it is valid for the chip and the call).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..chips import Chip
from ..config import KernelConfig
from ..families import Family, families_for

STRATEGIES = ("evolve", "random", "exhaustive")


@dataclass
class Space:
    """The valid configurations of an op's families for one call on one chip."""

    op: str
    backend: str
    chip: Chip
    call: Mapping
    configs: list[KernelConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.configs:
            # search_space yields only values of each parameter's domain, in order: no
            # need for KernelConfig.make's checks on tens of thousands of them
            self.configs = [KernelConfig(self.op, self.backend, fam.name,
                                         tuple((n, params[n]) for n in fam.param_names))
                            for fam in self.families for params in fam.search_space(self.chip, self.call)]

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(f for f in families_for(self.op, self.backend) if f.params)

    def valid(self, config: KernelConfig) -> bool:
        return not config.schema.violations(config.as_dict(), self.chip, self.call)


class Strategy(ABC):
    def __init__(self, space: Space, seed: int, exclude: set[KernelConfig] = frozenset()):
        self.space = space
        self.rng = random.Random(seed)
        self.seen: set[KernelConfig] = set(exclude)
        self.results: dict[KernelConfig, float | None] = {}

    @abstractmethod
    def ask(self, n: int) -> list[KernelConfig]:
        """Up to n configurations not proposed before."""

    def tell(self, config: KernelConfig, ratio: float | None) -> None:
        self.results[config] = ratio

    def _fresh(self, candidates) -> list[KernelConfig]:
        out = []
        for c in candidates:
            if c not in self.seen:
                self.seen.add(c)
                out.append(c)
        return out


class Exhaustive(Strategy):
    def ask(self, n: int) -> list[KernelConfig]:
        picked = []
        for c in self.space.configs:
            if len(picked) == n:
                break
            if c not in self.seen:
                self.seen.add(c)
                picked.append(c)
        return picked


class RandomSearch(Strategy):
    def __init__(self, space: Space, seed: int, exclude: set[KernelConfig] = frozenset()):
        super().__init__(space, seed, exclude)
        self.order = list(space.configs)
        self.rng.shuffle(self.order)

    def ask(self, n: int) -> list[KernelConfig]:
        picked = []
        while self.order and len(picked) < n:
            c = self.order.pop()
            if c not in self.seen:
                self.seen.add(c)
                picked.append(c)
        return picked


class Evolve(RandomSearch):
    """Random configurations first (the initial population), then children of the best."""

    def __init__(self, space: Space, seed: int, exclude: set[KernelConfig] = frozenset(),
                 population: int = 6, seeds: tuple[KernelConfig, ...] = ()):
        super().__init__(space, seed, exclude)
        self.population = population
        self.parents = [c for c in seeds if c in space.configs or space.valid(c)]

    def _scored(self) -> list[tuple[float, str, KernelConfig]]:
        return sorted((r, c.name, c) for c, r in self.results.items() if r is not None)

    def _tournament(self, scored) -> KernelConfig:
        picks = self.rng.sample(scored, min(3, len(scored)))
        return min(picks, key=lambda t: t[:2])[2]

    def _mutate(self, config: KernelConfig) -> KernelConfig | None:
        fam, params = config.schema, config.as_dict()
        for _ in range(20):
            child = dict(params)
            for p in self.rng.sample(fam.params, min(len(fam.params), self.rng.choice((1, 1, 2)))):
                values = [v for v in p.search_values(self.space.chip) if p.contains(v)]
                if len(values) < 2:
                    continue
                i = values.index(child[p.name]) if child[p.name] in values else self.rng.randrange(len(values))
                step = self.rng.choice((-1, 1)) * self.rng.choice((1, 1, 2))
                child[p.name] = values[max(0, min(len(values) - 1, i + step))]
            candidate = KernelConfig.make(config.op, config.backend, config.family, child)
            if candidate not in self.seen and self.space.valid(candidate):
                return candidate
        return None

    def _crossover(self, a: KernelConfig, b: KernelConfig) -> KernelConfig | None:
        if a.family != b.family:
            return None
        pa, pb = a.as_dict(), b.as_dict()
        child = {k: (pa if self.rng.random() < 0.5 else pb)[k] for k in pa}
        candidate = KernelConfig.make(a.op, a.backend, a.family, child)
        return candidate if candidate not in self.seen and self.space.valid(candidate) else None

    def ask(self, n: int) -> list[KernelConfig]:
        scored = self._scored()
        if len(scored) < self.population:
            seeds = self._fresh(self.parents)
            self.parents = []
            return (seeds + super().ask(n))[:n]
        out: list[KernelConfig] = []
        for _ in range(n * 4):
            if len(out) == n:
                break
            a = self._tournament(scored)
            child = None
            if self.rng.random() < 0.3:
                child = self._crossover(a, self._tournament(scored))
            child = child or self._mutate(a)
            if child is not None and child not in out:
                self.seen.add(child)
                out.append(child)
        return out + (super().ask(n - len(out)) if len(out) < n else [])


def make_strategy(name: str, space: Space, seed: int, exclude: set[KernelConfig],
                  seeds: tuple[KernelConfig, ...] = ()) -> Strategy:
    if name == "exhaustive":
        return Exhaustive(space, seed, exclude)
    if name == "random":
        return RandomSearch(space, seed, exclude)
    if name == "evolve":
        return Evolve(space, seed, exclude, seeds=seeds)
    raise ValueError(f"unknown search strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
