"""A fast path for parsing well-formed .kevo programs: a hand-written recursive-descent
parser of the same grammar (grammar/kernelevo.lark) that builds the same AST with the same
positions as Lark's LALR parser, about ten times faster.

It only ever accepts: on anything it does not handle exactly as Lark would (a syntax error,
an unusual token, deep nesting, a keyword used as a name), it raises `Fallback` and the
caller parses with Lark, whose result and error messages stay the reference. The grammar
file remains the definition of the language; tests check that both parsers agree.
"""

from __future__ import annotations

import gc
import re
from bisect import bisect_right
from contextlib import contextmanager

from . import ast


class Fallback(Exception):
    """Not handled here: parse with Lark."""


# Terminals in Lark's order of preference (FLOAT has priority 2 over INT); WS and comments
# are skipped; any other character is an ERR token, which no rule accepts.
_TOKEN = re.compile(r"""
    (?P<WS>[ \t\f\r\n]+)
  | (?P<COMMENT>\#[^\n]*)
  | (?P<FLOAT>[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)
  | (?P<INT>0x[0-9A-Fa-f]+|[0-9]+)
  | (?P<NAME>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<OP>==|!=|<=|>=|<<|>>|//|[<>+\-*/%=.,(){}])
  | (?P<ERR>.)
""", re.VERBOSE | re.DOTALL)
# The same terminals, each match being the skipped text and one token (so one match per
# token, not two); the comment must run to the end of its line, so that no backtracking
# can shorten it into a token. The text gets a sentinel "\n\0": the last match is always
# the sentinel, and never a failed search that finditer would retry character by character.
_TOKEN_AFTER_SKIP = re.compile(
    r"(?:[ \t\f\r\n]|#[^\n]*(?![^\n]))*"
    r"(?:(?P<FLOAT>[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)"
    r"|(?P<INT>0x[0-9A-Fa-f]+|[0-9]+)"
    r"|(?P<NAME>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<OP>==|!=|<=|>=|<<|>>|//|[<>+\-*/%=.,(){}])"
    r"|(?P<ERR>[^ \t\f\r\n#]))")
_NEWLINE = re.compile("\n")
_CHIP = re.compile(r"[A-Za-z0-9*?\[][A-Za-z0-9*?\[\]._-]*")
_SECTION = re.compile(r"(matmul|attention)(?![A-Za-z0-9_-])")
_SKIP = re.compile(r"(?:[ \t\f\r\n]+|#[^\n]*)*")

# Names that are keywords somewhere in the grammar: where one appears as a name, Lark's
# contextual lexer may read it either way, so such files go to Lark.
KEYWORDS = frozenset({"kevo", "target", "chips", "let", "when", "else", "if", "and", "or",
                      "not", "in"})
_BOOLEANS = {"yes": True, "true": True, "no": False, "false": False}
_COMPARE = frozenset({"==", "!=", "<=", ">=", "<", ">"})
_PREC = {"<<": 6, ">>": 6, "+": 7, "-": 7, "*": 8, "//": 8, "/": 8, "%": 8}
MAX_DEPTH = 90  # deeper expressions go to Lark (whose tree depth limit is 200)


def _lex(text: str, pos: int, line: int, line_start: int, limit: int | None = None):
    """(kinds, values, lines, columns, offsets) from `pos` (at most `limit` tokens); a
    keyword's kind is itself."""
    kinds, values, lines, cols, offsets = [], [], [], [], []
    for m in _TOKEN.finditer(text, pos):
        if limit is not None and len(kinds) >= limit:
            break
        kind = m.lastgroup
        value = m.group()
        start = m.start()
        if kind == "WS":
            n = value.count("\n")
            if n:
                line += n
                line_start = start + value.rindex("\n") + 1
            continue
        if kind == "COMMENT":
            continue
        if kind == "NAME":
            if value in KEYWORDS:
                kind = value
        elif kind == "OP":
            kind = value
        kinds.append(kind)
        values.append(value)
        lines.append(line)
        cols.append(start - line_start + 1)
        offsets.append(start)
    return kinds, values, lines, cols, offsets


def _lex_all(text: str, pos: int):
    """Like _lex from `pos` to the end, with a few passes of C-level work per token."""
    matches = list(_TOKEN_AFTER_SKIP.finditer(text + "\n\0", pos))
    if not matches or matches[-1].group("ERR") != "\0" or matches[-1].start("ERR") != len(text) + 1:
        raise Fallback
    del matches[-1]
    groups = [m.lastgroup for m in matches]
    values = [m.group(g) for m, g in zip(matches, groups)]
    offsets = [m.start(g) for m, g in zip(matches, groups)]
    kinds = [v if g == "OP" or (g == "NAME" and v in KEYWORDS) else g
             for g, v in zip(groups, values)]
    starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]  # offsets where lines start
    lines = [bisect_right(starts, o) for o in offsets]
    cols = [o - starts[n - 1] + 1 for o, n in zip(offsets, lines)]
    return kinds, values, lines, cols, offsets


class _Parser:
    __slots__ = ("text", "kinds", "values", "lines", "cols", "i", "n", "depth")

    def __init__(self, text: str):
        self.text = text
        self.depth = 0

    def _load(self, pos: int) -> None:
        self.kinds, self.values, self.lines, self.cols, _ = _lex_all(self.text, pos)
        self.kinds.append("$END")
        self.i, self.n = 0, len(self.kinds) - 1

    # -- tokens --------------------------------------------------------------------------
    def _span(self, i: int) -> tuple[int, int, int, int]:
        line, col = self.lines[i], self.cols[i]
        return line, col, line, col + len(self.values[i])

    def _expect(self, kind: str) -> int:
        i = self.i
        if self.kinds[i] != kind:
            raise Fallback
        self.i = i + 1
        return i

    # -- program -------------------------------------------------------------------------
    def program(self) -> ast.Program:
        text = self.text
        # The header, token by token (the chip patterns have their own terminal).
        kinds, values, lines, cols, offsets = _lex(text, 0, 1, 0, limit=5)  # the header's
        k = 0

        def take(kind: str) -> int:
            nonlocal k
            if k >= len(kinds) or kinds[k] != kind:
                raise Fallback
            k += 1
            return k - 1

        kevo = take("kevo")
        num = take("INT")
        version_text = values[num]
        version = int(version_text, 16) if version_text.lower().startswith("0x") else int(version_text, 10)
        end = (lines[num], cols[num] + len(version_text))
        target, target_pos = None, ast.NOWHERE
        if k < len(kinds) and kinds[k] == "target":
            k += 1
            t = take("NAME")
            target = values[t]
            target_pos = ast.Pos(lines[t], cols[t], lines[t], cols[t] + len(values[t]))
            end = (lines[t], cols[t] + len(values[t]))
        chips: tuple[str, ...] = ()
        if k < len(kinds) and kinds[k] == "chips":
            c = k
            pos = offsets[c] + len("chips")
            found = []
            while True:
                pos = _SKIP.match(text, pos).end()
                if pos >= len(text) or _SECTION.match(text, pos):
                    break
                chip = _CHIP.match(text, pos)
                if chip is None:
                    raise Fallback
                found.append((chip.group(), chip.start()))
                pos = chip.end()
            if not found:
                raise Fallback
            chips = tuple(v for v, _ in found)
            last_value, last_offset = found[-1]
            last_line = text.count("\n", 0, last_offset) + 1
            last_col = last_offset - (text.rfind("\n", 0, last_offset) + 1) + 1
            end = (last_line, last_col + len(last_value))
        else:
            pos = offsets[k] if k < len(offsets) else len(text)
        self._load(pos)
        start = (lines[kevo], cols[kevo])
        sections = []
        while self.kinds[self.i] == "NAME":
            sections.append(self.section())
        if self.kinds[self.i] != "$END":
            raise Fallback
        if sections:
            last = sections[-1].pos
            end = (last.end_line, last.end_column)
        return ast.Program(version, target, chips, tuple(sections),
                           pos=ast.Pos(start[0], start[1], end[0], end[1]), target_pos=target_pos)

    def section(self) -> ast.Section:
        i = self.i
        op = self.values[i]
        if op not in ("matmul", "attention"):
            raise Fallback
        line, col = self.lines[i], self.cols[i]
        # SECTION must not run on into a chip-like name (`matmul-x`)
        self.i += 1
        if self.kinds[self.i] == "-":
            nxt = self.i
            if self.lines[nxt] == line and self.cols[nxt] == col + len(op):
                raise Fallback
        self._expect("{")
        items = []
        kinds = self.kinds
        while True:
            kind = kinds[self.i]
            if kind == "when":
                items.append(self.rule())
            elif kind == "let":
                items.append(self.let())
            elif kind == "else":
                items.append(self.else_rule())
            else:
                break
        close = self._expect("}")
        _, _, end_line, end_col = self._span(close)
        return ast.Section(op, tuple(items), pos=ast.Pos(line, col, end_line, end_col))

    def let(self) -> ast.Let:
        start = self._expect("let")
        name = self._expect("NAME")
        self._expect("=")
        value, _, _, el, ec, _ = self.expr()
        return ast.Let(self.values[name], value,
                       pos=ast.Pos(self.lines[start], self.cols[start], el, ec))

    def rule(self) -> ast.Rule:
        start = self._expect("when")
        condition = self.expr()[0]
        self._expect("{")
        config = self.config()
        close = self._expect("}")
        _, _, el, ec = self._span(close)
        return ast.Rule(condition, config, pos=ast.Pos(self.lines[start], self.cols[start], el, ec))

    def else_rule(self) -> ast.Rule:
        start = self._expect("else")
        self._expect("{")
        config = self.config()
        close = self._expect("}")
        _, _, el, ec = self._span(close)
        return ast.Rule(None, config, pos=ast.Pos(self.lines[start], self.cols[start], el, ec))

    def config(self) -> ast.ConfigSpec:
        fam = self._expect("NAME")
        line, col, el, ec = self._span(fam)
        params = []
        kinds = self.kinds
        while kinds[self.i] == "NAME":
            name = self.i
            self.i += 1
            self._expect("=")
            value, _, _, el, ec, _ = self.expr()
            params.append(ast.Param(self.values[name], value,
                                    pos=ast.Pos(self.lines[name], self.cols[name], el, ec)))
        return ast.ConfigSpec(self.values[fam], tuple(params), pos=ast.Pos(line, col, el, ec))

    # -- expressions: each returns (node, container span..., depth) ------------------------
    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Fallback
        then = self.or_expr()
        if self.kinds[self.i] == "if":
            self.i += 1
            test = self.or_expr()
            self._expect("else")
            other = self.expr()
            d = 1 + max(then[5], test[5], other[5])
            pos = ast.Pos(then[1], then[2], other[3], other[4])
            then = (ast.Cond(then[0], test[0], other[0], pos=pos), then[1], then[2], other[3],
                    other[4], d)
        self.depth -= 1
        if then[5] > MAX_DEPTH:
            raise Fallback
        return then

    def _binary(self, left, op, right):
        d = 1 + max(left[5], right[5])
        pos = ast.Pos(left[1], left[2], right[3], right[4])
        return ast.Binary(op, left[0], right[0], pos=pos), left[1], left[2], right[3], right[4], d

    def or_expr(self):
        left = self.and_expr()
        while self.kinds[self.i] == "or":
            self.i += 1
            left = self._binary(left, "or", self.and_expr())
        return left

    def and_expr(self):
        left = self.not_expr()
        while self.kinds[self.i] == "and":
            self.i += 1
            left = self._binary(left, "and", self.not_expr())
        return left

    def not_expr(self):
        if self.kinds[self.i] == "not":
            start = self.i
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise Fallback
            operand = self.not_expr()
            self.depth -= 1
            pos = ast.Pos(self.lines[start], self.cols[start], operand[3], operand[4])
            return (ast.Unary("not", operand[0], pos=pos), pos.line, pos.column, operand[3],
                    operand[4], operand[5] + 1)
        return self.comparison()

    def comparison(self):
        left = self.shift()
        kind = self.kinds[self.i]
        if kind in _COMPARE:
            self.i += 1
            right = self.shift()
            d = 1 + max(left[5], right[5])
            pos = ast.Pos(left[1], left[2], right[3], right[4])
            return ast.Compare(kind, left[0], right[0], pos=pos), left[1], left[2], right[3], right[4], d
        negated = False
        if kind == "not" and self.kinds[self.i + 1] == "in":
            negated = True
            self.i += 1
            kind = "in"
        if kind == "in":
            self.i += 1
            self._expect("{")
            items = [self.expr()]
            while self.kinds[self.i] == ",":
                self.i += 1
                items.append(self.expr())
            close = self._expect("}")
            _, _, el, ec = self._span(close)
            d = 2 + max(left[5], max(item[5] for item in items))
            pos = ast.Pos(left[1], left[2], el, ec)
            return (ast.InSet(left[0], tuple(item[0] for item in items), negated, pos=pos),
                    left[1], left[2], el, ec, d)
        return left

    def shift(self, min_prec: int = 6):
        """`shift`, `sum` and `product` by precedence climbing (left-associative)."""
        left = self.unary()
        kinds = self.kinds
        while True:
            op = kinds[self.i]
            prec = _PREC.get(op)
            if prec is None or prec < min_prec:
                return left
            self.i += 1
            right = self.shift(prec + 1)
            left = self._binary(left, op, right)

    def unary(self):
        if self.kinds[self.i] == "-":
            start = self.i
            self.i += 1
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise Fallback
            operand = self.unary()
            self.depth -= 1
            pos = ast.Pos(self.lines[start], self.cols[start], operand[3], operand[4])
            return (ast.Unary("-", operand[0], pos=pos), pos.line, pos.column, operand[3],
                    operand[4], operand[5] + 1)
        return self.atom()

    def atom(self):
        i = self.i
        kind = self.kinds[i]
        if kind == "INT":
            self.i = i + 1
            text = self.values[i]
            try:
                value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
            except ValueError:  # too many digits for int(): Lark's path reports it
                raise Fallback from None
            line, col, el, ec = self._span(i)
            return ast.Num(value, pos=ast.Pos(line, col, el, ec)), line, col, el, ec, 1
        if kind == "FLOAT":
            self.i = i + 1
            line, col, el, ec = self._span(i)
            return ast.Num(float(self.values[i]), pos=ast.Pos(line, col, el, ec)), line, col, el, ec, 1
        if kind == "NAME":
            self.i = i + 1
            name = self.values[i]
            line, col, el, ec = self._span(i)
            nxt = self.kinds[i + 1]
            if nxt == ".":
                self.i = i + 2
                attr = self._expect("NAME")
                _, _, el, ec = self._span(attr)
                return (ast.Attr(name, self.values[attr], pos=ast.Pos(line, col, el, ec)),
                        line, col, el, ec, 1)
            if nxt == "(":
                self.i = i + 2
                args = []
                if self.kinds[self.i] != ")":
                    args.append(self.expr())
                    while self.kinds[self.i] == ",":
                        self.i += 1
                        args.append(self.expr())
                close = self._expect(")")
                _, _, el, ec = self._span(close)
                d = 1 + max((a[5] for a in args), default=0)
                return (ast.Call(name, tuple(a[0] for a in args), pos=ast.Pos(line, col, el, ec)),
                        line, col, el, ec, d)
            pos = ast.Pos(line, col, el, ec)
            if name in _BOOLEANS:
                return ast.Bool(_BOOLEANS[name], pos=pos), line, col, el, ec, 1
            return ast.Name(name, pos=pos), line, col, el, ec, 1
        if kind == "(":
            self.i = i + 1
            inner = self.expr()
            close = self._expect(")")
            _, _, el, ec = self._span(close)
            # the node keeps its own position; its container now spans the parentheses
            return inner[0], self.lines[i], self.cols[i], el, ec, inner[5]
        raise Fallback


@contextmanager
def paused_gc():
    """No cyclic garbage collection inside: passes over a large program create millions of
    small objects that live on, and each collection would walk all of them again (the
    parse, check and compile of a 16k-rule file spent most of their time there)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_program(text: str) -> ast.Program:
    """The AST of a well-formed program (comments not attached), or Fallback."""
    with paused_gc():
        try:
            return _Parser(text).program()
        except (IndexError, RecursionError):  # ran off the tokens, or too deep: Lark decides
            raise Fallback from None


def parse_expression(text: str) -> ast.Expr:
    """One expression (the `expression` start rule), or Fallback."""
    try:
        parser = _Parser(text)
        parser._load(0)
        node = parser.expr()[0]
    except (IndexError, RecursionError):
        raise Fallback from None
    if parser.kinds[parser.i] != "$END":
        raise Fallback
    return node
