"""The .kevo heuristics language: parse, check, format, select."""

from .ast import Program
from .checker import check, representative_chips
from .errors import Diagnostic, DSLError
from .formatter import format_config, format_expr, format_program
from .parser import grammar_path, parse, parse_config

__all__ = [
    "DSLError", "Diagnostic", "Program", "check", "format_config", "format_expr",
    "format_program", "grammar_path", "parse", "parse_config", "representative_chips",
]
