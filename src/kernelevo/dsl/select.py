"""Selection: a checked program, compiled, maps a call's features to a KernelConfig.

The first rule whose condition holds wins. Its parameters are evaluated, checked against
the family's domains and constraints (including those on the call); a violation is a
DSLError pointing at the rule, never a silent fallback to another rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..chips import Chip
from ..config import ConfigError, KernelConfig
from ..families import Family, family
from ..features import OP_FEATURES
from . import ast
from .checker import check
from .errors import Diagnostic, DSLError, source_line
from .evaluate import Env, EvalError, Value, compile_expr, contextual_symbols
from .formatter import format_expr


@dataclass(frozen=True)
class Selection:
    config: KernelConfig
    op: str
    rule_number: int  # 1-based, counting the section's rules in order
    line: int
    rule_text: str  # the rule's condition as written (canonically), or "else"
    path: str


@dataclass
class _CompiledRule:
    rule: ast.Rule
    number: int
    condition: Callable[[Env], Value] | None
    family: Family
    params: list[tuple[ast.Param, Callable[[Env], Value]]]


class CompiledSection:
    def __init__(self, program: ast.Program, section: ast.Section, text: str, path: str,
                 chip: Chip):
        self.op = section.op
        self.text, self.path, self.chip = text, path, chip
        feature_names = {f.name for f in OP_FEATURES[section.op]}
        let_names = {let.name for let in section.lets}
        symbols: set[int] = set()
        for item in section.items:
            for expr in ([item.value] if isinstance(item, ast.Let) else
                         ([item.condition] if item.condition is not None else [])
                         + [p.value for p in item.config.params]):
                symbols |= contextual_symbols(expr, section.op)

        def resolve(name: ast.Name):
            key = name.name
            if id(name) in symbols:  # `mask == causal`: the symbol, not the feature
                return lambda env: key
            if key in feature_names:
                return lambda env: env.features[key]
            if key in let_names:
                return lambda env: env.let(key)
            return lambda env: key  # a symbol: the checker has vetted it

        try:
            self.lets = {let.name: compile_expr(let.value, resolve) for let in section.lets}
            self.rules = []
            for number, rule in enumerate(section.rules, start=1):
                fam = family(section.op, program.target, rule.config.family)
                assert fam is not None, "selection needs a checked program"
                self.rules.append(_CompiledRule(
                    rule, number,
                    None if rule.condition is None else compile_expr(rule.condition, resolve),
                    fam, [(p, compile_expr(p.value, resolve)) for p in rule.config.params]))
        except EvalError as err:
            raise err.to_dsl_error(text, path) from None

    def _error(self, message: str, pos: ast.Pos) -> DSLError:
        return DSLError(Diagnostic(message, max(1, pos.line), max(1, pos.column), path=self.path,
                                   source_line=source_line(self.text, pos.line)))

    def select(self, features: Mapping[str, Value]) -> Selection:
        env = Env(features, self.chip, self.lets)
        try:
            for compiled in self.rules:
                if compiled.condition is not None:
                    holds = compiled.condition(env)
                    if not isinstance(holds, bool):
                        raise EvalError("a rule's condition must be true/false",
                                        compiled.rule.condition.pos)
                    if not holds:
                        continue
                return self._configure(compiled, env)
        except EvalError as err:
            raise err.to_dsl_error(self.text, self.path) from None
        raise AssertionError("a checked section ends with else")

    def _configure(self, compiled: _CompiledRule, env: Env) -> Selection:
        rule, fam = compiled.rule, compiled.family
        values = {}
        for param, fn in compiled.params:
            value = fn(env)
            schema = fam.param(param.name)
            if schema.kind == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            values[param.name] = value
        where = f"rule {compiled.number} ({'else' if rule.is_else else 'when ...'})"
        try:
            config = KernelConfig.make(self.op, fam.backend, fam.name, values)
        except ConfigError as err:
            raise self._error(f"{where} chose an invalid configuration: {err}", rule.config.pos) from None
        broken = fam.violations(config.as_dict(), self.chip, env.features)
        if broken:
            raise self._error(f"{where} chose {config.to_dsl()} for this call, but "
                              + "; ".join(broken), rule.config.pos)
        text = "else" if rule.is_else else f"when {format_expr(rule.condition)}"
        return Selection(config, self.op, compiled.number, rule.pos.line, text, self.path)


class CompiledProgram:
    """A checked program ready to select, with a per-feature-key cache."""

    def __init__(self, program: ast.Program, text: str, path: str, chip: Chip):
        diagnostics = [d for d in check(program, text, path, chip) if d.severity == "error"]
        if diagnostics:
            raise DSLError(diagnostics)
        self.program, self.text, self.path, self.chip = program, text, path, chip
        self.sections = {s.op: CompiledSection(program, s, text, path, chip)
                         for s in program.sections}
        self._cache: dict[tuple, Selection] = {}
        self._feature_names = {op: tuple(f.name for f in OP_FEATURES[op]) for op in OP_FEATURES}

    @property
    def backend(self) -> str:
        return self.program.target

    def has(self, op: str) -> bool:
        return op in self.sections

    def select(self, op: str, features: Mapping[str, Value]) -> Selection:
        key = (op,) + tuple(features[name] for name in self._feature_names[op])
        hit = self._cache.get(key)
        if hit is None:
            if op not in self.sections:
                raise KeyError(f"{self.path} has no {op} section")
            hit = self._cache[key] = self.sections[op].select(features)
        return hit


def describe(selection: Selection) -> str:
    return (f"{selection.path}:{selection.line}: rule {selection.rule_number} "
            f"({selection.rule_text}) -> {selection.config.to_dsl()}")

