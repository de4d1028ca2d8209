"""Re-timing a program's choices in fresh worker processes, against what they replace.

A speedup counts only if it shows again in a process that did not find it: for every
shape where the program selects something other than the shipped heuristics, the pair is
timed again (A B, B A, ... in `rounds` rounds, each in a new worker, so the evidence spans
processes and seconds), and the pooled pair ratios decide. The tuner runs this before it
writes a rule and drops what does not reproduce; `kernelevo verify` runs it on any file
and compares with the claims written in its comments.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..dsl.select import CompiledProgram
from .measure import Measurer, geomean
from .timing import is_bimodal
from .workloads import Shape

#: how a tuned rule's claim reads in its comment (distill.TunedRule.claim)
CLAIM = re.compile(r"claim: (?P<train>\d+(?:\.\d+)?)x the shipped rules on (?P<n_train>\d+) training "
                   r"shapes?(?:, (?P<held>\d+(?:\.\d+)?)x on (?P<n_held>\d+) held-out)?")
#: a claim reproduces when the re-timed speedup is within this of it, either way
CLAIM_TOLERANCE = 0.05


def claim_text(train: float, n_train: int, held: float | None, n_held: int, run_id: int | None) -> str:
    held_part = f", {held:.2f}x on {n_held} held-out" if held is not None and n_held else ""
    where = f"run {run_id}, " if run_id is not None else ""
    return (f"# claim: {train:.2f}x the shipped rules on {n_train} training shape"
            f"{'s' if n_train != 1 else ''}{held_part} ({where}re-timed in a fresh worker)")


@dataclass
class Reproduction:
    split: str
    shape: Shape
    rule: int
    line: int
    config: str
    shipped: str
    rows: list = field(default_factory=list)  # Measurement, one per round

    @property
    def usable(self) -> list:
        return [r for r in self.rows if r.ok and r.ratio is not None and not r.loaded]

    @property
    def ratio(self) -> float | None:
        pooled = [x for r in self.usable for x in r.pair_ratios]
        return statistics.median(pooled) if pooled else None

    @property
    def ratio_quartiles(self) -> tuple[float, float] | None:
        pooled = sorted(x for r in self.usable for x in r.pair_ratios)
        if len(pooled) < 2:
            return None
        q = statistics.quantiles(pooled, n=4)
        return q[0], q[2]

    @property
    def speedup(self) -> float | None:
        return 1.0 / self.ratio if self.ratio else None

    def _pooled(self, column: str) -> list[float]:
        return [x for r in self.usable for x in json.loads(getattr(r, column) or "[]")]

    def times(self, side: str) -> tuple[float, float, float] | None:
        """Observed median and quartiles (seconds per call) of one side, pooled over rounds:
        side is 'chosen' or 'shipped'."""
        values = sorted(self._pooled("samples" if side == "chosen" else "baseline_samples"))
        if not values:
            return None
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        return statistics.median(values), q[0], q[2]

    @property
    def bimodal(self) -> bool:
        """The pair ratios, within a round or pooled over rounds, fall into two states."""
        return any(r.bimodal for r in self.usable) or is_bimodal([x for r in self.usable for x in r.pair_ratios])

    @property
    def problem(self) -> str | None:
        """Why these timings cannot support a claim, if they cannot."""
        failed = [r for r in self.rows if not r.ok]
        if failed:
            return f"{failed[0].status}: {failed[0].reason}"
        if not self.usable:
            return "every round ran on a busy machine" if self.rows else "not timed"
        if self.bimodal:
            return "the samples fall into two states"
        return None


def reproduce(measurer: Measurer, program: CompiledProgram, shapes: Sequence[tuple[str, Shape]],
              rounds: int = 2, known: Sequence[Reproduction] = ()) -> list[Reproduction]:
    """Every (split, shape) where the program's choice differs from the shipped one, timed
    against it `rounds` times, each round in a new worker process. A pair already re-timed
    in `known` (an earlier version of the program chose the same there) is not timed again."""
    earlier = {(k.split, k.shape.key, k.config, k.shipped): k for k in known}
    out: list[Reproduction] = []
    for split, shape in shapes:
        selection = program.select(shape.op, shape.features())
        chosen, shipped = selection.config.to_dsl(), measurer.shipped_config(shape).to_dsl()
        if chosen != shipped:
            item = Reproduction(split, shape, selection.rule_number, selection.line, chosen, shipped)
            if (split, shape.key, chosen, shipped) in earlier:
                item.rows = list(earlier[split, shape.key, chosen, shipped].rows)
            out.append(item)
    todo = [item for item in out if not item.rows]
    for _ in range(rounds if todo else 0):
        measurer.fresh_worker()
        for item in todo:
            item.rows.append(measurer.measure(item.shape, item.config, "reproduce", reuse=False,
                                              baseline=item.shipped))
    return out


@dataclass
class RuleCheck:
    """One rule's re-timed speedups beside its claim."""

    rule: int
    line: int
    text: str
    config: str
    items: list[Reproduction]
    claim: dict | None  # parsed from the rule's comment

    def speedup(self, split: str) -> float | None:
        values = [i.speedup for i in self.items if i.split == split]
        if not values or any(v is None for v in values):
            return None
        return geomean(values)

    @property
    def verdict(self) -> str:
        problems = [i.problem for i in self.items if i.problem]
        if problems:
            return f"cannot tell: {problems[0]}"
        if self.claim is None:
            train, held = self.speedup("train"), self.speedup("held-out")
            return "no claim to check (measured " + ", ".join(
                f"{v:.2f}x on {s}" for s, v in (("train", train), ("held-out", held)) if v) + ")"
        verdicts = []
        for split, key in (("train", "train"), ("held-out", "held")):
            claimed = self.claim.get(key)
            got = self.speedup(split)
            if claimed is None:
                continue
            if got is None:
                verdicts.append(f"no {split} shape of the workload selects this rule")
                continue
            off = got / float(claimed) - 1.0
            if abs(off) <= CLAIM_TOLERANCE:
                verdicts.append(f"reproduces on {split} ({got:.2f}x, claimed {float(claimed):.2f}x)")
            else:
                direction = "faster" if off > 0 else "slower"
                verdicts.append(f"DOES NOT REPRODUCE on {split}: {got:.2f}x, claimed "
                                f"{float(claimed):.2f}x ({abs(off):.0%} {direction})")
        return "; ".join(verdicts) or "no claim to check"

    @property
    def reproduces(self) -> bool:
        return "DOES NOT" not in self.verdict and not self.verdict.startswith("cannot tell")


def parse_claim(comment_lines: Sequence[str]) -> dict | None:
    for line in comment_lines:
        m = CLAIM.search(line)
        if m:
            return {k: v for k, v in m.groupdict().items() if v is not None}
    return None


def check_rules(program: CompiledProgram, items: Sequence[Reproduction]) -> list[RuleCheck]:
    """The reproductions grouped by the rule that chose, with each rule's written claim."""
    from ..dsl.formatter import format_expr

    checks: dict[tuple[str, int], RuleCheck] = {}
    for item in items:
        key = (item.shape.op, item.rule)
        if key not in checks:
            section = program.program.section(item.shape.op)
            rule = section.rules[item.rule - 1]
            text = "else" if rule.is_else else f"when {format_expr(rule.condition)}"
            checks[key] = RuleCheck(item.rule, item.line, text, item.config, [],
                                    parse_claim(rule.comments.before))
        checks[key].items.append(item)
    return sorted(checks.values(), key=lambda c: c.line)
