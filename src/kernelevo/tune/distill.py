"""Turning measurements into a small, readable .kevo program that reaches shapes nobody
measured.

Training shapes are grouped by the shipped rule that serves them and by what changes a
kernel's code path (dtype, transposes, epilogue; mask kind), and pinned to what every
training shape of the group shares (batch; head_dim, softcap, window). A tuned rule then
*refines one shipped rule*: it is written just before it, and its condition includes the
shipped rule's, so it only ever takes calls that rule would have served — the regions where
the baseline changes are never straddled, and where a tuned rule is not confirmed the
shipped rule below it keeps its calls. Within a group a small decision tree splits on ranges of the
call's sizes and sizes derived from them (`M <= 32`, `N * K > 1 << 22`, `q_len * gqa <= 8`),
each cut placed at a power of two between the measured values; each leaf is the one
configuration best on all of the leaf's shapes — or the shipped rules, where nothing beats
them by more than the shapes' noise band and the minimum speedup. Only confirmed
measurements (tune/db.py's phases) enter: search-phase ratios never reach a program.

A leaf becomes a rule that names every feature its configuration's constraints on the call
read: each such constraint (a DSL expression, families/schema.py) is evaluated with the
configuration's parameters, the group's features and the chip fixed, and what remains is
added to the rule's condition unless the rule's ranges already imply it. A rule therefore
never selects a configuration for a call it cannot serve.

`candidates` grows the trees at every depth up to MAX_DEPTH; the tuner judges them on the
held-out shapes (tune/runner.py) and keeps, per group, the smallest whose held-out score is
within 2% of the best, without the leaves the held-out shapes do not confirm.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..chips import Chip
from ..config import KernelConfig
from ..dsl import ast
from ..dsl.evaluate import Env, compile_expr, literal, residual
from ..dsl.formatter import format_program
from ..dsl.parser import parse_expression
from .workloads import Shape

MAX_DEPTH = 3
HELD_OUT_TOLERANCE = 1.02  # the smallest program within 2% of the best held-out score
SPLIT_GAIN = 1.01  # a split must improve its node's geometric mean by 1%

#: features whose values separate groups (each group gets its own tree)
GROUP_FEATURES = {"matmul": ("dtype", "transpose_a", "transpose_b", "epilogue"),
                  "attention": ("dtype", "mask")}
#: features a rule is restricted to the values of its training shapes
PINNED_FEATURES = {"matmul": ("batch",), "attention": ("batch", "head_dim", "softcap", "window")}
#: sizes a rule keeps within its leaf's measured range, widened by a power of two each way:
#: a rule interpolates between what was measured, it does not extrapolate far beyond it
HULL_FEATURES = {"matmul": ("M", "N", "K"), "attention": ("q_len", "kv_len")}
HULL_SLACK = 2
#: what trees split on: sizes and sizes derived from them
SPLITS = {"matmul": ("M", "N", "K", "N * K", "M * N * K"),
          "attention": ("q_len", "kv_len", "heads", "kv_heads", "gqa", "q_len * gqa")}


@dataclass(frozen=True)
class Split:
    text: str

    @cached_property
    def expr(self) -> ast.Expr:
        return parse_expression(self.text)

    @cached_property
    def _fn(self):
        return compile_expr(self.expr, lambda name: (lambda env, key=name.name: env.features[key]))

    def value(self, features: Mapping) -> int:
        return self._fn(Env(features, None))


@dataclass
class Evidence:
    """What distillation knows of one training shape: its noise band, the confirmed ratio
    (time over the shipped choice's) of every configuration measured on it, and the number
    of the shipped rule that serves it (None: refine no particular rule)."""

    shape: Shape
    band: float
    ratios: dict[str, float]
    shipped_rule: int | None = None

    @cached_property
    def features(self) -> dict:
        return self.shape.features()


def group_key(op: str, features: Mapping, shipped_rule: int | None = None) -> tuple:
    """(op, the shipped rule that serves the call, the features of GROUP_FEATURES)."""
    return (op, shipped_rule) + tuple(features[k] for k in GROUP_FEATURES[op])


def _cut(below: int, above: int) -> int:
    """A threshold t with below <= t < above: the power of two nearest their geometric
    middle if one lies between, else `below` (so `x <= t` separates them)."""
    middle = math.sqrt(max(below, 1) * above)
    powers = [1 << e for e in range(63) if below <= (1 << e) < above]
    if not powers:
        return below
    return min(powers, key=lambda p: (abs(math.log(p / middle)), p))


@dataclass(frozen=True)
class Step:
    split: Split
    above: bool  # the path goes to values > threshold (else <=)
    threshold: int

    def holds(self, features: Mapping) -> bool:
        value = self.split.value(features)
        return value > self.threshold if self.above else value <= self.threshold

    def term(self) -> ast.Expr:
        t = self.threshold
        if self.above and t >= 1 and (t + 1) & t == 0:  # x > 63 reads better as x >= 64
            return ast.Compare(">=", self.split.expr, _number(t + 1))
        return ast.Compare(">" if self.above else "<=", self.split.expr, _number(t))


def _number(n: int) -> ast.Expr:
    """Powers of two from 2^16 up as shifts (1 << 22), which read better than 4194304."""
    if n >= 1 << 16 and n & (n - 1) == 0:
        return ast.Binary("<<", ast.Num(1), ast.Num(n.bit_length() - 1))
    return literal(n)


@dataclass
class Leaf:
    evidence: list[Evidence]
    config: str | None  # None: the shipped rules
    loss: float  # sum of log ratios of the chosen configuration (0 for shipped)
    path: tuple[Step, ...] = ()

    @property
    def speedup(self) -> float:
        return math.exp(-self.loss / len(self.evidence)) if self.evidence else 1.0


def best_leaf(evidence: Sequence[Evidence], min_speedup: float, path: tuple[Step, ...] = ()) -> Leaf:
    """The configuration measured on every shape of the leaf that does best on them, if it
    beats the shipped choice clearly: by min_speedup and by more than the shapes' median
    noise band in geometric mean, and slower than the band on none."""
    evidence = list(evidence)
    shipped = Leaf(evidence, None, 0.0, path)
    if not evidence:
        return shipped
    common = set.intersection(*(set(ev.ratios) for ev in evidence))
    bands = sorted(ev.band for ev in evidence)
    band = bands[len(bands) // 2]
    best = shipped
    for config in sorted(common):
        ratios = [ev.ratios[config] for ev in evidence]
        loss = sum(math.log(r) for r in ratios)
        speedup = math.exp(-loss / len(ratios))
        if speedup < min_speedup or speedup < 1.0 + band:
            continue
        if any(r > 1.0 + ev.band for r, ev in zip(ratios, evidence)):
            continue
        if loss < best.loss:
            best = Leaf(evidence, config, loss, path)
    return best


def grow(op: str, evidence: Sequence[Evidence], depth: int, min_speedup: float,
         path: tuple[Step, ...] = ()) -> list[Leaf]:
    """The leaves of a greedy tree of at most `depth` levels."""
    here = best_leaf(evidence, min_speedup, path)
    if depth == 0 or len(evidence) < 2:
        return [here]
    best: tuple[float, Step, list, list] | None = None
    for text in SPLITS[op]:
        split = Split(text)
        values = sorted({split.value(ev.features) for ev in evidence})
        for below, above in zip(values, values[1:]):
            t = _cut(below, above)
            left = [ev for ev in evidence if split.value(ev.features) <= t]
            right = [ev for ev in evidence if split.value(ev.features) > t]
            loss = best_leaf(left, min_speedup).loss + best_leaf(right, min_speedup).loss
            if best is None or loss < best[0] - 1e-12:
                best = (loss, Step(split, False, t), left, right)
    if best is None or best[0] > here.loss - math.log(SPLIT_GAIN) * len(evidence):
        return [here]
    _, step, left, right = best
    flipped = Step(step.split, True, step.threshold)
    return (grow(op, left, depth - 1, min_speedup, path + (step,))
            + grow(op, right, depth - 1, min_speedup, path + (flipped,)))


# -- rules ------------------------------------------------------------------------------


def _is_term(name: str, value) -> ast.Expr:
    if isinstance(value, bool):
        return ast.Name(name) if value else ast.Unary("not", ast.Name(name))
    return ast.Compare("==", ast.Name(name), literal(value))


def _all(terms: Sequence[ast.Expr]) -> ast.Expr:
    expr = terms[0]
    for term in terms[1:]:
        expr = ast.Binary("and", expr, term)
    return expr


def _bounds(steps: Sequence[Step]) -> dict[str, tuple[float, float]]:
    """The tightest range of each plainly named feature on a path."""
    bounds: dict[str, tuple[float, float]] = {}
    for s in steps:
        if not isinstance(s.split.expr, ast.Name):
            continue
        lo, hi = bounds.get(s.split.text, (-math.inf, math.inf))
        bounds[s.split.text] = (max(lo, s.threshold + 1), hi) if s.above else (lo, min(hi, s.threshold))
    return bounds


def _implied(term: ast.Expr, bounds: Mapping[str, tuple[float, float]]) -> bool:
    """`feature <op> number` that the path's range of the feature already guarantees."""
    if not (isinstance(term, ast.Compare) and isinstance(term.left, ast.Name)
            and isinstance(term.right, ast.Num) and term.left.name in bounds):
        return False
    lo, hi = bounds[term.left.name]
    c = term.right.value
    return {"<=": hi <= c, "<": hi < c, ">=": lo >= c, ">": lo > c, "==": lo == hi == c}.get(term.op, False)


def _tightest(steps: Sequence[Step]) -> list[Step]:
    """One bound per split and direction: the tightest."""
    kept: dict[tuple[str, bool], Step] = {}
    for s in steps:
        key = (s.split.text, s.above)
        old = kept.get(key)
        if old is None or (s.threshold > old.threshold if s.above else s.threshold < old.threshold):
            kept[key] = s
    return [s for s in steps if kept[(s.split.text, s.above)] is s]


@dataclass
class TunedRule:
    op: str
    group: tuple
    config: KernelConfig
    condition: ast.Expr
    training: list[Shape]  # the training shapes it was fitted on
    speedup: float  # geometric mean over them (confirmed measurements)
    claim: str = ""  # the comment written above it (set once it is re-timed)

    @property
    def refines(self) -> int | None:
        """The shipped rule it is written before (and whose calls alone it takes)."""
        return self.group[1]


def rule_for(op: str, backend: str, chip: Chip, group: tuple, pinned: Mapping[str, tuple],
             leaf: Leaf, shipped_condition: ast.Expr | None = None) -> TunedRule | None:
    """The rule of a leaf, or None when its configuration can serve none of the group's
    calls (a constraint on the call fails for every one of them). `shipped_condition` is the
    condition of the shipped rule it refines (None for an else, or no particular rule)."""
    config = KernelConfig.parse(leaf.config, op, backend)
    names = GROUP_FEATURES[op]
    known = dict(zip(names, group[2:]))
    if op == "attention":
        known["causal"] = known["mask"] == "causal"
    known.update({k: v[0] for k, v in pinned.items() if len(v) == 1})
    terms = ([shipped_condition] if shipped_condition is not None else [])
    terms += [_is_term(k, v) for k, v in zip(names, group[2:])]
    for name, values in pinned.items():
        terms.append(_is_term(name, values[0]) if len(values) == 1 else
                     ast.InSet(ast.Name(name), tuple(literal(v) for v in values)))
    steps = _tightest(leaf.path + _hull(op, leaf))
    terms += [s.term() for s in steps]
    bounds = _bounds(steps)
    for constraint in config.schema.call_constraints():
        remains = residual(constraint.ast, config.as_dict(), chip, known)
        if remains is True:
            continue
        if remains is False:
            return None
        if not _implied(remains, bounds):
            terms.append(remains)
    return TunedRule(op, group, config, _all(terms), [ev.shape for ev in leaf.evidence], leaf.speedup)


def _pow2floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _hull(op: str, leaf: Leaf) -> tuple[Step, ...]:
    """Bounds that keep a rule near its evidence: each size within a power of two (HULL_SLACK)
    of the smallest and largest values its training shapes had."""
    steps = []
    for name in HULL_FEATURES[op]:
        values = [ev.features[name] for ev in leaf.evidence]
        low = _pow2floor(min(values)) // HULL_SLACK
        high = _pow2ceil(max(values)) * HULL_SLACK
        split = Split(name)
        if low > 1:
            steps.append(Step(split, True, low - 1))
        steps.append(Step(split, False, high))
    return tuple(steps)


def pinned_values(op: str, evidence: Sequence[Evidence]) -> dict[str, tuple]:
    return {name: tuple(sorted({ev.features[name] for ev in evidence}))
            for name in PINNED_FEATURES[op]}


def groups(evidence: Sequence[Evidence]) -> dict[tuple, list[Evidence]]:
    out: dict[tuple, list[Evidence]] = defaultdict(list)
    for ev in evidence:
        out[group_key(ev.shape.op, ev.features, ev.shipped_rule)].append(ev)
    return dict(out)


ShippedConditions = Callable[[str, int], "ast.Expr | None"]


def tree_rules(evidence: Sequence[Evidence], depth: int, backend: str, chip: Chip,
               min_speedup: float, shipped: ShippedConditions | None = None) -> dict[tuple, list[TunedRule]]:
    """Per group, the rules of its tree of at most `depth` levels (leaves that keep the
    shipped rules give none). `shipped(op, number)` is a shipped rule's condition."""
    out: dict[tuple, list[TunedRule]] = {}
    for key, members in groups(evidence).items():
        op, number = key[0], key[1]
        pinned = pinned_values(op, members)
        condition = shipped(op, number) if shipped is not None and number is not None else None
        rules = []
        for leaf in grow(op, members, depth, min_speedup):
            if leaf.config is not None:
                rule = rule_for(op, backend, chip, key, pinned, leaf, condition)
                if rule is not None:
                    rules.append(rule)
        out[key] = rules
    return out


def candidates(evidence: Sequence[Evidence], backend: str, chip: Chip, min_speedup: float,
               max_depth: int = MAX_DEPTH, shipped: ShippedConditions | None = None
               ) -> list[dict[tuple, list[TunedRule]]]:
    """The rules of every group's tree at depths 0 .. max_depth."""
    return [tree_rules(evidence, d, backend, chip, min_speedup, shipped) for d in range(max_depth + 1)]


def shipped_conditions(program: ast.Program) -> ShippedConditions:
    """A shipped rule's condition by (op, rule number); None for the else."""
    def condition(op: str, number: int) -> ast.Expr | None:
        return program.section(op).rules[number - 1].condition
    return condition


# -- the program ------------------------------------------------------------------------


@dataclass
class Distilled:
    rules: list[TunedRule] = field(default_factory=list)
    header: tuple[str, ...] = ()  # comment lines at the top of the written file

    def render(self, shipped: ast.Program, shipped_name: str, chip: Chip) -> str:
        """The shipped program with each tuned rule written just before the shipped rule it
        refines (rules that refine no particular one before the first)."""
        sections = []
        for section in shipped.sections:
            mine = [r for r in self.rules if r.op == section.op]
            items: list[ast.Item] = []
            number = 0
            for item in section.items:
                if isinstance(item, ast.Rule):
                    number += 1
                    tuned = [r for r in mine if r.refines == number or (number == 1 and r.refines is None)]
                    for i, r in enumerate(tuned):
                        first = (f"# tuned on this machine, refining the shipped rule below (from "
                                 f"{shipped_name}):",) if i == 0 else ()
                        items.append(ast.Rule(r.condition, config_spec(r.config), ast.Comments(
                            first + (tuple(r.claim.splitlines()) if r.claim else ()), None, i == 0)))
                    if tuned:
                        item = ast.Rule(item.condition, item.config, ast.Comments(
                            item.comments.before, item.comments.after, True))
                items.append(item)
            sections.append(ast.Section(section.op, tuple(items), section.comments, section.trailing))
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        header = ast.Comments((f"# Tuned for {chip.id} ({chip.name}) by `kernelevo tune`, {stamp}.",
                               "# Each measured rule is written just before the shipped rule it refines.")
                              + self.header)
        return format_program(ast.Program(shipped.version, shipped.target, (chip.id,),
                                          tuple(sections), header))

    def numbering(self, shipped: ast.Program) -> dict[tuple[str, int], TunedRule]:
        """(op, rule number in the rendered program) -> the tuned rule written there."""
        out = {}
        for section in shipped.sections:
            mine = [r for r in self.rules if r.op == section.op]
            position = 0
            for number in range(1, len(section.rules) + 1):
                for r in mine:
                    if r.refines == number or (number == 1 and r.refines is None):
                        position += 1
                        out[(section.op, position)] = r
                position += 1  # the shipped rule itself
        return out


def _value(v) -> ast.Expr:
    if isinstance(v, bool):
        return ast.Bool(v)
    return literal(v)


def config_spec(config: KernelConfig) -> ast.ConfigSpec:
    return ast.ConfigSpec(config.family, tuple(ast.Param(k, _value(v)) for k, v in config.params))


def choose_depths(per_depth: Sequence[Mapping[tuple, Sequence[TunedRule]]],
                  held_out_score: Callable[[tuple, int], float | None]) -> dict[tuple, int]:
    """Per group, the smallest depth whose held-out score (geometric-mean speedup over the
    group's held-out shapes, as `held_out_score(group, depth)` reports it; None when the
    group has no held-out shape) is within HELD_OUT_TOLERANCE of the best depth's."""
    chosen = {}
    for key in per_depth[0]:
        scores = [(d, held_out_score(key, d)) for d in range(len(per_depth))]
        known = [(d, s) for d, s in scores if s is not None]
        if not known:
            chosen[key] = 0
            continue
        best = max(s for _, s in known)
        sizes = sorted(known, key=lambda ds: (len(per_depth[ds[0]].get(key, ())), ds[0]))
        chosen[key] = next(d for d, s in sizes if s * HELD_OUT_TOLERANCE >= best)
    return chosen
