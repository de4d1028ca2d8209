"""Kernel families and their parameter spaces: the one definition.

A family is one kernel template (e.g. the CPU `gemm`) with named parameters, each with a
domain, and constraints between parameters, the chip and the call. The DSL checker, the
selection code, the tuner's search, `kernelevo._ext` (which rejects a parameter it does
not read) and docs/dsl.md all read these tables; nothing restates them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from .chips import Chip

ParamValue = Union[int, bool, str]
Params = Mapping[str, ParamValue]
Call = Mapping[str, Any]


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["int", "bool", "choice"]
    doc: str
    lo: int = 0
    hi: int = 0
    multiple_of: int = 1
    choices: tuple[str, ...] = ()  # kind == "choice": the symbols
    allowed: tuple[int, ...] = ()  # kind == "int": an explicit set, when the range is sparse
    #: values the tuner tries (a function of the chip where it depends on it)
    search: tuple[ParamValue, ...] | Callable[[Chip], tuple[ParamValue, ...]] = ()

    def contains(self, value: ParamValue) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        if self.allowed:
            return value in self.allowed
        return self.lo <= value <= self.hi and value % self.multiple_of == 0

    def domain_text(self) -> str:
        if self.kind == "bool":
            return "yes or no"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.allowed:
            return "one of " + ", ".join(str(v) for v in self.allowed)
        text = f"an integer in [{self.lo}, {self.hi}]"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")

    def search_values(self, chip: Chip) -> tuple[ParamValue, ...]:
        values = self.search(chip) if callable(self.search) else self.search
        if values:
            return tuple(values)
        if self.kind == "bool":
            return (False, True)
        if self.kind == "choice":
            return self.choices
        return self.allowed or (self.lo,)


@dataclass(frozen=True)
class Constraint:
    text: str  # how the rule reads in messages and docs
    holds: Callable[[Params, Chip, Call], bool]
    on_call: bool = False  # depends on the call's features: checked when a rule is selected


@dataclass(frozen=True)
class Family:
    op: str
    backend: str
    name: str
    doc: str
    params: tuple[Param, ...]
    constraints: tuple[Constraint, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def violations(self, params: Params, chip: Chip, call: Call | None = None) -> list[str]:
        """Broken constraints, as messages. Constraints on the call are checked only when
        a call is given; a constraint whose parameters are missing is skipped."""
        broken = []
        for c in self.constraints:
            if c.on_call and call is None:
                continue
            try:
                ok = c.holds(params, chip, call or {})
            except (KeyError, ZeroDivisionError):
                continue
            if not ok:
                broken.append(f"{self.name} needs {c.text}")
        return broken

    def search_space(self, chip: Chip, call: Call | None = None) -> Iterator[dict[str, ParamValue]]:
        """Every combination of the parameters' search values that meets the constraints."""
        names = self.param_names
        for values in itertools.product(*(p.search_values(chip) for p in self.params)):
            params = dict(zip(names, values))
            if not self.violations(params, chip, call):
                yield params


# --------------------------------------------------------------------------------------
# CPU matmul (cpp/matmul/cpu_gemm.cpp)

#: register tiles (rows x columns) the CPU gemm kernel is compiled for
CPU_TILE_ROWS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
CPU_TILE_COLS: tuple[int, ...] = (16, 32, 48, 64)
CPU_VECTOR_LANES = 16  # f32 lanes of the kernels' vector type


def _cpu_registers_needed(p: Params, chip: Chip) -> int:
    lanes = max(1, chip.simd_width // 32)
    return p["mr"] * (p["nr"] // lanes) + p["nr"] // lanes + 1


def _threads_search(chip: Chip) -> tuple[int, ...]:
    return tuple(sorted({chip.cores, max(1, chip.cores // 2)}))


_threads = Param("threads", "int", "worker threads (at most the cores this process may use)",
                 lo=1, hi=1024, search=_threads_search)
# chip.cores is 0 when a file is checked for no particular chip
_threads_fit = Constraint("threads <= chip.cores",
                          lambda p, chip, call: chip.cores == 0 or p["threads"] <= chip.cores)

CPU_GEMM = Family(
    op="matmul", backend="cpu", name="gemm",
    doc="Cache-blocked, packed GEMM (Goto/BLIS loop order): B is packed kc x nc at a time, "
        "A mc x kc at a time, and an mr x nr register tile accumulates in f32.",
    params=(
        Param("mc", "int", "rows of A packed per block (a multiple of mr)", lo=1, hi=4096,
              search=(24, 48, 56, 96, 112, 144, 168, 192, 288)),
        Param("nc", "int", "columns of B packed per panel (a multiple of nr)", lo=16, hi=16384,
              multiple_of=16, search=(256, 384, 512, 768, 1024, 1536, 2048, 3072)),
        Param("kc", "int", "depth of each packed block", lo=1, hi=4096,
              search=(64, 128, 192, 256, 384, 512)),
        Param("mr", "int", "rows of the register tile", allowed=CPU_TILE_ROWS,
              search=(4, 6, 8, 12, 14)),
        Param("nr", "int", "columns of the register tile", allowed=CPU_TILE_COLS,
              search=(16, 32, 48, 64)),
        _threads,
        Param("split", "choice", "what the threads divide: row blocks (m) or column slivers (n)",
              choices=("m", "n")),
    ),
    constraints=(
        Constraint("mc % mr == 0", lambda p, chip, call: p["mc"] % p["mr"] == 0),
        Constraint("nc % nr == 0", lambda p, chip, call: p["nc"] % p["nr"] == 0),
        Constraint("the register tile to fit the vector registers: "
                   "mr * nr/lanes + nr/lanes + 1 <= chip.vector_registers",
                   lambda p, chip, call: _cpu_registers_needed(p, chip) <= chip.vector_registers),
        _threads_fit,
    ),
)

CPU_SKINNY = Family(
    op="matmul", backend="cpu", name="skinny",
    doc="For few rows of A (LLM decode): no packing; each task streams B once for a block "
        "of nb columns and all rows of A.",
    params=(
        Param("nb", "int", "columns of B per task", lo=16, hi=8192, multiple_of=CPU_VECTOR_LANES,
              search=(32, 64, 128, 256, 512, 1024)),
        _threads,
    ),
    constraints=(
        _threads_fit,
        Constraint("M <= 64 (it re-reads B for every 4 rows of A)",
                   lambda p, chip, call: call["M"] <= 64, on_call=True),
    ),
)

ALL_FAMILIES: tuple[Family, ...] = (CPU_GEMM, CPU_SKINNY)

_BY_KEY: dict[tuple[str, str, str], Family] = {(f.op, f.backend, f.name): f for f in ALL_FAMILIES}


def family(op: str, backend: str, name: str) -> Family | None:
    return _BY_KEY.get((op, backend, name))


def families_for(op: str, backend: str) -> tuple[Family, ...]:
    return tuple(f for f in ALL_FAMILIES if f.op == op and f.backend == backend)
