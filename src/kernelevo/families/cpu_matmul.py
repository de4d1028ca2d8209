"""The CPU backend's matmul families (kernels in cpp/matmul/cpu_gemm.cpp)."""

from __future__ import annotations

from ..chips import Chip
from .schema import Constraint, Family, Param, Params

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

CPU_GEMV = Family(
    op="matmul", backend="cpu", name="gemv",
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


CPU_MATMUL_FAMILIES: tuple[Family, ...] = (CPU_GEMM, CPU_GEMV)
