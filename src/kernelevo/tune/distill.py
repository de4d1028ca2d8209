"""Turning measurements into a compact, readable .kevo program.

Each shape whose own winner beat the shipped choice gets a configuration within 2% of its
best measured one; a greedy cover picks the configurations that serve the most shapes,
so one rule often serves several. Each rule's condition is an exact, factorised
description of the shapes it serves (`M in {16, 128} and N in {1024, 3072} and K == 1024`),
so shapes nobody measured keep the shipped rules, which follow the tuned ones.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..chips import Chip
from ..config import KernelConfig
from ..dsl import ast
from ..dsl.formatter import format_program

TOLERANCE = 1.02  # a configuration serves a shape if within 2% of that shape's best

# The features a rule names exactly, and the ones whose values it enumerates.
_FIXED = {"matmul": ("dtype", "transpose_b", "batch"),
          "attention": ("dtype", "mask", "heads", "kv_heads", "head_dim", "softcap", "window")}
_VARYING = {"matmul": ("M", "N", "K"), "attention": ("q_len", "kv_len")}
_OMIT_DEFAULTS = {"batch": 1, "softcap": 0.0, "window": 0}


@dataclass
class TunedRule:
    op: str
    config: KernelConfig
    shapes: list  # ShapeResult
    speedup: float  # geometric mean over its shapes, of the shipped time over this config's

    def condition(self) -> ast.Expr:
        return _describe(self.op, [s.shape.features() for s in self.shapes])


@dataclass
class Distilled:
    rules: list[TunedRule] = field(default_factory=list)
    choice: dict[str, KernelConfig] = field(default_factory=dict)  # shape key -> config

    def render(self, shipped: ast.Program, shipped_name: str, chip: Chip) -> str:
        sections = []
        for section in shipped.sections:
            tuned = [ast.Rule(r.condition(), config_spec(r.config), ast.Comments((_note(r),)))
                     for r in self.rules if r.op == section.op]
            lets = [i for i in section.items if isinstance(i, ast.Let)]
            rest = [i for i in section.items if not isinstance(i, ast.Let)]
            if tuned and rest:
                first = rest[0]
                rest[0] = ast.Rule(first.condition, first.config, ast.Comments(
                    (f"# shipped rules, from {shipped_name}",) + first.comments.before,
                    first.comments.after, True))
            sections.append(ast.Section(section.op, tuple(lets) + tuple(tuned) + tuple(rest),
                                        section.comments, section.trailing))
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        header = ast.Comments((f"# Tuned for {chip.id} ({chip.name}) by `kernelevo tune`, {stamp}.",
                               "# Rules measured on this machine come first; the shipped rules follow."))
        return format_program(ast.Program(shipped.version, shipped.target, (chip.id,),
                                          tuple(sections), header))


def _note(rule: TunedRule) -> str:
    n = len(rule.shapes)
    what = str(rule.shapes[0].shape) if n == 1 else f"{n} shapes"
    return f"# {what}: {rule.speedup:.2f}x the shipped rules (measured)"


def _value(v) -> ast.Expr:
    if isinstance(v, bool):
        return ast.Bool(v)
    if isinstance(v, (int, float)):
        return ast.Num(v)
    return ast.Name(str(v))


def config_spec(config: KernelConfig) -> ast.ConfigSpec:
    return ast.ConfigSpec(config.family, tuple(ast.Param(k, _value(v)) for k, v in config.params))


def _all(terms: Sequence[ast.Expr]) -> ast.Expr:
    expr = terms[0]
    for term in terms[1:]:
        expr = ast.Binary("and", expr, term)
    return expr


def _any(terms: Sequence[ast.Expr]) -> ast.Expr:
    expr = terms[0]
    for term in terms[1:]:
        expr = ast.Binary("or", expr, term)
    return expr


def _term(name: str, values) -> ast.Expr:
    values = sorted(values, key=lambda v: (str(type(v)), v))
    if len(values) == 1:
        v = values[0]
        if isinstance(v, bool):
            return ast.Name(name) if v else ast.Unary("not", ast.Name(name))
        return ast.Compare("==", ast.Name(name), _value(v))
    return ast.InSet(ast.Name(name), tuple(_value(v) for v in values))


def _tree(points: set[tuple]) -> list[tuple[set, list]]:
    """A set of tuples as a tree of value sets whose expansion is exactly the set: the first
    values whose remainders agree are merged, then the remainders are split the same way."""
    if len(next(iter(points))) == 1:
        return [({p[0] for p in points}, [])]
    rest_by_head: dict = defaultdict(set)
    for p in points:
        rest_by_head[p[0]].add(p[1:])
    heads_by_rest: dict = defaultdict(set)
    for head, rest in rest_by_head.items():
        heads_by_rest[frozenset(rest)].add(head)
    return [(heads, _tree(set(rest))) for rest, heads in heads_by_rest.items()]


def _conjunctions(names: Sequence[str], nodes: list[tuple[set, list]]) -> list[list[ast.Expr]]:
    """The tree as alternatives, each a list of terms to join with `and`."""
    out = []
    for values, children in nodes:
        term = _term(names[0], values)
        if not children:
            out.append([term])
            continue
        below = _conjunctions(names[1:], children)
        out.append([term] + below[0] if len(below) == 1 else [term, _any([_all(c) for c in below])])
    return out


def _describe(op: str, features: list[dict]) -> ast.Expr:
    """A condition that matches exactly these calls' features."""
    by_fixed: dict = defaultdict(set)
    for f in features:
        by_fixed[tuple(f[k] for k in _FIXED[op])].add(tuple(f[k] for k in _VARYING[op]))
    out = []
    for fixed, points in sorted(by_fixed.items(), key=lambda kv: str(kv[0])):
        terms = [_term(k, [v]) for k, v in zip(_FIXED[op], fixed) if _OMIT_DEFAULTS.get(k, object()) != v]
        alternatives = _conjunctions(_VARYING[op], _tree(points))
        terms += alternatives[0] if len(alternatives) == 1 else [_any([_all(a) for a in alternatives])]
        out.append(_all(terms))
    return _any(out)


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def distill(shapes: Sequence, min_speedup: float = 1.03, tolerance: float = TOLERANCE) -> Distilled:
    """Chooses rules for the shapes (ShapeResults) whose winner beat the shipped choice."""
    out = Distilled()
    for op in dict.fromkeys(s.shape.op for s in shapes):
        eligible = [s for s in shapes if s.shape.op == op and s.best is not None]
        acceptable: dict[str, dict[str, float]] = {}
        for s in eligible:
            best = min(s.ratios.values())
            limit = min(best * tolerance, 1.0)
            acceptable[s.shape.key] = {c: r for c, r in s.ratios.items() if r <= limit and r < 1.0}
        uncovered = {s.shape.key: s for s in eligible}
        while uncovered:
            counts: dict[str, list] = defaultdict(list)
            for key, s in uncovered.items():
                for config in acceptable[key]:
                    counts[config].append(s)
            config, served = max(counts.items(), key=lambda kv: (
                len(kv[1]), _geomean(1.0 / x.ratios[kv[0]] for x in kv[1]), kv[0]))
            cfg = KernelConfig.parse(config, op, served[0].shipped.backend)
            out.rules.append(TunedRule(op, cfg, served, _geomean(1.0 / x.ratios[config] for x in served)))
            for s in served:
                out.choice[s.shape.key] = cfg
                del uncovered[s.shape.key]
    return out
