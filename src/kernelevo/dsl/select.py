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
from .fastparse import paused_gc
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


class _CompiledRule:
    """A rule, compiled when selection first reaches it (a tuned file has tens of
    thousands of rules; a call reads only those before the one that matches)."""

    __slots__ = ("rule", "number", "family", "_resolve", "_condition", "_params")

    def __init__(self, rule: ast.Rule, number: int, family: Family, resolve):
        self.rule, self.number, self.family, self._resolve = rule, number, family, resolve
        self._condition = self._params = None

    @property
    def condition(self) -> Callable[[Env], Value] | None:
        if self._condition is None and self.rule.condition is not None:
            self._condition = self._resolve(self.rule.condition)
        return self._condition

    @property
    def params(self) -> list[tuple[ast.Param, Callable[[Env], Value]]]:
        if self._params is None:
            self._params = [(p, self._resolve(p.value)) for p in self.rule.config.params]
        return self._params


class CompiledSection:
    def __init__(self, program: ast.Program, section: ast.Section, text: str, path: str,
                 chip: Chip):
        self.op = op = section.op
        self.text, self.path, self.chip = text, path, chip
        feature_names = {f.name for f in OP_FEATURES[section.op]}
        let_names = {let.name for let in section.lets}

        def compile_one(expr: ast.Expr) -> Callable[[Env], Value]:
            symbols = contextual_symbols(expr, op)

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
                return compile_expr(expr, resolve)
            except EvalError as err:
                raise err.to_dsl_error(text, path) from None

        self.lets = {let.name: compile_one(let.value) for let in section.lets}
        self.rules = []
        for number, rule in enumerate(section.rules, start=1):
            fam = family(section.op, program.target, rule.config.family)
            assert fam is not None, "selection needs a checked program"
            self.rules.append(_CompiledRule(rule, number, fam, compile_one))

    def _error(self, message: str, pos: ast.Pos) -> DSLError:
        return DSLError(Diagnostic(message, max(1, pos.line), max(1, pos.column), path=self.path,
                                   source_line=source_line(self.text, pos.line)))

    def select(self, features: Mapping[str, Value]) -> Selection:
        env = Env(features, self.chip, self.lets)
        with paused_gc():  # the first calls compile the rules they pass
            return self._select(env)

    def _select(self, env: Env) -> Selection:
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
        with paused_gc():
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

