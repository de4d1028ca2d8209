"""The fitness of a .kevo program on a workload: for each shape, the configuration the
program selects, timed against what the shipped heuristics select (measured now, or read
from the database where measured under the same key), with per-shape and geometric-mean
speedups per split. This is what `kernelevo score` prints, what the tuner judges its
distilled programs by on held-out shapes, and the fitness `kernelevo evolve` calls.

Two modes:
- live: a pair not yet in the database is measured through the worker (confirm grade);
- replay: only stored measurements are used, no device is touched, and the pairs that
  are not stored are reported as unmeasured. Scores are then deterministic.

A shape where the program selects the shipped configuration scores exactly 1: nothing
differs, nothing needs measuring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import ConfigError
from ..dsl import DSLError
from ..dsl.select import CompiledProgram
from ..families import MLX_BUILTIN
from .db import Database, Measurement
from .measure import Measurer, geomean, noise_band
from .workloads import Shape

#: phases a score reads, firmest first; replay may also read search-phase figures
SCORE_PHASES = ("reproduce", "confirm")
REPLAY_PHASES = ("reproduce", "confirm", "search")


@dataclass
class ShapeScore:
    split: str
    shape: Shape
    shipped: str
    selected: str | None  # None when the program could not select for this call
    rule: int | None = None  # rule number in the program's section
    line: int | None = None
    measurement: Measurement | None = None
    band: float | None = None  # the shape's noise band (fraction), from its A/A pair
    mlx: Measurement | None = None  # MLX's own op against the shipped choice
    status: str = "same"  # same | measured | unmeasured | failed | unusable | invalid
    reason: str = ""

    @property
    def ratio(self) -> float | None:
        """Time of the selected configuration over the shipped one's (observed, paired)."""
        if self.status == "same":
            return 1.0
        if self.status == "measured":
            return self.measurement.ratio
        return None

    @property
    def speedup(self) -> float | None:
        return 1.0 / self.ratio if self.ratio else None

    @property
    def vs_mlx(self) -> float | None:
        """Speedup over MLX's own op: both were paired with the shipped choice, so this is
        the ratio of the two paired ratios."""
        if self.ratio is None or self.mlx is None or not self.mlx.ok or not self.mlx.ratio:
            return None
        return self.mlx.ratio / self.ratio

    @property
    def slower_than_noise(self) -> bool:
        """Slower than the shipped choice by more than the shape's noise band."""
        return self.ratio is not None and self.ratio > 1.0 + (self.band or 0.0)


@dataclass
class ProgramScore:
    shapes: list[ShapeScore] = field(default_factory=list)

    def split(self, which: str) -> list[ShapeScore]:
        return [s for s in self.shapes if which == "all" or s.split == which]

    def geomean(self, which: str = "all") -> float | None:
        """Geometric-mean speedup over the shipped heuristics; None if any shape of the
        split lacks a figure (a score over part of the shapes would flatter)."""
        scores = self.split(which)
        if not scores or any(s.speedup is None for s in scores):
            return None
        return geomean(s.speedup for s in scores)

    def geomean_vs_mlx(self, which: str = "all") -> float | None:
        values = [s.vs_mlx for s in self.split(which)]
        return geomean(values) if values and all(values) else None

    @property
    def unmeasured(self) -> list[ShapeScore]:
        return [s for s in self.shapes if s.status == "unmeasured"]

    @property
    def complete(self) -> bool:
        return all(s.ratio is not None for s in self.shapes)


class Scorer:
    """Scores programs on (split, shape) pairs: live through a Measurer, or replaying the
    measurements a database holds (`Scorer.replay`)."""

    def __init__(self, measurer: Measurer, live: bool = True, with_mlx: bool = True,
                 with_band: bool = True, band_for_same: bool = True):
        self.measurer = measurer
        self.live = live
        self.with_mlx = with_mlx
        self.with_band = with_band
        self.band_for_same = band_for_same  # (a shape scored 1 by identity needs no band to judge)
        self._retaken: set[tuple[str, str]] = set()

    @classmethod
    def replay(cls, backend: str, db: Database, **kw) -> Scorer:
        return cls(Measurer(backend, db), live=False, **kw)

    def _stored(self, shape: Shape, config: str, baseline: str) -> Measurement | None:
        phases = SCORE_PHASES if self.live else REPLAY_PHASES
        return self.measurer.lookup(shape, config, phases, baseline)

    def score_shape(self, program: CompiledProgram, split: str, shape: Shape) -> ShapeScore:
        m = self.measurer
        shipped = m.shipped_config(shape).to_dsl()
        try:
            selection = program.select(shape.op, shape.features())
        except (DSLError, ConfigError, KeyError) as err:
            return ShapeScore(split, shape, shipped, None, status="invalid", reason=str(err))
        chosen = selection.config.to_dsl()
        result = ShapeScore(split, shape, shipped, chosen, selection.rule_number, selection.line)
        if self.with_band and (self.band_for_same or chosen != shipped):
            result.band = noise_band(self._control(shape, shipped))
        if self.with_mlx:
            result.mlx = self._pair(shape, MLX_BUILTIN, shipped, verify=False)
        if chosen == shipped:
            return result
        row = self._pair(shape, chosen, shipped)
        result.measurement = row
        if row is None:
            result.status, result.reason = "unmeasured", "no stored measurement (replay)"
        elif not row.ok:
            result.status, result.reason = "failed", f"{row.status}: {row.reason}"
        elif not row.usable:
            why = "taken on a busy machine" if row.loaded else "bimodal samples" if row.bimodal else "no ratio"
            result.status, result.reason = "unusable", why
        else:
            result.status = "measured"
        return result

    def _pair(self, shape: Shape, config: str, shipped: str, verify: bool = True) -> Measurement | None:
        """The stored pair, or (live) a new one: where none is stored, or where the stored
        one cannot decide (busy machine, two states) and was not re-taken by this scorer."""
        stored = self._stored(shape, config, shipped)
        if not self.live:
            return stored
        key = (shape.key, config)
        if stored is not None and (stored.usable or not stored.ok or key in self._retaken):
            return stored
        self._retaken.add(key)
        return self.measurer.measure(shape, config, "confirm", reuse=False, verify=verify,
                                     baseline=shipped)

    def _control(self, shape: Shape, shipped: str) -> Measurement | None:
        stored = self.measurer.db.latest(**self.measurer.key(shape, shipped), phase="control",
                                         baseline_config=shipped)
        if not self.live or (stored is not None and (not stored.loaded or (shape.key, "") in self._retaken)):
            return stored
        self._retaken.add((shape.key, ""))
        return self.measurer.control(shape, reuse=False)

    def score(self, program: CompiledProgram, shapes: Sequence[tuple[str, Shape]]) -> ProgramScore:
        return ProgramScore([self.score_shape(program, split, shape) for split, shape in shapes])
