"""Evaluating DSL expressions: compiled once into closures, then run per call.

Values are Python ints, floats, bools and symbols (plain strings such as "bf16").
Integers stay within 64 bits, so no expression can exhaust memory or time.
"""

from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..chips import FACT_NAMES, Chip, fact
from . import ast
from .errors import Diagnostic, DSLError, source_line

Value = Union[int, float, bool, str]
INT_LIMIT = 1 << 62


class EvalError(Exception):
    def __init__(self, message: str, pos: ast.Pos):
        super().__init__(message)
        self.message = message
        self.pos = pos

    def to_dsl_error(self, text: str, path: str) -> DSLError:
        return DSLError(Diagnostic(self.message, max(1, self.pos.line), max(1, self.pos.column),
                                   self.pos.end_column if self.pos.end_line == self.pos.line else None,
                                   path=path, source_line=source_line(text, self.pos.line)))


@dataclass(frozen=True)
class Function:
    name: str
    min_args: int
    max_args: int | None
    doc: str
    apply: Callable[..., Value]


def _pow2ceil(x):
    if x <= 1:
        return 1
    return 1 << math.ceil(math.log2(x))


def _pow2floor(x):
    if x < 1:
        raise ValueError("pow2floor needs x >= 1")
    return 1 << math.floor(math.log2(x))


def _log2(x):
    if x <= 0:
        raise ValueError("log2 needs x > 0")
    return math.floor(math.log2(x))


def _cdiv(a, b):
    if b == 0:
        raise ZeroDivisionError
    return -(-a // b)


def _clamp(x, lo, hi):
    return max(lo, min(x, hi))


FUNCTIONS: dict[str, Function] = {f.name: f for f in (
    Function("min", 2, None, "the smallest argument", min),
    Function("max", 2, None, "the largest argument", max),
    Function("clamp", 3, 3, "clamp(x, lo, hi): x limited to [lo, hi]", _clamp),
    Function("cdiv", 2, 2, "cdiv(a, b): a / b rounded up (integers)", _cdiv),
    Function("pow2ceil", 1, 1, "the smallest power of two >= x (1 for x <= 1)", _pow2ceil),
    Function("pow2floor", 1, 1, "the largest power of two <= x (x >= 1)", _pow2floor),
    Function("log2", 1, 1, "floor(log2(x)) for x > 0, an integer", _log2),
)}


class Env:
    """What an expression sees: the call's features, the chip, and the section's lets."""

    __slots__ = ("features", "chip", "_lets", "_let_values")

    def __init__(self, features: Mapping[str, Value], chip: Chip | None,
                 lets: Mapping[str, Callable[[Env], Value]] | None = None):
        self.features = features
        self.chip = chip
        self._lets = lets or {}
        self._let_values: dict[str, Value] = {}

    def let(self, name: str) -> Value:
        if name not in self._let_values:
            self._let_values[name] = self._lets[name](self)
        return self._let_values[name]


class NotConstant(Exception):
    """The expression reads a feature, a let or the chip."""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _checked(value: Value, pos: ast.Pos) -> Value:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        raise EvalError("value out of range (integers are limited to 62 bits)", pos)
    if isinstance(value, float) and not math.isfinite(value):
        raise EvalError("value out of range", pos)
    return value


def _need_num(v: Value, pos: ast.Pos, what: str) -> None:
    if not _is_num(v):
        raise EvalError(f"{what} needs numbers, got {_kind(v)} {_show(v)}", pos)


def _need_bool(v: Value, pos: ast.Pos, what: str) -> None:
    if not isinstance(v, bool):
        raise EvalError(f"{what} needs true/false, got {_kind(v)} {_show(v)}", pos)


def _kind(v: Value) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "symbol"


def _show(v: Value) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _arith(op: str, a: Value, b: Value, pos: ast.Pos) -> Value:
    _need_num(a, pos, f"'{op}'")
    _need_num(b, pos, f"'{op}'")
    try:
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        elif op == "/":
            r = a / b
        elif op == "//":
            r = a // b
        elif op == "%":
            r = a % b
        else:  # shifts
            if not (isinstance(a, int) and isinstance(b, int)):
                raise EvalError(f"'{op}' needs integers", pos)
            if not 0 <= b < 63:
                raise EvalError(f"shift by {b} is out of range (0..62)", pos)
            r = a << b if op == "<<" else a >> b
    except ZeroDivisionError:
        raise EvalError("division by zero", pos) from None
    except OverflowError:
        raise EvalError("value out of range", pos) from None
    return _checked(r, pos)


def _compare(op: str, a: Value, b: Value, pos: ast.Pos) -> bool:
    if op in ("==", "!="):
        same_kind = (_is_num(a) and _is_num(b)) or type(a) is type(b)
        if not same_kind:
            raise EvalError(f"cannot compare {_kind(a)} {_show(a)} with {_kind(b)} {_show(b)}", pos)
        return (a == b) if op == "==" else (a != b)
    _need_num(a, pos, f"'{op}'")
    _need_num(b, pos, f"'{op}'")
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


Resolver = Callable[[ast.Name], Callable[[Env], Value]]


def compile_expr(expr: ast.Expr, resolve: Resolver) -> Callable[[Env], Value]:
    """Compiles an expression; `resolve` turns a Name into a reader (feature, let, symbol)."""
    if isinstance(expr, ast.Num):
        value = _checked(expr.value, expr.pos)
        return lambda env: value
    if isinstance(expr, ast.Bool):
        b = expr.value
        return lambda env: b
    if isinstance(expr, ast.Name):
        return resolve(expr)
    if isinstance(expr, ast.Attr):
        if expr.obj != "chip" or expr.name not in FACT_NAMES:
            raise EvalError(f"unknown chip fact {expr.obj}.{expr.name}", expr.pos)
        name, pos = expr.name, expr.pos

        def chip_fact(env: Env) -> Value:
            if env.chip is None:
                raise NotConstant
            return fact(env.chip, name)

        return chip_fact
    if isinstance(expr, ast.Unary):
        operand = compile_expr(expr.operand, resolve)
        pos = expr.pos
        if expr.op == "not":
            def not_(env):
                v = operand(env)
                _need_bool(v, pos, "'not'")
                return not v
            return not_

        def neg(env):
            v = operand(env)
            _need_num(v, pos, "'-'")
            return -v
        return neg
    if isinstance(expr, ast.Binary):
        left, right = compile_expr(expr.left, resolve), compile_expr(expr.right, resolve)
        op, pos = expr.op, expr.pos
        if op == "and":
            def and_(env):
                a = left(env)
                _need_bool(a, pos, "'and'")
                if not a:
                    return False
                b = right(env)
                _need_bool(b, pos, "'and'")
                return b
            return and_
        if op == "or":
            def or_(env):
                a = left(env)
                _need_bool(a, pos, "'or'")
                if a:
                    return True
                b = right(env)
                _need_bool(b, pos, "'or'")
                return b
            return or_
        return lambda env: _arith(op, left(env), right(env), pos)
    if isinstance(expr, ast.Compare):
        left, right = compile_expr(expr.left, resolve), compile_expr(expr.right, resolve)
        op, pos = expr.op, expr.pos
        return lambda env: _compare(op, left(env), right(env), pos)
    if isinstance(expr, ast.InSet):
        value = compile_expr(expr.value, resolve)
        items = [compile_expr(i, resolve) for i in expr.items]
        negated, pos = expr.negated, expr.pos

        def in_set(env):
            v = value(env)
            found = any(_compare("==", v, item(env), pos) for item in items)
            return not found if negated else found
        return in_set
    if isinstance(expr, ast.Call):
        fn = FUNCTIONS.get(expr.func)
        if fn is None:
            raise EvalError(f"unknown function '{expr.func}'", expr.pos)
        n = len(expr.args)
        if n < fn.min_args or (fn.max_args is not None and n > fn.max_args):
            raise EvalError(f"{fn.name} takes {_arity(fn)}, got {n}", expr.pos)
        args = [compile_expr(a, resolve) for a in expr.args]
        pos = expr.pos

        def call(env):
            values = [a(env) for a in args]
            for v in values:
                _need_num(v, pos, fn.name)
            if fn.name in ("cdiv",) and not all(isinstance(v, int) for v in values):
                raise EvalError(f"{fn.name} needs integers", pos)
            try:
                return _checked(fn.apply(*values), pos)
            except ZeroDivisionError:
                raise EvalError("division by zero", pos) from None
            except (ValueError, OverflowError) as err:
                raise EvalError(str(err) or f"{fn.name}: value out of range", pos) from None
        return call
    if isinstance(expr, ast.Cond):
        then, test, otherwise = (compile_expr(e, resolve) for e in (expr.then, expr.test, expr.otherwise))
        pos = expr.pos

        def cond(env):
            t = test(env)
            _need_bool(t, pos, "'if'")
            return then(env) if t else otherwise(env)
        return cond
    raise EvalError(f"not an expression: {expr!r}", getattr(expr, "pos", ast.NOWHERE))


def _arity(fn: Function) -> str:
    if fn.max_args is None:
        return f"{fn.min_args} or more arguments"
    if fn.min_args == fn.max_args:
        return f"{fn.min_args} argument" + ("s" if fn.min_args != 1 else "")
    return f"{fn.min_args} to {fn.max_args} arguments"


@lru_cache(maxsize=None)
def _symbol_sets(op: str) -> dict[str, frozenset[str]]:
    from ..features import OP_FEATURES

    return {f.name: frozenset(f.symbols) for f in OP_FEATURES[op] if f.type == "symbol"}


def contextual_symbols(expr: ast.Expr, op: str) -> set[int]:
    """The Name nodes that stand for a symbol because of where they are, although a feature
    has the same name: `mask == causal` compares the mask kind with the symbol `causal`, not
    with the boolean feature `causal` (as the checker reads it). Returned as node ids."""
    symbol_sets = _symbol_sets(op)
    found: set[int] = set()

    def mark(feature: ast.Expr, other: ast.Expr) -> None:
        if (isinstance(feature, ast.Name) and feature.name in symbol_sets
                and isinstance(other, ast.Name) and other.name in symbol_sets[feature.name]):
            found.add(id(other))

    def walk(e: ast.Expr) -> None:
        if isinstance(e, ast.Compare) and e.op in ("==", "!="):
            mark(e.left, e.right)
            mark(e.right, e.left)
        elif isinstance(e, ast.InSet):
            for item in e.items:
                mark(e.value, item)
        for child in _children(e):
            walk(child)
    walk(expr)
    return found


def compile_on_features(expr: ast.Expr, op: str) -> Callable[[Mapping, Chip | None], Value]:
    """An expression over an op's call features and chip facts (no lets), as fn(features,
    chip): names resolve as in a rule of that op's section."""
    from ..features import OP_FEATURES

    names = {f.name for f in OP_FEATURES[op]}
    symbols = contextual_symbols(expr, op)

    def resolve(name: ast.Name):
        key = name.name
        if key in names and id(name) not in symbols:
            return lambda env: env.features[key]
        return lambda env: key

    fn = compile_expr(expr, resolve)
    return lambda features, chip=None: fn(Env(features, chip))


def _symbol_resolver(name: ast.Name) -> Callable[[Env], Value]:
    symbol = name.name
    return lambda env: symbol


def _constant_resolver(known_names: frozenset[str]) -> Resolver:
    def resolve(name: ast.Name):
        if name.name in known_names:
            def not_constant(env):
                raise NotConstant
            return not_constant
        return _symbol_resolver(name)
    return resolve


def try_constant(expr: ast.Expr, names_that_vary: frozenset[str] = frozenset(),
                 chip: Chip | None = None) -> tuple[bool, Value | None]:
    """(True, value) when the expression needs no feature or let (nor chip fact, unless a
    chip is given); (False, None) otherwise. Failing on constants raises EvalError."""
    try:
        fn = compile_expr(expr, _constant_resolver(names_that_vary))
        return True, fn(Env({}, chip))
    except NotConstant:
        return False, None


def constant_value(expr: ast.Expr, text: str, path: str) -> Value:
    """The value of a constant expression, names read as symbols (for config strings)."""
    try:
        return compile_expr(expr, _symbol_resolver)(Env({}, None))
    except NotConstant:
        raise DSLError(Diagnostic("a configuration's values must be constants (chip facts are "
                                  "not known here)", max(1, expr.pos.line), max(1, expr.pos.column),
                                  path=path, source_line=source_line(text, expr.pos.line))) from None
    except EvalError as err:
        raise err.to_dsl_error(text, path) from None


def partial_truth(expr: ast.Expr, names_that_vary: frozenset[str], chip: Chip | None) -> bool | None:
    """Three-valued: True or False when the condition is decided without the call's
    features (`chip.simd_width >= 512 and M > 8` is False on a 256-bit chip), else None."""
    if isinstance(expr, ast.Binary) and expr.op in ("and", "or"):
        left = partial_truth(expr.left, names_that_vary, chip)
        right = partial_truth(expr.right, names_that_vary, chip)
        decisive = expr.op == "or"  # True decides `or`, False decides `and`
        if decisive in (left, right):
            return decisive
        return (not decisive) if left is right is (not decisive) else None
    if isinstance(expr, ast.Unary) and expr.op == "not":
        inner = partial_truth(expr.operand, names_that_vary, chip)
        return None if inner is None else not inner
    try:
        known, value = try_constant(expr, names_that_vary, chip)
    except EvalError:
        return None
    return value if known and isinstance(value, bool) else None


# -- constraints of kernel families ------------------------------------------------------
#
# A family's constraints on the call are DSL expressions over its parameters (by name), the
# call's features and chip facts. A parameter shadows a feature of the same name.


def _all_feature_names() -> frozenset[str]:
    from ..features import OP_FEATURES

    return frozenset(f.name for features in OP_FEATURES.values() for f in features)


class _ConstraintEnv(Env):
    __slots__ = ("params",)

    def __init__(self, params, chip, call):
        super().__init__(call, chip)
        self.params = params


def compile_constraint(expr: ast.Expr) -> Callable[[Mapping, Chip, Mapping], bool]:
    """A constraint expression as fn(params, chip, call) -> bool. A feature the call lacks
    raises NotApplicable (families.schema)."""
    from ..families.schema import NotApplicable

    features = _all_feature_names()
    symbols = contextual_symbols(expr, "matmul") | contextual_symbols(expr, "attention")

    def resolve(name: ast.Name):
        key = name.name
        if id(name) in symbols:
            return lambda env: key

        def read(env: _ConstraintEnv) -> Value:
            if key in env.params:
                return env.params[key]
            if key in features:
                if key not in env.features:
                    raise NotApplicable
                return env.features[key]
            return key  # a symbol (constraint_names vets them)
        return read

    fn = compile_expr(expr, resolve)

    def holds(params, chip, call) -> bool:
        value = fn(_ConstraintEnv(params, chip, call))
        if not isinstance(value, bool):
            raise EvalError("a constraint must be true/false", expr.pos)
        return value
    return holds


def names_in(expr: ast.Expr) -> set[str]:
    """The names an expression reads (features, lets, parameters or symbols)."""
    found: set[str] = set()

    def walk(e):
        if isinstance(e, ast.Name):
            found.add(e.name)
        for child in _children(e):
            walk(child)
    walk(expr)
    return found


def _children(e: ast.Expr) -> tuple[ast.Expr, ...]:
    if isinstance(e, ast.Unary):
        return (e.operand,)
    if isinstance(e, (ast.Binary, ast.Compare)):
        return (e.left, e.right)
    if isinstance(e, ast.InSet):
        return (e.value,) + e.items
    if isinstance(e, ast.Call):
        return e.args
    if isinstance(e, ast.Cond):
        return (e.then, e.test, e.otherwise)
    return ()


def constraint_names(expr: ast.Expr, family) -> None:
    """Raises ValueError unless every name in a constraint of `family` is one of its
    parameters, a feature of its op, or a symbol one of those can take."""
    from ..features import DTYPES, OP_FEATURES

    features = OP_FEATURES[family.op]
    symbols = set(DTYPES) | {s for f in features for s in f.symbols}
    symbols |= {c for p in family.params for c in p.choices}
    allowed = set(family.param_names) | {f.name for f in features} | symbols
    unknown = names_in(expr) - allowed
    if unknown:
        raise ValueError(f"{family.backend} {family.op} family {family.name}: a constraint reads "
                         f"{', '.join(sorted(unknown))}, which is no parameter, feature or symbol")


def literal(value: Value) -> ast.Expr:
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, (int, float)):
        return ast.Num(value) if value >= 0 else ast.Unary("-", ast.Num(-value))
    return ast.Name(str(value))


def residual(expr: ast.Expr, params: Mapping[str, Value], chip: Chip | None,
             known: Mapping[str, Value]) -> Value | ast.Expr:
    """Partial evaluation of a constraint: with the parameters, the chip and the `known`
    features fixed, either its value or the condition on the other features that remains
    (`engine == fma or dtype == bf16` with engine=amx is `dtype == bf16`)."""
    features = _all_feature_names()

    def constant(e) -> tuple[bool, Value | None]:
        try:
            return True, compile_expr(e, lambda n: (lambda env: n.name))(Env({}, chip))
        except NotConstant:
            return False, None

    def pe(e: ast.Expr):
        """(True, value) or (False, simplified expression)."""
        if isinstance(e, (ast.Num, ast.Bool)):
            return True, e.value
        if isinstance(e, ast.Name):
            key = e.name
            if key in params:
                return True, params[key]
            if key in features:
                return (True, known[key]) if key in known else (False, e)
            return True, key
        if isinstance(e, ast.Attr):
            return constant(e) if chip is not None else (False, e)
        if isinstance(e, ast.Binary) and e.op in ("and", "or"):
            lk, lv = pe(e.left)
            rk, rv = pe(e.right)
            absorbing = e.op == "or"  # True absorbs `or`, False absorbs `and`
            if (lk and lv is absorbing) or (rk and rv is absorbing):
                return True, absorbing
            if lk and not rk and isinstance(lv, bool):
                return False, rv  # the known side is the neutral value
            if rk and not lk and isinstance(rv, bool):
                return False, lv
            if not lk and not rk:
                return False, ast.Binary(e.op, lv, rv)
        if isinstance(e, ast.Cond):
            tk, tv = pe(e.test)
            if tk:
                return pe(e.then if tv else e.otherwise)
        parts = [pe(c) for c in _children(e)]
        rebuilt = _rebuild(e, [literal(v) if k else v for k, v in parts])
        if all(k for k, _ in parts):
            ok, value = constant(rebuilt)
            if ok:
                return True, value
        return False, rebuilt

    return pe(expr)[1]


def _rebuild(e: ast.Expr, children: list[ast.Expr]) -> ast.Expr:
    if isinstance(e, ast.Unary):
        return ast.Unary(e.op, children[0])
    if isinstance(e, ast.Binary):
        return ast.Binary(e.op, children[0], children[1])
    if isinstance(e, ast.Compare):
        return ast.Compare(e.op, children[0], children[1])
    if isinstance(e, ast.InSet):
        return ast.InSet(children[0], tuple(children[1:]), e.negated)
    if isinstance(e, ast.Call):
        return ast.Call(e.func, tuple(children))
    if isinstance(e, ast.Cond):
        return ast.Cond(children[0], children[1], children[2])
    return e
