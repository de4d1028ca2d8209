"""MLX's Metal prelude, `metal::utils()`: the text MLX prepends to every custom kernel.

MLX builds it at compile time (make_compiled_preamble.sh) by concatenating utils.h and the
MLX headers it includes, in inclusion order, each under `#line 1 "<header>"`, without
their `#include "..."` and `#pragma once` lines. The same headers ship in the installed
wheel; this module rebuilds the text from them the same way. The one change the emulator
makes (cxx.dedupe_address_space_overloads) blanks overloads that differ only in address
space, which C++ cannot tell apart; lines stay where they are.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import mlx.core as mx

from . import cxx

INCLUDE_ROOT = Path(mx.__file__).parent / "include"
UTILS = "mlx/backend/metal/kernels/utils.h"
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"(.*\.h)"', re.MULTILINE)


def _inclusion_order(header: str, seen: set[str]) -> list[str]:
    """Headers reachable from `header` in the order the preprocessor first completes them."""
    seen.add(header)
    order = []
    for inc in _LOCAL_INCLUDE.findall((INCLUDE_ROOT / header).read_text()):
        if inc not in seen:
            order += _inclusion_order(inc, seen)
    return order + [header]


@functools.cache
def mlx_utils() -> str:
    """The prelude text as MLX builds it (before the emulator's one change)."""
    parts = []
    for header in _inclusion_order(UTILS, set()):
        lines = (INCLUDE_ROOT / header).read_text().splitlines(keepends=True)
        body = "".join(l for l in lines if not re.search(r'#include ".*.h"|#pragma once', l))
        parts.append(f'#line 1 "{header}"\n{body}\n')
    return "".join(parts)


def expand_mlx_header(header: str) -> str:
    """An MLX Metal header with the MLX headers it includes inlined in inclusion order,
    leaving out those the prelude already holds: what MLX's JIT sources are built from.
    Used to run MLX's own kernels (e.g. its steel GEMM) in the emulator."""
    order = _inclusion_order(header, set(_inclusion_order(UTILS, set())))
    parts = []
    for h in order:
        lines = (INCLUDE_ROOT / h).read_text().splitlines(keepends=True)
        parts.append("".join(l for l in lines if not re.search(r'#include ".*.h"|#pragma once', l)))
    return "\n".join(parts) + "\n"  # the header goes right before MLX's "template <...>" line


@functools.cache
def emulator_prelude() -> str:
    return cxx.dedupe_address_space_overloads(mlx_utils())
