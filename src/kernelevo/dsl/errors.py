"""Diagnostics: where (file:line:column), what was found, what was expected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Diagnostic:
    message: str
    line: int
    column: int
    end_column: int | None = None  # exclusive; for a caret run under the source
    severity: Literal["error", "warning"] = "error"
    path: str = "<string>"
    source_line: str = ""

    def render(self) -> str:
        head = f"{self.path}:{self.line}:{self.column}: {self.severity}: {self.message}"
        if not self.source_line:
            return head
        width = max(1, (self.end_column or self.column + 1) - self.column)
        caret = " " * (self.column - 1) + "^" * width
        return f"{head}\n    {self.source_line}\n    {caret}"


class DSLError(ValueError):
    """A .kevo program is malformed or invalid; carries every diagnostic found."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


def source_line(text: str, line: int) -> str:
    lines = text.splitlines()
    return lines[line - 1].expandtabs(1) if 0 < line <= len(lines) else ""
