"""What a kernel family is: named parameters with domains, and constraints.

A family is one kernel template (e.g. the CPU `gemm`) with named parameters, each with a
domain, and constraints between parameters, the chip and the call. The DSL checker, the
selection code, the tuner's search, `kernelevo._ext` (which rejects a parameter it does
not read) and docs/dsl.md all read these tables; nothing restates them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Union

from ..chips import Chip

ParamValue = Union[int, bool, str]
Params = Mapping[str, ParamValue]
Call = Mapping[str, Any]


#: the family (and the configuration text) of MLX's own op, the baseline of every backend
MLX_BUILTIN = "mlx"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["int", "bool", "choice"]
    doc: str
    lo: int = 0
    hi: int = 0
    multiple_of: int = 1
    choices: tuple[str, ...] = ()  # kind == "choice": the symbols
    allowed: tuple[int, ...] = ()  # kind == "int": an explicit set, when the range is sparse
    #: values the tuner tries (a function of the chip where it depends on it)
    search: tuple[ParamValue, ...] | Callable[[Chip], tuple[ParamValue, ...]] = ()

    def contains(self, value: ParamValue) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        if self.allowed:
            return value in self.allowed
        return self.lo <= value <= self.hi and value % self.multiple_of == 0

    def domain_text(self) -> str:
        if self.kind == "bool":
            return "yes or no"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.allowed:
            return "one of " + ", ".join(str(v) for v in self.allowed)
        text = f"an integer in [{self.lo}, {self.hi}]"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")

    def search_values(self, chip: Chip) -> tuple[ParamValue, ...]:
        values = self.search(chip) if callable(self.search) else self.search
        if values:
            return tuple(values)
        if self.kind == "bool":
            return (False, True)
        if self.kind == "choice":
            return self.choices
        return self.allowed or (self.lo,)


class NotApplicable(Exception):
    """A constraint on the call, asked about without one (or without a feature it reads)."""


@dataclass(frozen=True)
class Constraint:
    """A condition a configuration must meet.

    Either a function of the parameters and the chip (`holds`), or — for every constraint
    that reads the call — a DSL expression over the parameters (by name), the call's
    features and `chip.<fact>`, made with `Constraint.on_call_expr`. Being DSL, the second
    kind can be partially evaluated: with a configuration's parameters fixed, what remains
    is a condition on the call that a tuned rule can state (tune/distill.py).
    """

    text: str  # how the rule reads in messages and docs
    holds: Callable[[Params, Chip, Call], bool] | None = None
    on_call: bool = False  # depends on the call's features: checked when a rule is selected
    expr: str | None = None
    #: a static bound that a constraint on the call refines: checked only without a call
    without_call: bool = False

    @classmethod
    def on_call_expr(cls, expr: str, why: str = "") -> Constraint:
        return cls(f"{expr} ({why})" if why else expr, on_call=True, expr=expr)

    @cached_property
    def ast(self):
        from ..dsl.parser import parse_expression

        return parse_expression(self.expr)

    @cached_property
    def _compiled(self):
        from ..dsl.evaluate import compile_constraint

        return compile_constraint(self.ast)

    def check(self, params: Params, chip: Chip, call: Call | None) -> bool:
        """Whether it holds; NotApplicable when it needs a call (or feature) not given."""
        if self.expr is None:
            return self.holds(params, chip, call or {})
        if call is None:
            raise NotApplicable
        return self._compiled(params, chip, call)


@dataclass(frozen=True)
class Family:
    op: str
    backend: str
    name: str
    doc: str
    params: tuple[Param, ...]
    constraints: tuple[Constraint, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def violations(self, params: Params, chip: Chip, call: Call | None = None) -> list[str]:
        """Broken constraints, as messages. Constraints on the call are checked only when
        a call is given; one that reads a parameter not given (the checker passes only the
        parameters whose values are constants) is skipped. Anything else a constraint
        raises is a bug in it, and propagates."""
        broken = []
        for c in self.constraints:
            if (c.on_call and call is None) or (c.without_call and call is not None):
                continue
            try:
                ok = c.check(params, chip, call)
            except NotApplicable:
                continue
            except KeyError as err:
                if err.args and err.args[0] in self.param_names and err.args[0] not in params:
                    continue
                raise
            if not ok:
                broken.append(f"{self.name} needs {c.text}")
        return broken

    def call_constraints(self) -> tuple[Constraint, ...]:
        return tuple(c for c in self.constraints if c.expr is not None)

    def __post_init__(self) -> None:
        # (that every name in the expressions resolves is checked by tests/test_families.py:
        # the DSL cannot be imported while the families are being defined)
        for c in self.constraints:
            if c.on_call and c.expr is None:
                raise TypeError(f"{self.name}: a constraint on the call must be a DSL expression "
                                f"(Constraint.on_call_expr): {c.text}")

    def search_space(self, chip: Chip, call: Call | None = None) -> Iterator[dict[str, ParamValue]]:
        """Every combination of the parameters' search values that meets the constraints.
        The combinations that meet the constraints without a call are worked out once per
        chip; a call then only filters them by the constraints on the call."""
        key = (self.op, self.backend, self.name, chip)
        static = _STATIC_SPACES.get(key)
        if static is None:
            names = self.param_names
            domains = [[v for v in p.search_values(chip) if p.contains(v)] for p in self.params]
            static = _STATIC_SPACES[key] = [
                params for params in (dict(zip(names, values)) for values in itertools.product(*domains))
                if not self.violations(params, chip)]
        if call is None:
            yield from (dict(p) for p in static)
            return
        on_call = [c for c in self.constraints if c.on_call]
        for params in static:
            if not self._broken(on_call, params, chip, call):
                yield dict(params)

    def _broken(self, constraints, params, chip, call) -> bool:
        for c in constraints:
            try:
                if not c.check(params, chip, call):
                    return True
            except NotApplicable:
                continue
        return False


#: (op, backend, family, chip) -> the parameter combinations valid without a call
_STATIC_SPACES: dict[tuple, list[dict]] = {}
