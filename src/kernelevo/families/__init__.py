"""Kernel families and their parameter spaces: the one definition.

A family is one kernel template (e.g. the CPU `gemm`) with named parameters, each with a
domain, and constraints between parameters, the chip and the call (schema.py). Each
backend's families are in their own module; this registry is what the DSL checker, the
selection code, the tuner's search, docs/dsl.md and the extension's tests read.
"""

from __future__ import annotations

from .cpu_attention import CPU_ATTENTION_FAMILIES, CPU_DECODE, CPU_DECODE_SPLIT, CPU_FLASH
from .cpu_matmul import (AMX_TILES, CPU_ENGINES, CPU_GEMM, CPU_GEMV, CPU_MATMUL_FAMILIES, CPU_TILE_COLS,
                         CPU_TILE_ROWS, register_tiles)
from .cuda_attention import CUDA_ATTENTION_FAMILIES
from .cuda_matmul import CUDA_MATMUL_FAMILIES
from .metal_attention import METAL_ATTENTION_FAMILIES
from .metal_matmul import METAL_MATMUL_FAMILIES
from .schema import MLX_BUILTIN, Call, Constraint, Family, Param, Params, ParamValue

ALL_FAMILIES: tuple[Family, ...] = (
    CPU_MATMUL_FAMILIES + CPU_ATTENTION_FAMILIES
    + METAL_MATMUL_FAMILIES + METAL_ATTENTION_FAMILIES
    + CUDA_MATMUL_FAMILIES + CUDA_ATTENTION_FAMILIES
)

_BY_KEY: dict[tuple[str, str, str], Family] = {(f.op, f.backend, f.name): f for f in ALL_FAMILIES}


def family(op: str, backend: str, name: str) -> Family | None:
    return _BY_KEY.get((op, backend, name))


def families_for(op: str, backend: str) -> tuple[Family, ...]:
    return tuple(f for f in ALL_FAMILIES if f.op == op and f.backend == backend)


__all__ = [
    "ALL_FAMILIES", "AMX_TILES", "MLX_BUILTIN", "CPU_DECODE", "CPU_DECODE_SPLIT", "CPU_ENGINES", "CPU_FLASH",
    "CPU_GEMM", "CPU_GEMV", "CPU_TILE_COLS", "CPU_TILE_ROWS", "Call", "register_tiles",
    "Constraint", "Family", "Param", "ParamValue", "Params", "families_for", "family",
]
