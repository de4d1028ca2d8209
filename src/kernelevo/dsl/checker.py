"""Static checks of a .kevo program: every problem found at once, each located.

What is checked: the header (version, target, chips); section structure (lets first, one
final else, no duplicate sections); names (features, lets, chip facts, functions, symbols)
and types; kernel families and their parameters against the schema in families.py
(names, domains, and constraints, whenever the values are constants); rules that can
never be reached. Whatever depends on the call is checked again when a rule is selected.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..chips import BACKENDS, FACT_NAMES, Chip
from ..families import Param, families_for, family
from ..features import OP_FEATURES, Feature
from . import ast
from .errors import Diagnostic
from .evaluate import FUNCTIONS, EvalError, partial_truth, try_constant
from .fastparse import paused_gc
from .formatter import format_expr

SUPPORTED_VERSION = 1
INTEGER_FACTS = {"cores", "simd_width", "vector_registers", "threadgroup_memory", "max_threads",
                 "generation", "amx"}


@dataclass(frozen=True)
class Type:
    kind: str  # int | float | bool | symbol | any (after an error)
    symbols: tuple[str, ...] | None = None  # the values of a symbol feature, in order
    literal: str | None = None  # a bare name that is not a feature or let: maybe a symbol

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")


ANY = Type("any")
INT, FLOAT, BOOL = Type("int"), Type("float"), Type("bool")

_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false",
               "symbol": "a symbol", "any": "a value"}


def _feature_type(f: Feature) -> Type:
    if f.type == "symbol":
        return Type("symbol", tuple(f.symbols))
    return {"int": INT, "bool": BOOL, "number": FLOAT}[f.type]


_CPU_CLASSES = {"avx512": (512, 32), "avx2": (256, 16), "neon": (128, 32)}


def representative_chips(backend: str, patterns: tuple[str, ...]) -> list[Chip]:
    """The kinds of chip a file's `chips` patterns cover, each with the facts that limit
    kernels (cores=0 means 'not known'). A file is checked against each of them."""
    if backend == "cpu":
        classes = set()
        for pattern in patterns:
            parts = pattern.split("-")
            isa = parts[1] if len(parts) > 1 and parts[0] == "cpu" else "*"
            classes |= ({isa} if isa in _CPU_CLASSES else {"*"})
        found = []
        for isa in sorted(classes):
            width, regs = _CPU_CLASSES.get(isa, (128, 16))
            name = f"{isa.upper()} CPUs" if isa != "*" else "any CPU"
            found.append(Chip(id=f"cpu-{isa}", backend="cpu", name=name, vendor="", cores=0,
                              simd_width=width, vector_registers=regs))
        return found
    if backend == "metal":
        # One per M generation the patterns name (rules may test chip.generation).
        generations = sorted({int(m.group(1)) for p in patterns
                              if (m := re.match(r"apple-m(\d)", p))} or {1, 2, 3, 4})
        return [Chip(id=f"apple-m{g}-any", backend="metal", name=f"Apple M{g} GPUs", vendor="apple",
                     cores=0, simd_width=32, threadgroup_memory=32768, max_threads=1024,
                     generation=g) for g in generations]
    hopper = bool(patterns) and all(
        p.startswith(("nvidia-h1", "nvidia-h2", "nvidia-gh", "nvidia-b", "nvidia-gb")) for p in patterns)
    return [Chip(id="nvidia-any", backend="cuda", name="NVIDIA GPUs", vendor="nvidia", cores=0,
                 simd_width=32, threadgroup_memory=(227 if hopper else 99) * 1024, max_threads=1024)]


class _Checker:
    def __init__(self, program: ast.Program, text: str, path: str, chip: Chip | None):
        self.program = program
        self.lines = text.splitlines()
        self.path = path
        self.chip = chip
        self.diagnostics: list[Diagnostic] = []

    # -- reporting -------------------------------------------------------------------
    def error(self, message: str, pos: ast.Pos, severity: str = "error") -> None:
        line = max(1, pos.line)
        src = self.lines[line - 1].expandtabs(1) if line <= len(self.lines) else ""
        end = pos.end_column if pos.end_line == pos.line and pos.end_column > pos.column else None
        self.diagnostics.append(Diagnostic(message, line, max(1, pos.column), end,
                                           severity, self.path, src))  # type: ignore[arg-type]

    @staticmethod
    def _suggest(name: str, candidates) -> str:
        close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else ""

    # -- program ---------------------------------------------------------------------
    def run(self) -> list[Diagnostic]:
        p = self.program
        if p.version != SUPPORTED_VERSION:
            self.error(f"this file is kevo version {p.version}; kernelevo reads version "
                       f"{SUPPORTED_VERSION}", p.pos)
        backend = p.target
        if backend is None:
            self.error(f"missing `target <backend>` after `kevo {p.version}`; expected one of "
                       + ", ".join(BACKENDS), p.pos)
        elif backend not in BACKENDS:
            self.error(f"unknown target '{backend}'; expected one of {', '.join(BACKENDS)}"
                       + self._suggest(backend, BACKENDS), p.target_pos)
            backend = None
        chips = ([self.chip] if self.chip else
                 representative_chips(backend, p.chips or ("*",)) if backend else [])
        seen: dict[str, ast.Section] = {}
        for section in p.sections:
            if section.op in seen:
                self.error(f"a second '{section.op}' section (the first is at line "
                           f"{seen[section.op].pos.line})", section.pos)
                continue
            seen[section.op] = section
            self.section(section, backend, chips)
        unique = list(dict.fromkeys(self.diagnostics))  # a node may be looked at twice
        return sorted(unique, key=lambda d: (d.line, d.column))

    # -- sections --------------------------------------------------------------------
    def section(self, section: ast.Section, backend: str | None, chips: list[Chip]) -> None:
        features = {f.name: f for f in OP_FEATURES[section.op]}
        lets: dict[str, Type] = {}
        seen_rule = False
        else_rule: ast.Rule | None = None
        earlier: dict[ast.Expr, ast.Rule] = {}  # condition -> first rule with it
        always: ast.Rule | None = None
        reachable = {chip.id: True for chip in chips}  # has no earlier rule matched always?
        clean_configs: set[tuple] = set()
        for item in section.items:
            if isinstance(item, ast.Let):
                if seen_rule:
                    self.error("let bindings come before the rules of a section", item.pos)
                if item.name in features:
                    self.error(f"let '{item.name}' would hide the feature of that name", item.pos)
                elif item.name in lets:
                    self.error(f"let '{item.name}' is bound twice", item.pos)
                lets[item.name] = self.value_type(item.value, features, lets)
                continue
            seen_rule = True
            if else_rule is not None:
                self.error(f"never reached: this rule comes after the else rule at line "
                           f"{else_rule.pos.line}, which must be last", item.pos)
            if item.is_else:
                else_rule = else_rule or item
                if always is not None and always is not item:
                    self.error(f"never reached: the rule at line {always.pos.line} always matches",
                               item.pos)
            else:
                if self.condition(item, features, lets, earlier, always) and always is None:
                    always = item
                earlier.setdefault(item.condition, item)
            if backend is not None:
                # Constraints are checked for each kind of chip that can reach the rule.
                for_chips = [c for c in chips if reachable[c.id] and self._possible(item, c, features, lets)]
                # A tuned file repeats a few configurations thousands of times: one that
                # checked clean for these chips is clean again (errors are always re-found,
                # so each is reported where it is).
                key = (item.config, tuple(c.id for c in for_chips), len(lets))
                if key not in clean_configs:
                    errors_before = len(self.diagnostics)
                    self.config(item.config, section.op, backend, for_chips, features, lets)
                    if len(self.diagnostics) == errors_before:
                        clean_configs.add(key)
                for c in for_chips:
                    if item.is_else or self._certain(item, c, features, lets):
                        reachable[c.id] = False
        if else_rule is None:
            self.error(f"the {section.op} section needs a final `else {{ ... }}` rule "
                       f"(what runs when no rule matches)",
                       ast.Pos(section.pos.end_line, max(1, section.pos.end_column - 1),
                               section.pos.end_line, section.pos.end_column))

    def _possible(self, rule, chip, features, lets) -> bool:
        if rule.is_else:
            return True
        return partial_truth(rule.condition, frozenset(features) | frozenset(lets), chip) is not False

    def _certain(self, rule, chip, features, lets) -> bool:
        return partial_truth(rule.condition, frozenset(features) | frozenset(lets), chip) is True

    def _constant(self, expr, features, lets):
        try:
            return try_constant(expr, frozenset(features) | frozenset(lets))
        except EvalError as err:
            self.error(err.message, err.pos)
            return False, None

    def condition(self, rule, features, lets, earlier, always) -> bool:
        """Checks a rule's condition; True when it is constantly true."""
        errors_before = len(self.diagnostics)
        t = self.value_type(rule.condition, features, lets)
        if t.kind not in ("bool", "any"):
            self.error(f"a rule's condition must be true/false; this is {_KIND_WORDS[t.kind]}",
                       rule.condition.pos)
        if always is not None:
            self.error(f"never reached: the rule at line {always.pos.line} always matches",
                       rule.pos)
            return False
        prior = earlier.get(rule.condition)  # a dict: one lookup, not a pass over the rules
        if prior is not None and prior is not rule:
            self.error(f"never reached: the rule at line {prior.pos.line} has the same "
                       f"condition", rule.pos)
            return False
        if len(self.diagnostics) > errors_before:
            return False  # evaluating it would only repeat what was reported
        known, value = self._constant(rule.condition, features, lets)
        if known and value is False:
            self.error("never matches: the condition is always false", rule.condition.pos)
        return known and value is True

    # -- configurations --------------------------------------------------------------
    def config(self, spec: ast.ConfigSpec, op: str, backend: str, chips: list[Chip],
               features, lets) -> None:
        fam = family(op, backend, spec.family)
        if fam is None:
            names = [f.name for f in families_for(op, backend)]
            expected = ("one of " + ", ".join(names)) if names else "none exist yet"
            self.error(f"unknown {op} family '{spec.family}' for the {backend} backend; "
                       f"expected {expected}" + self._suggest(spec.family, names),
                       ast.Pos(spec.pos.line, spec.pos.column, spec.pos.line,
                               spec.pos.column + len(spec.family)))
            return
        given: dict[str, ast.Param] = {}
        constants: dict[str, object] = {}
        for param in spec.params:
            schema = fam.param(param.name)
            if schema is None:
                self.error(f"{fam.name} has no parameter '{param.name}'; it takes "
                           + ", ".join(fam.param_names) + self._suggest(param.name, fam.param_names),
                           param.pos)
                continue
            if param.name in given:
                self.error(f"parameter '{param.name}' is given twice", param.pos)
                continue
            given[param.name] = param
            errors_before = len(self.diagnostics)
            if self.param_value(param, schema, features, lets) and len(self.diagnostics) == errors_before:
                known, value = self._constant(param.value, features, lets)
                if known:
                    value = _as_param_value(value, schema)
                    if value is None or not schema.contains(value):
                        self.error(f"{param.name}={_show(value)} is not "
                                   f"{schema.domain_text()}", param.value.pos)
                    else:
                        constants[param.name] = value
        missing = [n for n in fam.param_names if n not in given]
        if missing:
            self.error(f"{fam.name} needs " + ", ".join(f"{n}=..." for n in missing), spec.pos)
        else:
            # Constraints whose parameters are all constants (the others read a missing
            # key and are skipped); the rest are checked when the rule is selected.
            for chip in chips:
                for message in fam.violations(constants, chip):
                    self.error(f"{message} (for {chip.name})", spec.pos)

    def param_value(self, param: ast.Param, schema: Param, features, lets) -> bool:
        """Checks the value's type; True when it is well typed."""
        expr = param.value
        if schema.kind == "choice":
            return self.choice_value(expr, schema, features, lets)
        t = self.value_type(expr, features, lets)
        if t.kind == "any":
            return False
        if schema.kind == "bool" and t.kind != "bool":
            self.error(f"{param.name} takes yes or no; this is {_KIND_WORDS[t.kind]}", expr.pos)
            return False
        if schema.kind == "int" and not t.numeric:
            self.error(f"{param.name} takes an integer; this is {_KIND_WORDS[t.kind]}", expr.pos)
            return False
        if schema.kind == "int" and t.kind == "float" and not self._constant(expr, features, lets)[0]:
            # a constant such as 64.0 is checked against the domain; a computed number is
            # fractional for some calls, and selection would then fail
            self.error(f"{param.name} takes an integer; this is a number for some calls "
                       f"(use // or cdiv for integer division)", expr.pos)
            return False
        return True

    def choice_value(self, expr, schema: Param, features, lets) -> bool:
        if isinstance(expr, ast.Cond):
            test = self.value_type(expr.test, features, lets)
            if test.kind not in ("bool", "any"):
                self.error(f"the test of 'if' must be true/false; this is {_KIND_WORDS[test.kind]}",
                           expr.test.pos)
            a = self.choice_value(expr.then, schema, features, lets)
            b = self.choice_value(expr.otherwise, schema, features, lets)
            return a and b
        if isinstance(expr, ast.Name) and expr.name not in features and expr.name not in lets:
            if expr.name not in schema.choices:
                self.error(f"'{expr.name}' is not a value of {schema.name}; expected one of "
                           + ", ".join(schema.choices) + self._suggest(expr.name, schema.choices),
                           expr.pos)
                return False
            return True
        t = self.value_type(expr, features, lets)
        if t.kind == "symbol" and t.symbols is not None and set(t.symbols) <= set(schema.choices):
            return True
        if t.kind != "any":
            self.error(f"{schema.name} takes one of {', '.join(schema.choices)}; this is "
                       f"{_KIND_WORDS[t.kind]}", expr.pos)
        return False

    # -- expressions -----------------------------------------------------------------
    def value_type(self, expr: ast.Expr, features, lets) -> Type:
        t = self.infer(expr, features, lets)
        return self.resolved(t, expr, features, lets)

    def resolved(self, t: Type, expr, features, lets) -> Type:
        """A bare unknown name is only acceptable where a symbol is compared."""
        if t.literal is not None:
            candidates = list(features) + list(lets) + [f"chip.{f}" for f in FACT_NAMES]
            self.error(f"unknown name '{t.literal}'; expected a feature ("
                       + ", ".join(features) + ")" + (", a let" if lets else "")
                       + " or chip.<fact>" + self._suggest(t.literal, candidates), expr.pos)
            return ANY
        return t

    def infer(self, expr: ast.Expr, features, lets) -> Type:
        if isinstance(expr, ast.Num):
            return INT if isinstance(expr.value, int) else FLOAT
        if isinstance(expr, ast.Bool):
            return BOOL
        if isinstance(expr, ast.Name):
            if expr.name in features:
                return _feature_type(features[expr.name])
            if expr.name in lets:
                return lets[expr.name]
            return Type("symbol", literal=expr.name)
        if isinstance(expr, ast.Attr):
            if expr.obj != "chip":
                self.error(f"unknown object '{expr.obj}'; only chip.<fact> can be read", expr.pos)
                return ANY
            if expr.name not in FACT_NAMES:
                self.error(f"unknown chip fact '{expr.name}'; expected one of "
                           + ", ".join(FACT_NAMES) + self._suggest(expr.name, FACT_NAMES), expr.pos)
                return ANY
            return INT if expr.name in INTEGER_FACTS else FLOAT
        if isinstance(expr, ast.Unary):
            t = self.value_type(expr.operand, features, lets)
            if expr.op == "not":
                return BOOL if self.expect(t, "bool", "'not'", expr.operand) else ANY
            return t if self.expect(t, "num", "'-'", expr.operand) else ANY
        if isinstance(expr, ast.Binary):
            a = self.value_type(expr.left, features, lets)
            b = self.value_type(expr.right, features, lets)
            if expr.op in ("and", "or"):
                ok = self.expect(a, "bool", f"'{expr.op}'", expr.left)
                ok = self.expect(b, "bool", f"'{expr.op}'", expr.right) and ok
                return BOOL if ok else ANY
            ok = self.expect(a, "num", f"'{expr.op}'", expr.left)
            ok = self.expect(b, "num", f"'{expr.op}'", expr.right) and ok
            if not ok:
                return ANY
            if expr.op in ("<<", ">>"):
                if a.kind == "float" or b.kind == "float":
                    self.error(f"'{expr.op}' needs integers", expr.pos)
                return INT
            if expr.op == "/":
                return FLOAT
            return INT if a.kind == "int" and b.kind == "int" else FLOAT
        if isinstance(expr, ast.Compare):
            return self.comparison(expr.op, expr.left, expr.right, expr.pos, features, lets)
        if isinstance(expr, ast.InSet):
            ok = True
            for item in expr.items:
                ok = self.comparison("==", expr.value, item, item.pos, features, lets,
                                     report_left=(item is expr.items[0])).kind == "bool" and ok
            return BOOL if ok else ANY
        if isinstance(expr, ast.Call):
            fn = FUNCTIONS.get(expr.func)
            if fn is None:
                self.error(f"unknown function '{expr.func}'; expected one of "
                           + ", ".join(FUNCTIONS) + self._suggest(expr.func, FUNCTIONS), expr.pos)
                return ANY
            n = len(expr.args)
            if n < fn.min_args or (fn.max_args is not None and n > fn.max_args):
                want = fn.min_args if fn.min_args == fn.max_args else f"at least {fn.min_args}"
                self.error(f"{fn.name} takes {want} argument{'s' if want != 1 else ''}, got {n}",
                           expr.pos)
                return ANY
            types = [self.value_type(a, features, lets) for a in expr.args]
            if not all([self.expect(t, "num", fn.name, a) for t, a in zip(types, expr.args)]):
                return ANY
            if fn.name == "cdiv" and any(t.kind != "int" for t in types):
                for t, a in zip(types, expr.args):
                    if t.kind != "int":
                        self.error(f"cdiv needs integers; {format_expr(a)} is {_KIND_WORDS[t.kind]}",
                                   a.pos)
                return ANY
            if fn.name in ("pow2ceil", "pow2floor", "log2", "cdiv"):
                return INT
            return INT if all(t.kind == "int" for t in types) else FLOAT
        if isinstance(expr, ast.Cond):
            test = self.value_type(expr.test, features, lets)
            self.expect(test, "bool", "the test of 'if'", expr.test)
            a = self.value_type(expr.then, features, lets)
            b = self.value_type(expr.otherwise, features, lets)
            if "any" in (a.kind, b.kind):
                return ANY
            if a.numeric and b.numeric:
                return INT if a.kind == b.kind == "int" else FLOAT
            if a.kind != b.kind:
                self.error(f"both branches of 'if' must have one type; found "
                           f"{_KIND_WORDS[a.kind]} and {_KIND_WORDS[b.kind]}", expr.pos)
                return ANY
            if a.kind == "symbol":
                return Type("symbol", tuple(dict.fromkeys((a.symbols or ()) + (b.symbols or ()))))
            return a
        return ANY

    def comparison(self, op, left, right, pos, features, lets, report_left=True) -> Type:
        if op in ("==", "!=") and (_contextual(left, right, features) or _contextual(right, left, features)):
            return BOOL  # `mask == causal`: the symbol causal, as selection reads it
        a = self.infer(left, features, lets)
        b = self.infer(right, features, lets)
        if op in ("==", "!=") and (a.kind == "symbol" or b.kind == "symbol"):
            if a.literal is not None and b.literal is not None:
                self.resolved(a, left, features, lets)
                return ANY
            if a.literal is None and b.literal is None:  # no bare name: both sides typed
                if a.kind == b.kind:
                    return BOOL
                return ANY if "any" in (a.kind, b.kind) else self._mismatch(a, b, left, right, pos)
            literal, other, node = (a, b, left) if a.literal is not None else (b, a, right)
            other_node = right if node is left else left
            if other.kind != "symbol" or other.symbols is None:
                if other.kind == "any":
                    return ANY
                if literal is a and not report_left:
                    return ANY
                self.resolved(literal, node, features, lets)
                return ANY
            if literal.literal not in other.symbols:
                owner = f"of {other_node.name}" if isinstance(other_node, ast.Name) else "here"
                self.error(f"'{literal.literal}' is not a value {owner}; expected one of "
                           + ", ".join(sorted(other.symbols))
                           + self._suggest(literal.literal, other.symbols), node.pos)
                return ANY
            return BOOL
        a = self.resolved(a, left, features, lets) if report_left else (ANY if a.literal else a)
        b = self.resolved(b, right, features, lets)
        if "any" in (a.kind, b.kind):
            return ANY
        if op in ("==", "!="):
            if (a.numeric and b.numeric) or a.kind == b.kind:
                return BOOL
            return self._mismatch(a, b, left, right, pos)
        ok = self.expect(a, "num", f"'{op}'", left)
        ok = self.expect(b, "num", f"'{op}'", right) and ok
        return BOOL if ok else ANY

    def _mismatch(self, a: Type, b: Type, left, right, pos) -> Type:
        self.error(f"cannot compare {_KIND_WORDS[a.kind]} with {_KIND_WORDS[b.kind]}: "
                   f"{_short(left)} is {_describe(a)}; {_short(right)} is {_describe(b)}", pos)
        return ANY

    def expect(self, t: Type, want: str, what: str, node) -> bool:
        if t.kind == "any":
            return False
        if want == "num" and t.numeric:
            return True
        if want == t.kind:
            return True
        wanted = "numbers" if want == "num" else "true/false"
        self.error(f"{what} needs {wanted}; this is {_KIND_WORDS[t.kind]}", node.pos)
        return False


def _contextual(feature_node, other, features) -> bool:
    """`other` is a name among the values of the symbol feature `feature_node` (selection
    reads it as that symbol: evaluate.contextual_symbols)."""
    if not (isinstance(feature_node, ast.Name) and isinstance(other, ast.Name)):
        return False
    f = features.get(feature_node.name)
    return f is not None and f.type == "symbol" and other.name in f.symbols


def _describe(t: Type) -> str:
    if t.kind == "symbol" and t.symbols:
        return f"a symbol ({', '.join(t.symbols)})"
    return _KIND_WORDS[t.kind]


def _short(expr) -> str:
    text = format_expr(expr)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_param_value(value, schema: Param):
    """A constant as the parameter's type: integral floats become ints."""
    if schema.kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return value


def _show(value) -> str:
    if value is None:
        return "(not an integer)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def check(program: ast.Program, text: str, path: str = "<string>",
          chip: Chip | None = None) -> list[Diagnostic]:
    """All diagnostics for a parsed program. With a chip, constraints are checked with its
    facts; otherwise for each kind of chip the file's `chips` line covers, on the rules
    that kind of chip can reach."""
    with paused_gc():  # linear in the program's size (see fastparse.paused_gc)
        return _Checker(program, text, path, chip).run()

