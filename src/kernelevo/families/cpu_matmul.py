"""The CPU backend's matmul families (kernels in cpp/matmul/: cpu_gemm.cpp drives, ukernel_*.cpp
compute, cpu_gemv.cpp streams)."""

from __future__ import annotations

from ..chips import Chip
from .schema import Constraint, Family, Param, Params

#: register tiles (rows x columns) of the `fma` and `bf16dot` engines
CPU_TILE_ROWS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
CPU_TILE_COLS: tuple[int, ...] = (16, 32, 48, 64)
#: register tiles of the `amx` engine: TM x TN tiles of 16 x 16, with TM*TN + TM + TN <= 8
AMX_TILES: tuple[tuple[int, int], ...] = ((16, 16), (16, 32), (32, 16), (32, 32), (16, 48), (48, 16))
CPU_VECTOR_LANES = 16  # f32 lanes of the kernels' vector type

#: compute engines of the gemm family, and the CPU features (Chip.isa) each needs
CPU_ENGINES: dict[str, tuple[str, ...]] = {
    "fma": (),
    "bf16dot": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_tile"),
}


def register_tiles(engine: str) -> frozenset[tuple[int, int]]:
    """The (mr, nr) register tiles the extension compiles for an engine."""
    if engine == "amx":
        return frozenset(AMX_TILES)
    return frozenset((r, c) for r in CPU_TILE_ROWS for c in CPU_TILE_COLS)


def engine_available(engine: str, chip: Chip) -> bool:
    """Whether the chip has what the engine needs. A chip whose features are not known
    (a file checked for no particular chip) may have any."""
    return not chip.isa or all(f in chip.isa for f in CPU_ENGINES[engine])


def _vector_registers_needed(p: Params, chip: Chip) -> int:
    lanes = max(1, chip.simd_width // 32)
    return p["mr"] * (p["nr"] // lanes) + p["nr"] // lanes + 1


def _tile_fits(p: Params, chip: Chip) -> bool:
    if p["engine"] == "amx":
        return True  # the tile registers are checked by the tile list
    return _vector_registers_needed(p, chip) <= chip.vector_registers


def _threads_search(chip: Chip) -> tuple[int, ...]:
    return tuple(sorted({chip.cores, max(1, chip.cores // 2)}))


_threads = Param("threads", "int", "worker threads (at most the cores this process may use)",
                 lo=1, hi=1024, search=_threads_search)
# chip.cores is 0 when a file is checked for no particular chip
_threads_fit = Constraint("threads <= chip.cores",
                          lambda p, chip, call: chip.cores == 0 or p["threads"] <= chip.cores)
_epilogue = Param("epilogue", "choice",
                  "how the call's epilogue (scale, bias, activation, residual) runs: on each "
                  "tile as it is finished (fused) or as a second pass over the product (separate)",
                  choices=("fused", "separate"))

CPU_GEMM = Family(
    op="matmul", backend="cpu", name="gemm",
    doc="Cache-blocked, packed GEMM (Goto/BLIS): B is packed for the whole depth nc columns "
        "at a time, A mc rows x kc deep at a time, and an mr x nr register tile of the chosen "
        "engine accumulates in f32.",
    params=(
        Param("mc", "int", "rows of A per block (a multiple of mr)", lo=1, hi=4096,
              search=(32, 64, 96, 128, 192, 256)),
        Param("nc", "int", "columns of B packed per panel (a multiple of nr)", lo=16, hi=16384,
              multiple_of=16, search=(384, 768, 1536, 3072)),
        Param("kc", "int", "depth of each packed block", lo=1, hi=16384,
              search=(64, 128, 256, 512, 1024, 2048, 4096)),
        Param("mr", "int", "rows of the register tile",
              allowed=tuple(sorted(set(CPU_TILE_ROWS) | {r for r, _ in AMX_TILES})),
              search=(4, 6, 8, 12, 16, 32)),
        Param("nr", "int", "columns of the register tile", allowed=CPU_TILE_COLS,
              search=(16, 32, 48, 64)),
        _threads,
        Param("split", "choice", "what the threads divide: row blocks (m) or the column "
              "slivers of a shared row block (n)", choices=("m", "n")),
        Param("engine", "choice", "what multiplies: f32 FMA on the CPU's vectors (fma), "
              "AVX512-BF16 pair dot products (bf16dot) or AMX tiles (amx); the last two "
              "take bf16 only", choices=tuple(CPU_ENGINES)),
        Param("pack_a", "bool", "copy A's blocks into the engine's layout (yes), or let the "
              "micro-kernel read A where it lies (no; A is first copied once to plain rows "
              "when its layout does not fit)"),
        _epilogue,
    ),
    constraints=(
        Constraint("mc % mr == 0", lambda p, chip, call: p["mc"] % p["mr"] == 0),
        Constraint("nc % nr == 0", lambda p, chip, call: p["nc"] % p["nr"] == 0),
        Constraint("a register tile the engine has (fma/bf16dot: mr <= 16; amx: 16x16, "
                   "16x32, 32x16, 32x32, 16x48 or 48x16)",
                   lambda p, chip, call: (p["mr"], p["nr"]) in register_tiles(p["engine"])),
        Constraint("the register tile to fit the vector registers: "
                   "mr * nr/lanes + nr/lanes + 1 <= chip.vector_registers",
                   lambda p, chip, call: _tile_fits(p, chip)),
        Constraint("kc to be a whole number of the engine's depth steps (bf16dot: even; "
                   "amx: a multiple of 32)",
                   lambda p, chip, call: p["kc"] % {"fma": 1, "bf16dot": 2, "amx": 32}[p["engine"]] == 0),
        Constraint("the engine to be available on the chip (bf16dot: AVX512-BF16; amx: AMX-BF16)",
                   lambda p, chip, call: engine_available(p["engine"], chip)),
        Constraint.on_call_expr("engine == fma or dtype == bf16", "engine fma for f16/f32: bf16dot and amx multiply bf16"),
        _threads_fit,
    ),
)

CPU_GEMV = Family(
    op="matmul", backend="cpu", name="gemv",
    doc="For few rows of A (LLM decode): no packing; B is read from memory once, in its own "
        "layout, each task owning nb output columns and walking the depth in chunks of kb "
        "that stay in L1 while every row of A uses them.",
    params=(
        Param("nb", "int", "columns of B (rows of W for x @ W.T) per task", lo=16, hi=8192,
              multiple_of=CPU_VECTOR_LANES, search=(16, 32, 64, 128, 256, 512)),
        Param("kb", "int", "depth of B per chunk", lo=16, hi=1 << 20, multiple_of=16,
              search=(128, 256, 512, 1024, 4096)),
        _threads,
        _epilogue,
    ),
    constraints=(
        _threads_fit,
        Constraint.on_call_expr("M <= 64", "each task keeps M x nb results"),
    ),
)


CPU_MATMUL_FAMILIES: tuple[Family, ...] = (CPU_GEMM, CPU_GEMV)
