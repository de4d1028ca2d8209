"""The AST of a .kevo program: frozen dataclasses.

Positions and comments' placement do not take part in equality, so that
`parse(format(p)) == p` compares meaning and wording, not layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Pos:
    line: int = 0
    column: int = 0
    end_line: int = 0
    end_column: int = 0


NOWHERE = Pos()


def _pos() -> Pos:
    return field(default=NOWHERE, compare=False, repr=False)  # type: ignore[return-value]


# -- expressions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Num:
    value: int | float
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Bool:
    value: bool
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Name:
    """A feature, a let binding, or a symbol (f16, causal, m, ...) — resolved by context."""

    name: str
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Attr:
    """`chip.cores`: a fact about the chip."""

    obj: str
    name: str
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Unary:
    op: str  # "-" or "not"
    operand: Expr
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Binary:
    op: str  # + - * / // % << >> and or
    left: Expr
    right: Expr
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Compare:
    op: str  # == != < <= > >=
    left: Expr
    right: Expr
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class InSet:
    value: Expr
    items: tuple[Expr, ...]
    negated: bool = False
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Call:
    func: str
    args: tuple[Expr, ...]
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Cond:
    """`then if test else otherwise`"""

    then: Expr
    test: Expr
    otherwise: Expr
    pos: Pos = _pos()


Expr = Union[Num, Bool, Name, Attr, Unary, Binary, Compare, InSet, Call, Cond]


# -- statements ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Comments:
    """Comment lines before an item, and a comment at the end of its last line."""

    before: tuple[str, ...] = ()
    after: str | None = None
    blank_line_before: bool = field(default=False, compare=False)


NO_COMMENTS = Comments()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Param:
    name: str
    value: Expr
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class ConfigSpec:
    family: str
    params: tuple[Param, ...]
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Let:
    name: str
    value: Expr
    comments: Comments = NO_COMMENTS
    pos: Pos = _pos()


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Rule:
    """`when <condition> { config }`, or `else { config }` when condition is None."""

    condition: Expr | None
    config: ConfigSpec
    comments: Comments = NO_COMMENTS
    pos: Pos = _pos()

    @property
    def is_else(self) -> bool:
        return self.condition is None


Item = Union[Let, Rule]


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Section:
    op: str
    items: tuple[Item, ...]
    comments: Comments = NO_COMMENTS
    trailing: tuple[str, ...] = ()  # comments before the closing brace
    pos: Pos = _pos()

    @property
    def lets(self) -> tuple[Let, ...]:
        return tuple(i for i in self.items if isinstance(i, Let))

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(i for i in self.items if isinstance(i, Rule))


@dataclass(frozen=True, slots=True)  # slots: half the objects of a large program
class Program:
    version: int
    target: str | None
    chips: tuple[str, ...]
    sections: tuple[Section, ...]
    comments: Comments = NO_COMMENTS  # before the header
    trailing: tuple[str, ...] = ()  # after the last section
    pos: Pos = _pos()
    target_pos: Pos = _pos()

    def section(self, op: str) -> Section | None:
        return next((s for s in self.sections if s.op == op), None)
