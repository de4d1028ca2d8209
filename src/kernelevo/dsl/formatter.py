"""The canonical text of a program: `kernelevo fmt`. Comments are kept;
parse(format(p)) == p and format is idempotent."""

from __future__ import annotations

from . import ast
from .fastparse import paused_gc

INDENT = "  "
MAX_RULE_WIDTH = 100

_PREC = {"or": 2, "and": 3, "<<": 6, ">>": 6, "+": 7, "-": 7, "*": 8, "/": 8, "//": 8, "%": 8}


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.Cond):
        return 1
    if isinstance(e, ast.Binary):
        return _PREC[e.op]
    if isinstance(e, ast.Unary):
        return 4 if e.op == "not" else 9
    if isinstance(e, (ast.Compare, ast.InSet)):
        return 5
    return 10


def format_expr(e: ast.Expr, min_prec: int = 1) -> str:
    text = _expr(e)
    return f"({text})" if _prec(e) < min_prec else text


def _expr(e: ast.Expr) -> str:
    if isinstance(e, ast.Num):
        return str(e.value) if isinstance(e.value, int) else repr(float(e.value))
    if isinstance(e, ast.Bool):
        return "yes" if e.value else "no"
    if isinstance(e, ast.Name):
        return e.name
    if isinstance(e, ast.Attr):
        return f"{e.obj}.{e.name}"
    if isinstance(e, ast.Call):
        return f"{e.func}({', '.join(format_expr(a) for a in e.args)})"
    if isinstance(e, ast.Unary):
        if e.op == "not":
            return f"not {format_expr(e.operand, 4)}"
        return f"-{format_expr(e.operand, 9)}"
    if isinstance(e, ast.Binary):
        p = _PREC[e.op]
        return f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p + 1)}"
    if isinstance(e, ast.Compare):
        return f"{format_expr(e.left, 6)} {e.op} {format_expr(e.right, 6)}"
    if isinstance(e, ast.InSet):
        items = ", ".join(format_expr(i) for i in e.items)
        return f"{format_expr(e.value, 6)} {'not in' if e.negated else 'in'} {{{items}}}"
    if isinstance(e, ast.Cond):
        return (f"{format_expr(e.then, 2)} if {format_expr(e.test, 2)} "
                f"else {format_expr(e.otherwise, 1)}")
    raise TypeError(f"not an expression: {e!r}")


def format_config(spec: ast.ConfigSpec) -> str:
    return " ".join([spec.family] + [f"{p.name}={format_expr(p.value)}" for p in spec.params])


def _with_after(line: str, comments: ast.Comments) -> str:
    return f"{line}  {comments.after}" if comments.after else line


def _item(item: ast.Item, out: list[str], first: bool) -> None:
    c = item.comments
    if c.blank_line_before and not first:
        out.append("")
    out.extend(INDENT + text for text in c.before)
    if isinstance(item, ast.Let):
        out.append(_with_after(f"{INDENT}let {item.name} = {format_expr(item.value)}", c))
        return
    head = "else" if item.condition is None else f"when {format_expr(item.condition)}"
    config = format_config(item.config)
    one_line = f"{INDENT}{head} {{ {config} }}"
    if len(one_line) <= MAX_RULE_WIDTH:
        out.append(_with_after(one_line, c))
    else:
        out.append(f"{INDENT}{head} {{")
        out.append(f"{INDENT * 2}{config}")
        out.append(_with_after(f"{INDENT}}}", c))


def format_program(program: ast.Program) -> str:
    with paused_gc():  # linear in the program's size (see fastparse.paused_gc)
        return _format_program(program)


def _format_program(program: ast.Program) -> str:
    out: list[str] = list(program.comments.before)
    out.append(_with_after(f"kevo {program.version}", program.comments))
    if program.target is not None:
        out.append(f"target {program.target}")
    if program.chips:
        out.append("chips " + " ".join(program.chips))
    for section in program.sections:
        out.append("")
        out.extend(section.comments.before)
        out.append(_with_after(f"{section.op} {{", section.comments))
        for index, item in enumerate(section.items):
            _item(item, out, index == 0)
        out.extend(INDENT + text for text in section.trailing)
        out.append("}")
    if program.trailing:
        out.append("")
        out.extend(program.trailing)
    return "\n".join(out) + "\n"
