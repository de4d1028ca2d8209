"""The offline proposer: structural mutation and crossover of a program's syntax tree.

Each operator edits the AST and the result is formatted and checked; only programs that
pass the checker leave this module (an operator that produces an invalid one is retried
with other choices). The operators:

- specialise: a new rule before the one that serves a training shape, for a range around
  that shape (`dtype == bf16 and M <= 32 and N * K >= 1 << 22`), with a configuration
  measured well on it — the `split a rule's range` move;
- retune: another configuration for a rule (one measured on a shape it serves, or, live, a
  parameter moved to a neighbouring value of its search list);
- threshold: a cut in a rule's condition moved to the neighbouring cut between the training
  shapes' values;
- drop / merge: a rule removed, or two neighbouring rules with the same configuration
  joined with `or`;
- reorder: two neighbouring rules swapped;
- let: a conjunct repeated in several conditions bound to a `let`;
- borrow (crossover): a rule taken from another program.

Every configuration a new or retuned rule gets is guarded by what remains of its family's
constraints on the call (tune/distill.py), so a mutation does not make a rule select a
kernel for a call it cannot run.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..chips import Chip
from ..config import KernelConfig
from ..dsl import ast, format_program
from ..dsl.errors import DSLError
from ..dsl.evaluate import residual
from ..dsl.select import CompiledProgram
from ..families import MLX_BUILTIN
from ..tune import distill
from ..tune.workloads import Shape
from .fitness import Rejected, compile_program

OPERATORS: dict[str, float] = {"specialise": 0.3, "retune": 0.2, "threshold": 0.15, "drop": 0.08,
                               "merge": 0.04, "reorder": 0.05, "let": 0.03, "borrow": 0.15}


@dataclass
class Vocabulary:
    """Configurations worth trying: per op, each with the training shapes it was measured
    on and its ratio there (lower is faster)."""

    measured: dict[str, dict[str, dict[str, float]]]  # op -> config -> shape key -> ratio

    def on(self, op: str, shape_key: str) -> list[tuple[str, float]]:
        return sorted((c, r[shape_key]) for c, r in self.measured.get(op, {}).items() if shape_key in r)


def vocabulary_from(db_rows: Sequence, shapes: Sequence[Shape]) -> Vocabulary:
    """From measurements (tune/db.py rows): every usable pair on these shapes."""
    keys = {s.key: s.op for s in shapes}
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in db_rows:
        if r.shape_key in keys and r.usable and r.config != r.baseline_config and r.config != MLX_BUILTIN:
            out[keys[r.shape_key]][r.config][r.shape_key] = r.ratio
    return Vocabulary({op: dict(v) for op, v in out.items()})


def _all(terms: Sequence[ast.Expr]) -> ast.Expr | None:
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    expr = terms[0]
    for t in terms[1:]:
        expr = ast.Binary("and", expr, t)
    return expr


def _conjuncts(expr: ast.Expr | None) -> list[ast.Expr]:
    if expr is None:
        return []
    if isinstance(expr, ast.Binary) and expr.op == "and":
        return _conjuncts(expr.left) + _conjuncts(expr.right)
    return [expr]


class Mutator:
    def __init__(self, backend: str, chip: Chip, train: Sequence[Shape], vocabulary: Vocabulary,
                 rng: random.Random, live: bool = False):
        self.backend = backend
        self.chip = chip
        self.train = list(train)
        self.vocab = vocabulary
        self.rng = rng
        self.live = live
        self.ops = sorted({s.op for s in self.train})
        self._cuts = {op: self._cut_points(op) for op in self.ops}

    def _cut_points(self, op: str) -> dict[str, list[int]]:
        """For each split expression, the thresholds between the training shapes' values."""
        out = {}
        for text in distill.SPLITS[op]:
            split = distill.Split(text)
            values = sorted({split.value(s.features()) for s in self.train if s.op == op})
            out[text] = sorted({distill._cut(a, b) for a, b in zip(values, values[1:])})
        return out

    # -- the whole move ----------------------------------------------------------------
    def propose(self, parent: CompiledProgram, donor: CompiledProgram | None = None,
                attempts: int = 30) -> tuple[str, str] | None:
        """(program text, what was done), checked; None if no operator produced one."""
        names = list(OPERATORS)
        weights = [OPERATORS[n] for n in names]
        for _ in range(attempts):
            name = self.rng.choices(names, weights)[0]
            if name == "borrow" and donor is None:
                continue
            op = self.rng.choice(self.ops)
            edited = getattr(self, f"_{name}")(parent, op, donor)
            if edited is None:
                continue
            tree, what = edited
            text = format_program(tree)
            if text == parent.text:
                continue
            try:
                compile_program(text, self.chip, self.backend, self.ops)
            except Rejected:
                continue
            return text, f"{name}: {what}"
        return None

    # -- helpers -----------------------------------------------------------------------
    def _section(self, program: CompiledProgram, op: str) -> ast.Section:
        return program.program.section(op)

    @staticmethod
    def _with_items(program: CompiledProgram, op: str, items: Sequence[ast.Item]) -> ast.Program:
        sections = tuple(replace(s, items=tuple(items)) if s.op == op else s
                         for s in program.program.sections)
        return replace(program.program, sections=sections)

    def _served(self, program: CompiledProgram, op: str) -> dict[int, list[Shape]]:
        """Rule number -> the training shapes it selects for (a shape whose chosen
        configuration cannot serve it is served by no rule: an unscored parent may do that)."""
        out: dict[int, list[Shape]] = defaultdict(list)
        for s in self.train:
            if s.op == op:
                try:
                    out[program.select(op, s.features()).rule_number].append(s)
                except DSLError:
                    continue
        return out

    @staticmethod
    def _rule_positions(section: ast.Section) -> list[int]:
        """Indices in section.items of its rules, in order."""
        return [i for i, item in enumerate(section.items) if isinstance(item, ast.Rule)]

    def _guarded(self, config: KernelConfig, terms: list[ast.Expr], known: Mapping) -> ast.Expr | None:
        """The terms and what the configuration's constraints on the call leave of them."""
        guards = []
        for c in config.schema.call_constraints():
            remains = residual(c.ast, config.as_dict(), self.chip, known)
            if remains is False:
                return None
            if remains is not True and remains not in terms and remains not in guards:
                guards.append(remains)
        return _all(terms + guards)

    def _pick_config(self, op: str, shape: Shape, current: str | None = None) -> KernelConfig | None:
        measured = [(c, r) for c, r in self.vocab.on(op, shape.key) if c != current]
        if self.live and (not measured or self.rng.random() < 0.3):
            base = current or (measured[0][0] if measured else None)
            if base is not None:
                neighbour = self._neighbour(KernelConfig.parse(base, op, self.backend), shape)
                if neighbour is not None:
                    return neighbour
        if not measured:
            return None
        best = sorted(measured, key=lambda cr: cr[1])[:6]  # the fastest few on this shape
        return KernelConfig.parse(self.rng.choice(best)[0], op, self.backend)

    def _neighbour(self, config: KernelConfig, shape: Shape) -> KernelConfig | None:
        """One parameter moved to a neighbouring value of its search list, still valid."""
        fam, params = config.schema, config.as_dict()
        if not fam.params:  # a family with nothing to tune (`mlx`: MLX's own op)
            return None
        for _ in range(10):
            p = self.rng.choice(fam.params)
            values = [v for v in p.search_values(self.chip) if p.contains(v)]
            if len(values) < 2:
                continue
            i = values.index(params[p.name]) if params[p.name] in values else 0
            j = max(0, min(len(values) - 1, i + self.rng.choice((-1, 1))))
            child = KernelConfig.make(config.op, config.backend, config.family, {**params, p.name: values[j]})
            if child != config and not fam.violations(child.as_dict(), self.chip, shape.features()):
                return child
        return None

    def _region_terms(self, op: str, shape: Shape) -> tuple[list[ast.Expr], dict]:
        """A condition for a range around a training shape: its dtype (and transpose), and
        one or two cuts between the training values on either side of it."""
        f = shape.features()
        terms: list[ast.Expr] = [ast.Compare("==", ast.Name("dtype"), ast.Name(f["dtype"]))]
        known = {"dtype": f["dtype"]}
        if op == "matmul":
            terms.append(ast.Name("transpose_b") if f["transpose_b"] else ast.Unary("not", ast.Name("transpose_b")))
            known["transpose_b"] = f["transpose_b"]
        splits = [t for t, cuts in self._cuts[op].items() if cuts]
        for text in self.rng.sample(splits, min(len(splits), self.rng.choice((1, 1, 2)))):
            split = distill.Split(text)
            value = split.value(f)
            cuts = self._cuts[op][text]
            above = [c for c in cuts if c >= value]
            below = [c for c in cuts if c < value]
            if above and (not below or self.rng.random() < 0.5):
                terms.append(distill.Step(split, False, above[0]).term())
            elif below:
                terms.append(distill.Step(split, True, below[-1]).term())
        return terms, known

    # -- operators ---------------------------------------------------------------------
    def _served_choice(self, program, op):
        """A rule that serves training shapes, one of those shapes, and another configuration
        worth trying on it: (section, rule number, rule, shape, config) or None."""
        section = self._section(program, op)
        served = self._served(program, op)
        if not served:
            return None
        number = self.rng.choice(sorted(served))
        shape = self.rng.choice(served[number])
        current = program.select(op, shape.features()).config.to_dsl()
        config = self._pick_config(op, shape, current)
        if config is None:
            return None
        return section, number, section.rules[number - 1], shape, config

    def _specialise(self, program, op, donor, chosen=None):
        chosen = chosen or self._served_choice(program, op)
        if chosen is None:
            return None
        section, number, rule, shape, config = chosen
        terms, known = self._region_terms(op, shape)
        condition = self._guarded(config, terms, known)
        if condition is None:
            return None
        items = list(section.items)
        items.insert(_index(items, rule), ast.Rule(condition, distill.config_spec(config)))
        return self._with_items(program, op, items), f"rule {number} specialised for a range around {shape}"

    def _retune(self, program, op, donor):
        chosen = self._served_choice(program, op)
        if chosen is None:
            return None
        section, number, rule, shape, config = chosen
        if rule.is_else:  # the else must serve everything: keep it, add the choice before it
            return self._specialise(program, op, donor, chosen)
        condition = self._guarded(config, _conjuncts(rule.condition), {})
        if condition is None:
            return None
        items = list(section.items)
        items[_index(items, rule)] = ast.Rule(condition, distill.config_spec(config), rule.comments)
        return self._with_items(program, op, items), f"rule {number} retuned to {config.to_dsl()}"

    def _threshold(self, program, op, donor):
        section = self._section(program, op)
        candidates = []
        for number, rule in enumerate(section.rules, 1):
            for i, term in enumerate(_conjuncts(rule.condition)):
                if isinstance(term, ast.Compare) and term.op in ("<=", ">", ">=", "<"):
                    text = _split_text(term.left)
                    if text in self._cuts[op] and self._cuts[op][text]:
                        candidates.append((number, rule, i, term, text))
        if not candidates:
            return None
        number, rule, i, term, text = self.rng.choice(candidates)
        cuts = self._cuts[op][text]
        value = _number_value(term.right)
        if value is None:
            return None
        pos = min(range(len(cuts)), key=lambda k: abs(cuts[k] - value))
        new_pos = max(0, min(len(cuts) - 1, pos + self.rng.choice((-1, 1))))
        if cuts[new_pos] == value:
            return None
        op_ = "<=" if term.op in ("<=", "<") else ">"
        step = distill.Step(distill.Split(text), op_ == ">", cuts[new_pos])
        conj = _conjuncts(rule.condition)
        conj[i] = step.term()
        items = list(section.items)
        items[_index(items, rule)] = ast.Rule(_all(conj), rule.config, rule.comments)
        return self._with_items(program, op, items), f"rule {number}: {text} cut moved to {cuts[new_pos]}"

    def _drop(self, program, op, donor):
        section = self._section(program, op)
        rules = [r for r in section.rules if not r.is_else]
        if not rules:
            return None
        victim = self.rng.choice(rules)
        items = [i for i in section.items if i is not victim]
        return self._with_items(program, op, items), f"rule {section.rules.index(victim) + 1} dropped"

    def _merge(self, program, op, donor):
        section = self._section(program, op)
        rules = section.rules
        pairs = [(a, b) for a, b in zip(rules, rules[1:]) if not a.is_else and not b.is_else
                 and a.config == b.config]
        if not pairs:
            return None
        a, b = self.rng.choice(pairs)
        merged = ast.Rule(ast.Binary("or", a.condition, b.condition), a.config, a.comments)
        items = [merged if i is a else i for i in section.items if i is not b]
        return self._with_items(program, op, items), f"rules {rules.index(a) + 1} and {rules.index(b) + 1} merged"

    def _reorder(self, program, op, donor):
        section = self._section(program, op)
        positions = [i for i in self._rule_positions(section) if not section.items[i].is_else]
        if len(positions) < 2:
            return None
        k = self.rng.randrange(len(positions) - 1)
        i, j = positions[k], positions[k + 1]
        items = list(section.items)
        items[i], items[j] = items[j], items[i]
        return self._with_items(program, op, items), f"rules at {k + 1} and {k + 2} swapped"

    def _let(self, program, op, donor):
        section = self._section(program, op)
        counts: dict[ast.Expr, int] = defaultdict(int)
        for rule in section.rules:
            for term in _conjuncts(rule.condition):
                if isinstance(term, (ast.Compare, ast.Binary, ast.InSet)):
                    counts[term] += 1
        repeated = [t for t, n in counts.items() if n >= 2]
        if not repeated:
            return None
        term = self.rng.choice(repeated)
        taken = {let.name for let in section.lets}
        name = next(f"regime{i}" for i in range(1, 100) if f"regime{i}" not in taken)
        items: list[ast.Item] = [ast.Let(name, term)]
        for item in section.items:
            if isinstance(item, ast.Rule) and not item.is_else:
                conj = [ast.Name(name) if t == term else t for t in _conjuncts(item.condition)]
                item = ast.Rule(_all(conj), item.config, item.comments)
            items.append(item)
        # lets come first in a section: move the new one after any existing lets
        lets = [i for i in items if isinstance(i, ast.Let)]
        rest = [i for i in items if not isinstance(i, ast.Let)]
        return self._with_items(program, op, lets + rest), f"let {name} for a repeated condition"

    def _borrow(self, program, op, donor):
        if donor is None or not donor.has(op):
            return None
        theirs = [r for r in donor.program.section(op).rules if not r.is_else]
        if not theirs:
            return None
        rule = self.rng.choice(theirs)
        section = self._section(program, op)
        positions = self._rule_positions(section)
        at = self.rng.choice(positions)  # before any rule of ours, the else included
        items = list(section.items)
        items.insert(at, ast.Rule(rule.condition, rule.config))
        return self._with_items(program, op, items), "a rule borrowed from another program"


def _split_text(expr: ast.Expr) -> str | None:
    from ..dsl.formatter import format_expr

    try:
        return format_expr(expr)
    except TypeError:
        return None


def _number_value(expr: ast.Expr) -> int | None:
    if isinstance(expr, ast.Num) and isinstance(expr.value, int):
        return expr.value
    if (isinstance(expr, ast.Binary) and expr.op == "<<" and isinstance(expr.left, ast.Num)
            and isinstance(expr.right, ast.Num)):
        return expr.left.value << expr.right.value
    return None


def _index(items: Sequence, item) -> int:
    """Position of this very item (equal rules may appear twice)."""
    return next(i for i, x in enumerate(items) if x is item)
