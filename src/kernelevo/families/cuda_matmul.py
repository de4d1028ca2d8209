"""CUDA matmul families (templates in cuda/): m16n8k16 tensor-core MMA for f16/bf16 with
f32 accumulators, a multi-stage cp.async pipeline, the chip's shared memory per block.

Registers are not declared by a CUDA kernel that MLX's cuda_kernel wraps (it writes the
signature, so there is no __launch_bounds__): a block of T threads fits only if each thread
needs at most 65536 / T registers. The accumulator constraints below keep every
configuration inside that (tests/test_cuda_lowering.py compiles the search space with
NVRTC where it is installed and checks the resource report)."""

from __future__ import annotations

from .gpu_common import ITEMSIZE_EXPR, builtin, itemsize, threads_fit
from .schema import Constraint, Family, Param

SMEM_PAD = 8  # elements of padding per shared-memory row (cuda/gemm.cuh)
EPILOGUE = Param("epilogue", "choice", "bias/activation/residual/scale applied in the kernel "
                 "(fused) or as separate MLX ops after it (separate)", choices=("fused", "separate"))


def pow2ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def gemm_smem(p, call) -> int:
    """Shared memory of cuda/gemm.cuh's pipeline: `stages` buffers of an A and a B tile,
    rows padded by 16 bytes. Without a call, the larger layout of each operand (the
    families take only 16-bit types)."""
    bm, bn, bk = p["bm"], p["bn"], p["bk"]
    if call and "transpose_a" in call:
        a = bk * (bm + SMEM_PAD) if call["transpose_a"] else bm * (bk + SMEM_PAD)
        b = bn * (bk + SMEM_PAD) if call["transpose_b"] else bk * (bn + SMEM_PAD)
    else:
        a = max(bk * (bm + SMEM_PAD), bm * (bk + SMEM_PAD))
        b = max(bn * (bk + SMEM_PAD), bk * (bn + SMEM_PAD))
    return p.get("stages", 1) * (a + b) * (itemsize(call) if call else 2)


def _registers_fit(p) -> bool:
    threads = 32 * p["wm"] * p["wn"]
    return p["bm"] * p["bn"] // threads + 96 <= min(224 if threads >= 128 else 160, 65536 // threads)


def _tensor_core_dtype():
    return Constraint.on_call_expr("dtype in {f16, bf16}", "tensor-core MMA")


_warp_tiling = (
    Constraint("bm % (16 * wm) == 0 (whole 16-row fragments per warp)",
               lambda p, chip, call: p["bm"] % (16 * p["wm"]) == 0),
    Constraint("bn % (16 * wn) == 0 (pairs of 8-column fragments per warp)",
               lambda p, chip, call: p["bn"] % (16 * p["wn"]) == 0),
    threads_fit(lambda p: 32 * p["wm"] * p["wn"], "32 * wm * wn threads"),
    # ptxas gives a thread up to 255 registers and 256 x 255 fits a block's 65536, so a
    # block of 256 threads always launches. A larger one does not when the kernel needs more
    # than 65536 / threads (splitk bm=256 bn=64 bk=64 wm=4 wn=4: 162 registers x 512
    # threads on an H200), and MLX does not report the failed launch: the output is garbage.
    Constraint("wm * wn <= 8 (at most 256 threads: any register count launches)",
               lambda p, chip, call: p["wm"] * p["wn"] <= 8),
    Constraint("bm * bn / threads + 96 <= min(224 if threads >= 128 else 160, 65536 / threads), "
               "threads = 32 * wm * wn (accumulators plus working registers within a thread's "
               "255 and the block's 65536)",
               lambda p, chip, call: _registers_fit(p)),
    Constraint("stages * (A tile + B tile) * 2 <= chip.threadgroup_memory for the larger layout "
               "of each operand (rows padded by 16 bytes)",
               lambda p, chip, call: gemm_smem(p, None) <= chip.threadgroup_memory, without_call=True),
    Constraint.on_call_expr(
        f"stages * ((bk * (bm + {SMEM_PAD}) if transpose_a else bm * (bk + {SMEM_PAD})) + "
        f"(bn * (bk + {SMEM_PAD}) if transpose_b else bk * (bn + {SMEM_PAD}))) * {ITEMSIZE_EXPR} "
        "<= chip.threadgroup_memory", "the call's layouts, as cuda/gemm.cuh stores them"),
    _tensor_core_dtype(),
)

_tile_params = (
    Param("bm", "int", "rows of the output tile per block", allowed=(16, 32, 64, 128, 256)),
    Param("bn", "int", "columns of the output tile per block", allowed=(16, 32, 64, 128, 256)),
    Param("bk", "int", "depth per pipeline stage", allowed=(16, 32, 64)),
    Param("wm", "int", "warps along M", allowed=(1, 2, 4, 8)),
    Param("wn", "int", "warps along N", allowed=(1, 2, 4, 8)),
    Param("stages", "int", "shared-memory buffers in flight (cp.async; 1: load, then compute)",
          allowed=(1, 2, 3, 4, 5)),
)

CUDA_GEMM = Family(
    op="matmul", backend="cuda", name="gemm",
    doc="Tiled tensor-core GEMM (m16n8k16 MMA, f32 accumulators) with a `stages`-deep "
        "cp.async pipeline, ldmatrix fragments for every transpose, a swizzled block order "
        "and a fused epilogue.",
    params=(
        *_tile_params,
        Param("swizzle", "int", "log2 of the tile rows a group of blocks walks before moving "
              "right (0: row-major order)", lo=0, hi=4, search=(0, 1, 2, 3)),
        EPILOGUE,
    ),
    constraints=_warp_tiling,
)

CUDA_SPLITK = Family(
    op="matmul", backend="cuda", name="splitk",
    doc="Split-K GEMM: `parts` blocks per output tile each reduce a slice of K into f32 "
        "partials; a second kernel sums them and applies the epilogue.",
    params=(*_tile_params,
            Param("parts", "int", "partitions of K", allowed=(2, 4, 8, 16, 32, 64)),
            EPILOGUE),
    constraints=(
        *_warp_tiling,
        Constraint.on_call_expr("parts * bk <= K", "every part gets at least one step"),
    ),
)


def gemv_registers(p, call) -> int:
    """An upper estimate of a thread's registers in cuda/gemv.cuh (checked against ptxas's
    report by tests/test_cuda_nvrtc.py)."""
    return 2 * pow2ceil(call["M"]) * max(p["rows"], p["vec"]) + 40


def gemv_smem(p, call) -> int:
    """Shared memory of cuda/gemv.cuh: the partial sums of all warps but one, when the
    weight is stored [K, N] (not transpose_b)."""
    if call.get("transpose_b", False):
        return 0
    return (p["warps"] - 1) * pow2ceil(call.get("M", 16)) * 32 * p["vec"] * 4


CUDA_GEMV = Family(
    op="matmul", backend="cuda", name="gemv",
    doc="Skinny products (M <= 16, LLM decode) on CUDA cores, reading the weight once: for a "
        "weight stored [N, K] each warp streams `rows` weight rows with `vec`-element loads "
        "and sums with shuffles; for [K, N] each lane owns `vec` columns and the warps split "
        "K, `rows` rows in flight each.",
    params=(
        Param("warps", "int", "warps per block", allowed=(1, 2, 4, 8, 16)),
        Param("rows", "int", "weight rows in flight per warp", allowed=(1, 2, 4, 8)),
        Param("vec", "int", "elements per vector load", allowed=(1, 2, 4, 8)),
        EPILOGUE,
    ),
    constraints=(
        threads_fit(lambda p: 32 * p["warps"], "32 * warps threads"),
        Constraint.on_call_expr("M <= 16"),
        Constraint.on_call_expr("2 * pow2ceil(M) * max(rows, vec) + 40 <= min(168, 65536 // (32 * warps))",
                                "accumulators in registers"),
        Constraint.on_call_expr("transpose_b or (warps - 1) * pow2ceil(M) * 32 * vec * 4 <= "
                                "chip.threadgroup_memory", "the warps' partial sums"),
    ),
)

CUDA_MATMUL_FAMILIES: tuple[Family, ...] = (CUDA_GEMM, CUDA_SPLITK, CUDA_GEMV,
                                            builtin("matmul", "cuda"))
