"""Metal matmul families (templates in metal/): Apple GPUs, simdgroup_matrix 8x8 MMA,
32 KiB of threadgroup memory, at most 1024 threads per threadgroup."""

from __future__ import annotations

from .gpu_common import ITEMSIZE_EXPR, builtin, itemsize, memory_fit, threads_fit
from .schema import Constraint, Family, Param

POW2_TILES = (16, 32, 64, 128)


def gemm_tile_bytes(p, call) -> int:
    """Threadgroup memory of metal/gemm.h's A and B tiles (GemmTiles): each tile keeps the
    layout of its operand in memory, so a transposed operand's tile is stored transposed;
    rows are padded by 16 bytes against bank conflicts. Without the call's transposes, the
    larger layout."""
    size = itemsize(call)
    pad = 16 // size
    bm, bn, bk = p["bm"], p["bn"], p["bk"]
    a = {False: bm * (bk + pad), True: bk * (bm + pad)}
    b = {False: bk * (bn + pad), True: bn * (bk + pad)}
    ta, tb = (call or {}).get("transpose_a"), (call or {}).get("transpose_b")
    a_elems = a[bool(ta)] if ta is not None else max(a.values())
    b_elems = b[bool(tb)] if tb is not None else max(b.values())
    return (a_elems + b_elems) * size


_PAD = f"16 // {ITEMSIZE_EXPR}"
_tiles_fit = memory_fit(
    gemm_tile_bytes, "(A + B) * itemsize, where A = bm * (bk + pad) (bk * (bm + pad) when "
    "transpose_a), B = bk * (bn + pad) (bn * (bk + pad) when transpose_b), pad = 16 / itemsize",
    f"((bk * (bm + {_PAD}) if transpose_a else bm * (bk + {_PAD})) + (bn * (bk + {_PAD}) if "
    f"transpose_b else bk * (bn + {_PAD}))) * {ITEMSIZE_EXPR}")


_simdgroup_tiling = (
    Constraint("bm % (8 * wm) == 0 (each simdgroup owns whole 8x8 fragments)",
               lambda p, chip, call: p["bm"] % (8 * p["wm"]) == 0),
    Constraint("bn % (8 * wn) == 0", lambda p, chip, call: p["bn"] % (8 * p["wn"]) == 0),
    Constraint("bk % 8 == 0", lambda p, chip, call: p["bk"] % 8 == 0),
)

_warps = (
    Param("wm", "int", "simdgroups along M", allowed=(1, 2, 4)),
    Param("wn", "int", "simdgroups along N", allowed=(1, 2, 4)),
)

METAL_GEMM = Family(
    op="matmul", backend="metal", name="gemm",
    doc="Threadgroup-tiled GEMM: a bm x bn output tile per threadgroup, bk deep per step, "
        "wm x wn simdgroups each multiplying 8x8 simdgroup_matrix fragments; aligned and "
        "unaligned edges, transposes, batch, a swizzled threadgroup order and a fused epilogue.",
    params=(
        Param("bm", "int", "rows of the output tile per threadgroup", allowed=POW2_TILES),
        Param("bn", "int", "columns of the output tile per threadgroup", allowed=POW2_TILES),
        Param("bk", "int", "depth loaded into threadgroup memory per step", allowed=(8, 16, 32, 64)),
        *_warps,
        Param("swizzle", "int", "log2 of the threadgroup-order swizzle (0: row-major order)",
              lo=0, hi=4, search=(0, 1, 2)),
        Param("epilogue", "choice", "apply bias/activation/residual/scale in the kernel (fused) "
              "or as separate MLX ops (separate)", choices=("fused", "separate")),
    ),
    constraints=(
        *_simdgroup_tiling,
        threads_fit(lambda p: 32 * p["wm"] * p["wn"], "32 * wm * wn threads"),
        *_tiles_fit,
    ),
)

METAL_SPLITK = Family(
    op="matmul", backend="metal", name="splitk",
    doc="Split-K GEMM for a small output and a long K: `parts` threadgroups per output tile "
        "each reduce a slice of K into an f32 partial, then a second kernel sums the parts.",
    params=(
        Param("bm", "int", "rows of the output tile", allowed=(16, 32, 64)),
        Param("bn", "int", "columns of the output tile", allowed=(16, 32, 64)),
        Param("bk", "int", "depth per step", allowed=(8, 16, 32)),
        *_warps,
        Param("parts", "int", "partitions of K (a power of two)", allowed=(2, 4, 8, 16, 32, 64)),
    ),
    constraints=(
        *_simdgroup_tiling,
        threads_fit(lambda p: 32 * p["wm"] * p["wn"], "32 * wm * wn threads"),
        *_tiles_fit,
        Constraint.on_call_expr("parts * bk <= K", "every part gets at least one step"),
        Constraint.on_call_expr("batch == 1"),
    ),
)

METAL_GEMV = Family(
    op="matmul", backend="metal", name="gemv",
    doc="Matrix-vector product for M == 1 or N == 1, in MLX's arrangement: threadgroups of "
        "bm x bn simdgroups, each simdgroup an sm x sn arrangement of its 32 threads, each "
        "thread tm x tn elements, where bm/sm/tm run along the matrix's rows and bn/sn/tn "
        "along its contiguous columns as it lies in memory (stored [out, K] the columns are "
        "the reduction; stored [K, out] the rows are).",
    params=(
        Param("bm", "int", "simdgroups along the matrix's rows", allowed=(1, 2, 4, 8)),
        Param("bn", "int", "simdgroups along the matrix's columns", allowed=(1, 2, 4, 8, 16)),
        Param("sm", "int", "threads of a simdgroup along the rows", allowed=(1, 2, 4, 8, 16, 32)),
        Param("sn", "int", "threads of a simdgroup along the columns", allowed=(1, 2, 4, 8, 16, 32)),
        Param("tm", "int", "rows per thread", allowed=(1, 4)),
        Param("tn", "int", "contiguous columns per thread", allowed=(1, 4)),
    ),
    constraints=(
        Constraint("sm * sn == 32 (one simdgroup)", lambda p, chip, call: p["sm"] * p["sn"] == 32),
        threads_fit(lambda p: 32 * p["bm"] * p["bn"], "32 * bm * bn threads"),
        Constraint.on_call_expr("M == 1 or N == 1"),
    ),
)

METAL_GEMV_WIDE = Family(
    op="matmul", backend="metal", name="gemv_wide",
    doc="A few rows (2-15) of f16/bf16 against a transposed weight: each threadgroup streams "
        "four weight rows once for up to `vecs` input vectors held in registers.",
    params=(
        Param("vecs", "int", "input vectors per pass over the weight", lo=1, hi=5, search=(1, 2, 3, 4, 5)),
        Param("lanes", "int", "threads of each simdgroup along K (16: half a simdgroup per "
              "row, so twice the rows in flight)", allowed=(16, 32)),
        Param("split_passes", "bool", "run the passes over the weight as separate threadgroup "
              "columns (no: one threadgroup column loops over them)"),
    ),
    constraints=(
        Constraint.on_call_expr("cdiv(M, vecs) <= 3", "at most three passes over the weight"),
        Constraint.on_call_expr("M >= 2 and N >= 2"),
        Constraint.on_call_expr("transpose_b and not transpose_a", "a weight stored [N, K]"),
        Constraint.on_call_expr("dtype in {f16, bf16}"),
        Constraint.on_call_expr("K % 4 == 0", "four-element loads"),
    ),
)

METAL_MATMUL_FAMILIES: tuple[Family, ...] = (METAL_GEMM, METAL_SPLITK, METAL_GEMV, METAL_GEMV_WIDE,
                                             builtin("matmul", "metal"))
