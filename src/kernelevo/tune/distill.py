"""Turning measurements into a readable .kevo program.

Version 0: one exact-match rule per tuned shape whose winner beat the shipped choice,
placed before the shipped rules, so every other call keeps its shipped configuration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..chips import Chip
from ..config import KernelConfig
from ..dsl import ast
from ..dsl.formatter import format_program
from .workloads import MatmulShape


@dataclass(frozen=True)
class TunedRule:
    shape: MatmulShape
    config: KernelConfig
    speedup: float  # shipped time / tuned time
    shipped_s: float
    tuned_s: float


def _value(v) -> ast.Expr:
    if isinstance(v, bool):
        return ast.Bool(v)
    if isinstance(v, int):
        return ast.Num(v)
    return ast.Name(str(v))


def config_spec(config: KernelConfig) -> ast.ConfigSpec:
    return ast.ConfigSpec(config.family, tuple(ast.Param(k, _value(v)) for k, v in config.params))


def _all(terms: Sequence[ast.Expr]) -> ast.Expr:
    expr = terms[0]
    for term in terms[1:]:
        expr = ast.Binary("and", expr, term)
    return expr


def shape_condition(shape: MatmulShape) -> ast.Expr:
    terms = [ast.Compare("==", ast.Name(n), ast.Num(v))
             for n, v in (("M", shape.M), ("N", shape.N), ("K", shape.K))]
    if shape.batch != 1:
        terms.append(ast.Compare("==", ast.Name("batch"), ast.Num(shape.batch)))
    terms.append(ast.Compare("==", ast.Name("dtype"), ast.Name(shape.dtype)))
    terms.append(ast.Name("transpose_b") if shape.transpose_b
                 else ast.Unary("not", ast.Name("transpose_b")))
    return _all(terms)


def distill(rules: Sequence[TunedRule], shipped: ast.Program, shipped_name: str, chip: Chip) -> str:
    """The text of the tuned program: tuned rules first, then the shipped ones."""
    tuned_items = []
    for r in rules:
        note = (f"# {r.shape.label or 'shape'} {r.shape}: {r.speedup:.2f}x the shipped rule "
                f"({r.shipped_s * 1e3:.3f} -> {r.tuned_s * 1e3:.3f} ms)")
        tuned_items.append(ast.Rule(shape_condition(r.shape), config_spec(r.config),
                                    ast.Comments((note,))))
    sections = []
    for section in shipped.sections:
        lets = [i for i in section.items if isinstance(i, ast.Let)]
        rest = [i for i in section.items if not isinstance(i, ast.Let)]
        if section.op == "matmul" and rest:
            first = rest[0]
            rest[0] = ast.Rule(first.condition, first.config, ast.Comments(
                (f"# shipped rules, from {shipped_name}",) + first.comments.before,
                first.comments.after, True))
            items = tuple(lets) + tuple(tuned_items) + tuple(rest)
        else:
            items = section.items
        sections.append(ast.Section(section.op, items, section.comments, section.trailing))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    header = ast.Comments((f"# Tuned for {chip.id} ({chip.name}) by `kernelevo tune`, {stamp}.",
                           "# Rules measured on this machine come first; the shipped rules follow."))
    program = ast.Program(shipped.version, shipped.target, (chip.id,), tuple(sections), header)
    return format_program(program)
