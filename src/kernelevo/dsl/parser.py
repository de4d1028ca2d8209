"""Parsing .kevo text into the AST, with errors that name line, column and expectation."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import NamedTuple
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from . import ast, fastparse
from .errors import Diagnostic, DSLError, source_line

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def grammar_path() -> Path:
    """The grammar shipped in the package (or, in a source checkout, grammar/ at the root)."""
    for candidate in (_PACKAGE_DIR / "grammar" / "kernelevo.lark",
                      _PACKAGE_DIR.parent.parent / "grammar" / "kernelevo.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("kernelevo.lark is missing from the installation")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr",
                start=["start", "config_line", "expression"], propagate_positions=True,
                maybe_placeholders=False)


# Example errors whose parser state identifies a mistake people make (Lark's
# match_examples): the label is added to the message as a hint.
_HINTS: dict[str, list[str]] = {
    "comparisons cannot be chained; join them with 'and' (a < b and b < c)": [
        "kevo 1 matmul { when 1 < 2 < 3", "kevo 1 matmul { when 1 == 2 != 3",
        "kevo 1 matmul { else { g a = 1 < 2 < 3",
    ],
    "parameters are written name=value": [
        "kevo 1 matmul { else { gemm mc 1", "kevo 1 matmul { else { gemm mc }",
        "kevo 1 matmul { when 1 { gemm mc 2",
    ],
    "a rule reads `when <condition> { <family> name=value ... }`": [
        "kevo 1 matmul { when 1 gemm", "kevo 1 matmul { when M > 1 gemm",
    ],
    "rules and lets go inside a section: `matmul { ... }` or `attention { ... }`": [
        "kevo 1 when", "kevo 1 else", "kevo 1 let", "kevo 1 target cpu when",
    ],
    "the header starts with the DSL version: `kevo 1`": ["matmul", "target", "chips", "when"],
}

_FRIENDLY = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "$END": "end of file",
    "CHIP": "a chip id or glob (such as apple-m3*)", "SECTION": "'matmul' or 'attention'",
}
_EXPRESSION_STARTS = {"INT", "FLOAT", "NAME", "LPAR", "MINUS"}


def _describe_terminal(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    return f"'{pattern.value}'" if isinstance(pattern, PatternStr) else name.lower()


def _describe_expected(expected: set[str]) -> str:
    expected = set(expected)
    parts = []
    if _EXPRESSION_STARTS <= expected:
        expected -= _EXPRESSION_STARTS
        parts.append("an expression")
    words = sorted(_describe_terminal(t) for t in expected)
    operators = [w for w in words if w.startswith("'") and not w[1:-1].isalpha()
                 and w not in ("'{'", "'}'", "'('", "')'", "'='", "','", "'.'")]
    if len(operators) > 3:
        words = [w for w in words if w not in operators] + ["an operator"]
    parts += words
    if not parts:
        return "nothing more"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _describe_found(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "NAME":
        return f"name '{token.value}'"
    if token.type in ("INT", "FLOAT"):
        return f"number {token.value}"
    return f"'{token.value}'"


def _syntax_error(err: UnexpectedInput, text: str, path: str, start: str) -> DSLError:
    hint = ""
    if start == "start":
        try:
            hint = err.match_examples(lambda t: _lark().parse(t, start="start"), _HINTS,
                                      use_accepts=True) or ""
        except Exception:  # noqa: BLE001 — a hint is a courtesy; never mask the real error
            hint = ""
    if isinstance(err, UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        message = f"unexpected character {char!r}"
        if err.allowed:
            message += f"; expected {_describe_expected(err.allowed)}"
        line, column = err.line, err.column
    elif isinstance(err, UnexpectedToken):
        found = _describe_found(err.token)
        message = f"unexpected {found}; expected {_describe_expected(err.accepts or err.expected)}"
        if err.token.type == "$END":
            lines = text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        else:
            line, column = err.line, err.column
    elif isinstance(err, UnexpectedEOF):
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
        message = f"unexpected end of file; expected {_describe_expected(set(err.expected))}"
    else:  # pragma: no cover - Lark has no other kinds
        line, column, message = 1, 1, str(err)
    if hint:
        message += f" ({hint})"
    line, column = max(1, line), max(1, column)
    return DSLError(Diagnostic(message, line, column, path=path,
                               source_line=source_line(text, line)))


def _pos(meta) -> ast.Pos:
    if getattr(meta, "empty", True):
        return ast.NOWHERE
    return ast.Pos(meta.line, meta.column, meta.end_line, meta.end_column)


def _tpos(token: Token) -> ast.Pos:
    return ast.Pos(token.line, token.column, token.end_line, token.end_column)


_BOOLEANS = {"yes": True, "true": True, "no": False, "false": False}


@v_args(meta=True)
class _Build(Transformer):
    """Lark tree -> AST dataclasses."""

    def start(self, meta, children):
        header, sections = children[0], tuple(children[1:])
        version, target, chips, target_pos = header
        return ast.Program(version, target, chips, sections, pos=_pos(meta), target_pos=target_pos)

    def header(self, meta, children):
        text = children[0].value
        version = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        target, chips, target_pos = None, (), ast.NOWHERE
        for child in children[1:]:
            if child[0] == "target":
                target, target_pos = child[1], child[2]
            else:
                chips = child[1]
        return version, target, chips, target_pos

    def target(self, meta, children):
        return ("target", children[0].value, _tpos(children[0]))

    def chips(self, meta, children):
        return ("chips", tuple(t.value for t in children))

    def section(self, meta, children):
        return ast.Section(children[0].value, tuple(children[1:]), pos=_pos(meta))

    def let(self, meta, children):
        return ast.Let(children[0].value, children[1], pos=_pos(meta))

    def rule(self, meta, children):
        return ast.Rule(children[0], children[1], pos=_pos(meta))

    def else_rule(self, meta, children):
        return ast.Rule(None, children[0], pos=_pos(meta))

    def config(self, meta, children):
        return ast.ConfigSpec(children[0].value, tuple(children[1:]), pos=_pos(meta))

    def config_line(self, meta, children):
        return children[0]

    def expression(self, meta, children):
        return children[0]

    def param(self, meta, children):
        return ast.Param(children[0].value, children[1], pos=_pos(meta))

    def conditional(self, meta, children):
        return ast.Cond(children[0], children[1], children[2], pos=_pos(meta))

    def or_(self, meta, children):
        return ast.Binary("or", children[0], children[1], pos=_pos(meta))

    def and_(self, meta, children):
        return ast.Binary("and", children[0], children[1], pos=_pos(meta))

    def not_(self, meta, children):
        return ast.Unary("not", children[0], pos=_pos(meta))

    def neg(self, meta, children):
        return ast.Unary("-", children[0], pos=_pos(meta))

    def compare(self, meta, children):
        return ast.Compare(children[1], children[0], children[2], pos=_pos(meta))

    def binary(self, meta, children):
        return ast.Binary(children[1], children[0], children[2], pos=_pos(meta))

    def _op(self, meta, children):
        return children[0].value

    compare_op = shift_op = add_op = mul_op = _op

    def in_set(self, meta, children):
        return ast.InSet(children[0], children[1], False, pos=_pos(meta))

    def not_in_set(self, meta, children):
        return ast.InSet(children[0], children[1], True, pos=_pos(meta))

    def set(self, meta, children):
        return tuple(children)

    def int_(self, meta, children):
        text = children[0].value
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)  # 007 is 7
        return ast.Num(value, pos=_pos(meta))

    def float_(self, meta, children):
        return ast.Num(float(children[0].value), pos=_pos(meta))

    def name(self, meta, children):
        value = children[0].value
        if value in _BOOLEANS:
            return ast.Bool(_BOOLEANS[value], pos=_pos(meta))
        return ast.Name(value, pos=_pos(meta))

    def attribute(self, meta, children):
        return ast.Attr(children[0].value, children[1].value, pos=_pos(meta))

    def call(self, meta, children):
        return ast.Call(children[0].value, tuple(children[1:]), pos=_pos(meta))


MAX_DEPTH = 200  # far beyond any real rule; keeps every recursive pass safe


def _check_depth(tree: Tree, text: str, path: str) -> None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            line = getattr(node.meta, "line", 1) if not getattr(node.meta, "empty", True) else 1
            column = getattr(node.meta, "column", 1) if line != 1 or not node.meta.empty else 1
            raise DSLError(Diagnostic(f"expression nested too deeply (more than {MAX_DEPTH} levels)",
                                      line, column, path=path, source_line=source_line(text, line)))
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


def _build(tree: Tree, text: str, path: str):
    _check_depth(tree, text, path)
    try:
        return _Build().transform(tree)
    except VisitError as err:
        meta = getattr(err.obj, "meta", None)
        line = meta.line if meta is not None and not meta.empty else 1
        column = meta.column if meta is not None and not meta.empty else 1
        reason = ("expression nested too deeply" if isinstance(err.orig_exc, RecursionError)
                  else f"cannot read this: {err.orig_exc}")
        raise DSLError(Diagnostic(reason, line, column, path=path,
                                  source_line=source_line(text, line))) from None
    except RecursionError:
        raise DSLError(Diagnostic("expression nested too deeply", 1, 1, path=path,
                                  source_line=source_line(text, 1))) from None


class _Comment(NamedTuple):
    line: int
    column: int
    value: str


def _comments(text: str) -> list[_Comment]:
    # '#' appears in no other token, so every '#' starts a comment that runs to the line end.
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        index = line.find("#")
        if index >= 0:
            found.append(_Comment(number, index + 1, line[index:].rstrip()))
    return found


def _parse_tree(text: str, path: str, start: str) -> Tree:
    try:
        return _lark().parse(text, start=start)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, path, start) from None
    except RecursionError:
        raise DSLError(Diagnostic("input nested too deeply", 1, 1, path=path,
                                  source_line=source_line(text, 1))) from None


def parse(text: str, path: str | Path = "<string>") -> ast.Program:
    """Parses a whole .kevo program (syntax only: `check` validates its meaning)."""
    path = str(path)
    try:
        program = fastparse.parse_program(text)  # well-formed files, in linear time
    except fastparse.Fallback:  # anything else: Lark's parser and its messages decide
        program = _build(_parse_tree(text, path, "start"), text, path)
    with fastparse.paused_gc():
        return _attach_comments(program, _comments(text), text)


def parse_config(text: str) -> tuple[str, dict]:
    """Parses `family name=value ...` where every value is a constant."""
    from .evaluate import constant_value

    spec: ast.ConfigSpec = _build(_parse_tree(text, "<config>", "config_line"), text, "<config>")
    params = {}
    for p in spec.params:
        if p.name in params:
            raise DSLError(Diagnostic(f"parameter '{p.name}' given twice", p.pos.line,
                                      p.pos.column, path="<config>",
                                      source_line=source_line(text, p.pos.line)))
        params[p.name] = constant_value(p.value, text, "<config>")
    return spec.family, params


def parse_expression(text: str, path: str = "<expression>") -> ast.Expr:
    """Parses one expression (syntax only)."""
    try:
        return fastparse.parse_expression(text)
    except fastparse.Fallback:
        return _build(_parse_tree(text, path, "expression"), text, path)


# -- comments ----------------------------------------------------------------------------


def _attach_comments(program: ast.Program, tokens: list[_Comment], text: str) -> ast.Program:
    pending = sorted(tokens, key=lambda t: (t.line, t.column))
    lines = text.splitlines()
    next_index = 0  # pending[next_index:] are not attached yet (no pop(0): linear time)

    def before(line: int) -> tuple[str, ...]:
        nonlocal next_index
        start = next_index
        while next_index < len(pending) and pending[next_index].line < line:
            next_index += 1
        return tuple(t.value for t in pending[start:next_index])

    def on_line(line: int) -> str | None:
        nonlocal next_index
        if next_index < len(pending) and pending[next_index].line == line:
            next_index += 1
            return pending[next_index - 1].value
        return None

    def blank_before(start_line: int, n_comments: int) -> bool:
        index = start_line - 2 - n_comments  # 0-based index of the line above
        return 0 <= index < len(lines) and not lines[index].strip()

    def comments_for(pos: ast.Pos) -> ast.Comments:
        lead = before(pos.line)
        inner = before(pos.end_line)  # comments inside a multi-line item move above it
        after = on_line(pos.end_line)
        return ast.Comments(lead + inner, after, blank_before(pos.line, len(lead)))

    header = ast.Comments(before(program.pos.line or 1))
    sections = []
    for section in program.sections:
        lead = before(section.pos.line)
        opening = on_line(section.pos.line)
        items = []
        for item in section.items:
            found = comments_for(item.pos)
            # most items of a tuned file have none: keep the item (no copy)
            items.append(item if found == item.comments and not found.blank_line_before
                         else dataclasses.replace(item, comments=found))
        trailing = before(section.pos.end_line)
        closing = on_line(section.pos.end_line)
        if closing:
            trailing += (closing,)
        sections.append(dataclasses.replace(
            section, items=tuple(items), trailing=trailing,
            comments=ast.Comments(lead, opening, blank_before(section.pos.line, len(lead)))))
    rest = tuple(t.value for t in pending[next_index:])
    return dataclasses.replace(program, sections=tuple(sections), comments=header, trailing=rest)
