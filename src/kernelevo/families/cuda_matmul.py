"""CUDA matmul families (templates in cuda/): tensor-core MMA (m16n8k16) for f16/bf16,
a multi-stage asynchronous copy pipeline, the chip's shared memory per block."""

from __future__ import annotations

from .gpu_common import builtin, itemsize, memory_fit, threads_fit
from .schema import Constraint, Family, Param


def _pipeline_bytes(p, call) -> int:
    return p.get("stages", 1) * (p["bm"] * p["bk"] + p["bk"] * p["bn"]) * itemsize(call)


_warp_tiling = (
    Constraint("bm % (16 * wm) == 0 (whole m16n8k16 fragments per warp)",
               lambda p, chip, call: p["bm"] % (16 * p["wm"]) == 0),
    Constraint("bn % (8 * wn) == 0", lambda p, chip, call: p["bn"] % (8 * p["wn"]) == 0),
    Constraint("bk % 16 == 0", lambda p, chip, call: p["bk"] % 16 == 0),
    threads_fit(lambda p: 32 * p["wm"] * p["wn"], "32 * wm * wn threads"),
    memory_fit(_pipeline_bytes, "stages * (bm * bk + bk * bn) * itemsize"),
)

_tile_params = (
    Param("bm", "int", "rows of the output tile per block", allowed=(16, 32, 64, 128, 256)),
    Param("bn", "int", "columns of the output tile per block", allowed=(16, 32, 64, 128, 256)),
    Param("bk", "int", "depth per pipeline stage", allowed=(16, 32, 64)),
    Param("wm", "int", "warps along M", allowed=(1, 2, 4, 8)),
    Param("wn", "int", "warps along N", allowed=(1, 2, 4, 8)),
    Param("stages", "int", "shared-memory buffers in flight (asynchronous copies)",
          allowed=(1, 2, 3, 4, 5)),
)

CUDA_GEMM = Family(
    op="matmul", backend="cuda", name="gemm",
    doc="Tiled tensor-core GEMM with a `stages`-deep cp.async pipeline, a swizzled block "
        "order and a fused epilogue.",
    params=(
        *_tile_params,
        Param("swizzle", "int", "log2 of the block-order swizzle (0: row-major order)",
              lo=0, hi=4, search=(0, 1, 2, 3)),
        Param("epilogue", "choice", "bias/activation/residual/scale in the kernel (fused) or "
              "as separate MLX ops (separate)", choices=("fused", "separate")),
    ),
    constraints=_warp_tiling,
)

CUDA_SPLITK = Family(
    op="matmul", backend="cuda", name="splitk",
    doc="Split-K GEMM: `parts` blocks per output tile reduce slices of K into f32 partials "
        "that a second kernel sums.",
    params=(*_tile_params,
            Param("parts", "int", "partitions of K", allowed=(2, 4, 8, 16, 32, 64))),
    constraints=(
        *_warp_tiling,
        Constraint("parts * bk <= K", lambda p, chip, call: p["parts"] * p["bk"] <= call["K"],
                   on_call=True),
    ),
)

CUDA_GEMV = Family(
    op="matmul", backend="cuda", name="gemv",
    doc="Skinny products (M <= 16, LLM decode): each warp streams rows of the weight once "
        "with vectorised loads and reduces with warp shuffles.",
    params=(
        Param("warps", "int", "warps per block", allowed=(1, 2, 4, 8, 16)),
        Param("rows", "int", "output columns (weight rows) per warp", allowed=(1, 2, 4, 8)),
        Param("vec", "int", "elements per vector load", allowed=(1, 2, 4, 8)),
    ),
    constraints=(
        threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"),
        Constraint("M <= 16", lambda p, chip, call: call["M"] <= 16, on_call=True),
    ),
)

CUDA_MATMUL_FAMILIES: tuple[Family, ...] = (CUDA_GEMM, CUDA_SPLITK, CUDA_GEMV,
                                            builtin("matmul", "cuda"))
