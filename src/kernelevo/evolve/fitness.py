"""The fitness of a proposed program: `kernelevo score` on the training shapes.

A program is parsed and checked (a failure is a rejection with the checker's located
message), then scored: every configuration it selects is measured on demand through the
worker (confirmed grade) or, replaying, taken from the database. A program that selects a
configuration that fails verification on some training shape, or whose rules cannot select
for some call, is rejected. A program about to become an island's best is made *firm*: the
pairs its score rests on are timed again (phase `reproduce`) and it is scored on those, so
a lucky first measurement cannot make an elite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..chips import Chip
from ..dsl import DSLError, parse
from ..dsl.select import CompiledProgram
from ..tune.measure import Measurer, geomean
from ..tune.score import ProgramScore, Scorer
from ..tune.workloads import Shape


class Rejected(Exception):
    """A proposal that cannot be scored: `stage` is parse, check, invalid or unmeasured."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.message = message


@dataclass
class Scored:
    program: CompiledProgram
    score: ProgramScore
    value: float  # geometric-mean speedup over the shipped heuristics
    rules: int
    configs: int  # distinct configurations it selects over the shapes scored


def compile_program(text: str, chip: Chip, backend: str, ops: Sequence[str]) -> CompiledProgram:
    """Parsed and checked, for this backend, with a section for every op scored."""
    try:
        tree = parse(text, "<proposal>")
    except DSLError as err:
        raise Rejected("parse", str(err)) from None
    if tree.target != backend:
        raise Rejected("check", f"the program targets {tree.target!r}; it must say `target {backend}`")
    try:
        program = CompiledProgram(tree, text, "<proposal>", chip)
    except DSLError as err:
        raise Rejected("check", str(err)) from None
    missing = [op for op in ops if not program.has(op)]
    if missing:
        raise Rejected("check", f"the program has no {' or '.join(missing)} section")
    return program


def rule_count(program: CompiledProgram) -> int:
    return sum(len(s.rules) for s in program.program.sections)


class Fitness:
    def __init__(self, measurer: Measurer, train: Sequence[Shape], held_out: Sequence[Shape],
                 live: bool = True, max_measurements: int | None = None):
        self.measurer = measurer
        self.train = list(train)
        self.held_out = list(held_out)
        self.live = live
        self.max_measurements = max_measurements
        self.ops = sorted({s.op for s in self.train})
        self._start = measurer.measured

    @property
    def measurements(self) -> int:
        """New measurements taken by this fitness so far."""
        return self.measurer.measured - self._start

    @property
    def out_of_measurements(self) -> bool:
        return self.max_measurements is not None and self.measurements >= self.max_measurements

    def compile(self, text: str) -> CompiledProgram:
        return compile_program(text, self.measurer.chip, self.measurer.backend, self.ops)

    def _scorer(self) -> Scorer:
        return Scorer(self.measurer, live=self.live and not self.out_of_measurements, with_mlx=False,
                      with_band=False)

    def evaluate(self, program: CompiledProgram, split: str = "train") -> Scored:
        shapes = self.train if split == "train" else self.held_out
        score = self._scorer().score(program, [(split, s) for s in shapes])
        for s in score.shapes:
            if s.status == "invalid":
                raise Rejected("invalid", f"cannot select for {s.shape}: {s.reason}")
            if s.status == "failed":
                raise Rejected("invalid", f"selects {s.selected} for {s.shape}, which {s.reason}")
            if s.status == "unmeasured":
                raise Rejected("unmeasured", f"{s.selected} on {s.shape} is not measured "
                               + ("(replay)" if not self.live else "(measurement budget spent)"))
        # A pair that could only be timed on a busy machine or in two states is no
        # evidence of a gain: it counts as no faster than the shipped choice.
        value = geomean(s.speedup if s.status in ("same", "measured") else
                        min(1.0, s.speedup or 1.0) for s in score.shapes)
        configs = len({(s.shape.op, s.selected) for s in score.shapes})
        return Scored(program, score, value, rule_count(program), configs)

    def firm(self, scored: Scored, split: str = "train") -> Scored:
        """Re-times every pair the score rests on (unless already re-timed), then scores on
        those re-timings."""
        if self.live and not self.out_of_measurements:
            for s in scored.score.shapes:
                if s.status == "measured" and s.measurement.phase != "reproduce":
                    self.measurer.measure(s.shape, s.selected, "reproduce", baseline=s.shipped)
        return self.evaluate(scored.program, split)
