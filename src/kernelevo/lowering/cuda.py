"""Lowering to the CUDA templates (cuda/ at the repository root, installed as
kernelevo/templates/cuda), launched through MLX's `fast::cuda_kernel`.

The kernel bodies are one call into the family's template, with every choice a template
argument (`constexpr` in the body MLX writes); see lowering/__init__.py for the contract.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..config import KernelConfig
from ..families.cuda_attention import MAX_SLICES, decode_rows, decode_smem, flash_smem
from ..families.cuda_matmul import gemm_smem, gemv_smem, pow2ceil
from ..features import Epilogue, is_causal
from . import LoweredKernel, Plan, cdiv, f32_bits, template

BACKEND = "cuda"
MX_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
MAX_GRID_YZ = 65535
MERGE_THREADS = 128

_COMMON = ("ke_common.cuh", "ke_ptx.cuh")
GEMM_HEADER = _COMMON + ("tile.cuh", "gemm.cuh")
GEMV_HEADER = _COMMON + ("gemv.cuh",)
DECODE_HEADER = _COMMON + ("attention_common.cuh", "attention_decode.cuh")
MERGE_HEADER = _COMMON + ("attention_common.cuh", "attention_merge.cuh")
FLASH_HEADER = _COMMON + ("tile.cuh", "attention_common.cuh", "attention_flash.cuh")


@lru_cache(maxsize=None)
def header(*files: str) -> str:
    """Template files as a kernel's header, without comments and blank lines: MLX copies
    and hashes a CUDA kernel's whole source on every launch (the templates keep no // inside
    string literals)."""
    lines = (re.sub(r"\s*//.*$", "", line).rstrip() for line in template(BACKEND, *files).splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def _check_grid(grid: tuple[int, int, int], what: str) -> tuple[int, int, int]:
    if grid[0] >= 2**31 or grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{what}: the launch grid {grid} exceeds CUDA's limits "
                         f"(x < 2^31 threads, y and z <= {MAX_GRID_YZ} blocks)")
    return grid


def _name(config: KernelConfig, *extra: str) -> str:
    return "_".join((config.name,) + extra)


# ---- matmul --------------------------------------------------------------------------


def lower_matmul(config: KernelConfig, features: dict, *, epilogue: Epilogue = Epilogue(),
                 a_batched: bool = True, b_batched: bool = True) -> Plan:
    """The kernels of a matmul `batch x (M x K) @ (K x N)` (operands as features say:
    transposed or not), with a batch axis on a and/or b (a_batched / b_batched; a
    broadcast operand has none). The result `out` is [batch, M, N]. With epilogue=separate
    the plan's `pending` is the epilogue the op must still apply."""
    return _lower_matmul(config, _key(features), epilogue, a_batched, b_batched)


def _key(features: dict) -> tuple:
    return tuple(sorted(features.items()))


@lru_cache(maxsize=4096)
def _lower_matmul(config: KernelConfig, features: tuple, epilogue: Epilogue, a_batched: bool,
                  b_batched: bool) -> Plan:
    f = dict(features)
    if config.backend != BACKEND or config.op != "matmul":
        raise ValueError(f"{config} is not a CUDA matmul configuration")
    p = config.as_dict()
    fused = p.get("epilogue") == "fused"
    kernel_epilogue = epilogue if fused else Epilogue()
    pending = None if fused or epilogue.empty else epilogue
    M, N, K, batch, dtype = f["M"], f["N"], f["K"], f["batch"], f["dtype"]
    ta, tb = bool(f["transpose_a"]), bool(f["transpose_b"])
    alpha = f32_bits(epilogue.alpha if epilogue.alpha is not None else 1.0)
    if config.family == "gemv":
        return Plan((_gemv(config, p, M, N, K, batch, dtype, tb, kernel_epilogue, alpha,
                           a_batched, b_batched),), pending=pending)
    if config.family not in ("gemm", "splitk"):
        raise ValueError(f"no CUDA kernel for the matmul family {config.family!r}")

    bm, bn, bk, wm, wn, stages = (p[k] for k in ("bm", "bn", "bk", "wm", "wn", "stages"))
    threads = 32 * wm * wn
    tiles = cdiv(M, bm) * cdiv(N, bn)
    split = config.family == "splitk"
    chunk = cdiv(cdiv(K, p["parts"]), bk) * bk if split else K
    parts = cdiv(K, chunk) if split else 1
    smem = gemm_smem(p, f)
    tile_args = (("BM", bm), ("BN", bn), ("BK", bk), ("WM", wm), ("WN", wn), ("STAGES", stages),
                 ("SWIZZLE", p.get("swizzle", 0)), ("TRANS_A", ta), ("TRANS_B", tb))
    sizes = (M, N, K, int(a_batched), int(b_batched), alpha, chunk, parts)
    grid = _check_grid((tiles * threads, batch, parts), config.to_dsl())
    layout = f"{dtype}_ta{int(ta)}_tb{int(tb)}"
    if not split:
        body = (f"ke::gemm<T, BM, BN, BK, WM, WN, STAGES, SWIZZLE, TRANS_A, TRANS_B, false, "
                f"HAS_BIAS, ACT, HAS_RESIDUAL, HAS_SCALE>(a, b, {kernel_epilogue.pointers()}, sizes, out);")
        kernel = LoweredKernel(
            name=_name(config, layout, kernel_epilogue.tag()), backend=BACKEND, source=body,
            header=header(*GEMM_HEADER),
            input_names=("a", "b") + kernel_epilogue.inputs() + ("sizes",), output_names=("out",),
            template_args=(("T", MX_DTYPE[dtype]),) + tile_args + kernel_epilogue.template_args(),
            grid=grid, threadgroup=(threads, 1, 1), shared_memory=smem,
            output_shapes=((batch, M, N),), output_dtypes=(MX_DTYPE[dtype],), sizes=sizes)
        return Plan((kernel,), pending=pending)

    body = ("ke::gemm<T, BM, BN, BK, WM, WN, STAGES, SWIZZLE, TRANS_A, TRANS_B, true, false, 0, "
            "false, false>(a, b, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), "
            "sizes, partials);")
    partial = LoweredKernel(
        name=_name(config, layout), backend=BACKEND, source=body,
        header=header(*GEMM_HEADER), input_names=("a", "b", "sizes"),
        output_names=("partials",), template_args=(("T", MX_DTYPE[dtype]),) + tile_args,
        grid=grid, threadgroup=(threads, 1, 1), shared_memory=smem,
        output_shapes=((parts, batch, M, N),), output_dtypes=("float32",), sizes=sizes)
    reduce_threads = 256
    reduce = LoweredKernel(
        name=f"splitk_reduce_{dtype}_{kernel_epilogue.tag()}", backend=BACKEND,
        source=(f"ke::splitk_reduce<T, HAS_BIAS, ACT, HAS_RESIDUAL, HAS_SCALE>(partials, "
                f"{kernel_epilogue.pointers()}, sizes, out);"),
        header=header(*GEMM_HEADER),
        input_names=("partials",) + kernel_epilogue.inputs() + ("sizes",), output_names=("out",),
        template_args=(("T", MX_DTYPE[dtype]),) + kernel_epilogue.template_args(),
        grid=_check_grid((cdiv(M * N, reduce_threads) * reduce_threads, batch, 1), config.to_dsl()),
        threadgroup=(reduce_threads, 1, 1), shared_memory=0,
        output_shapes=((batch, M, N),), output_dtypes=(MX_DTYPE[dtype],), sizes=sizes)
    return Plan((partial, reduce), pending=pending)


def _gemv(config, p, M, N, K, batch, dtype, tb, epilogue, alpha, a_batched, b_batched) -> LoweredKernel:
    warps, rows, vec = p["warps"], p["rows"], p["vec"]
    mb = pow2ceil(M)
    threads = 32 * warps
    blocks = cdiv(N, warps * rows) if tb else cdiv(N, 32 * vec)
    body = (f"ke::gemv<T, MB, WARPS, ROWS, VEC, TRANS_B, HAS_BIAS, ACT, HAS_RESIDUAL, HAS_SCALE>"
            f"(a, b, {epilogue.pointers()}, sizes, out);")
    return LoweredKernel(
        name=_name(config, f"{dtype}_mb{mb}_tb{int(tb)}", epilogue.tag()), backend=BACKEND,
        source=body, header=header(*GEMV_HEADER),
        input_names=("a", "b") + epilogue.inputs() + ("sizes",), output_names=("out",),
        template_args=(("T", MX_DTYPE[dtype]), ("MB", mb), ("WARPS", warps), ("ROWS", rows),
                       ("VEC", vec), ("TRANS_B", tb)) + epilogue.template_args(),
        grid=_check_grid((blocks * threads, batch, 1), config.to_dsl()), threadgroup=(threads, 1, 1),
        shared_memory=gemv_smem(p, {"M": M, "transpose_b": tb}),
        output_shapes=((batch, M, N),), output_dtypes=(MX_DTYPE[dtype],),
        sizes=(M, N, K, alpha, int(a_batched), int(b_batched)))


# ---- attention -----------------------------------------------------------------------

MASK_KINDS = {"none": 0, "causal": 0, "bool": 1, "additive": 2}


def lower_attention(config: KernelConfig, features: dict, *, scale: float,
                    mask_dtype: str | None = None,
                    mask_strides: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Plan:
    """The kernels of attention over q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (row-major),
    with the mask (bool or additive, features["mask"]) given as an array of dtype
    mask_dtype whose element (b, h, i, j) is at b*s0 + h*s1 + i*s2 + j*s3 (mask_strides,
    0 along broadcast axes). The result `out` is [B, Hq, Lq, D]."""
    return _lower_attention(config, _key(features), float(scale), mask_dtype, tuple(mask_strides))


@lru_cache(maxsize=4096)
def _lower_attention(config: KernelConfig, features: tuple, scale: float, mask_dtype: str | None,
                     mask_strides: tuple) -> Plan:
    f = dict(features)
    if config.backend != BACKEND or config.op != "attention":
        raise ValueError(f"{config} is not a CUDA attention configuration")
    p = config.as_dict()
    B, Hq, Hkv, Lq, Lk, D = (f[k] for k in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"))
    dtype = f["dtype"]
    kind = MASK_KINDS[f["mask"]]
    if kind and mask_dtype is None:
        raise ValueError(f"a {f['mask']} mask needs its array")
    inputs = ("q", "k", "v") + (("mask",) if kind else ()) + ("sizes",)
    mask_arg = "mask" if kind else "static_cast<const bool*>(nullptr)"
    common_args = (("T", MX_DTYPE[dtype]), ("MaskT", mask_dtype if kind else "bool"), ("D", D))
    causal = is_causal(f)
    flags = (("SCALE_Q", p["scale_at"] == "q"), ("MASK", kind), ("CAUSAL", causal),
             ("SOFTCAP", f["softcap"] > 0))
    tag = (f"{dtype}_d{D}_m{kind}{mask_dtype if kind else ''}_c{int(causal)}"
           f"_s{int(f['softcap'] > 0)}")
    out_shape = (B, Hq, Lq, D)

    def sizes(slices: int = 1, chunk: int = 0) -> tuple[int, ...]:
        return (B, Hq, Hkv, Lq, Lk, f32_bits(scale), f32_bits(f["softcap"]), f["window"],
                *mask_strides, slices, chunk)

    if config.family == "flash":
        bq, bk, warps, stages, pack = p["bq"], p["bk"], p["warps"], p["stages"], bool(p["pack_gqa"])
        rows = Lq * (Hq // Hkv if pack else 1)
        chunk = cdiv(cdiv(Lk, p["kv_splits"]), bk) * bk
        slices = cdiv(Lk, chunk)
        split = slices > 1
        outs = ("o_part, ml_part);" if split else
                "static_cast<float*>(nullptr), static_cast<float*>(nullptr));")
        body = ("ke::attention_flash<T, MaskT, D, BQ, BK, WARPS, STAGES, SKIP, SCALE_Q, MASK, CAUSAL, "
                f"SOFTCAP, PACK, SPLIT>(q, k, v, {mask_arg}, sizes, "
                + ("static_cast<T*>(nullptr), " if split else "out, ") + outs)
        kernel = LoweredKernel(
            name=_name(config, tag, f"split{int(split)}"), backend=BACKEND, source=body,
            header=header(*FLASH_HEADER), input_names=inputs,
            output_names=("o_part", "ml_part") if split else ("out",),
            template_args=common_args + (("BQ", bq), ("BK", bk), ("WARPS", warps),
                                         ("STAGES", stages), ("SKIP", p["skip_masked_blocks"])) + flags
            + (("PACK", pack), ("SPLIT", split)),
            grid=_check_grid((cdiv(rows, bq) * 32 * warps, B * (Hkv if pack else Hq), slices), config.to_dsl()),
            threadgroup=(32 * warps, 1, 1), shared_memory=flash_smem(p, f),
            output_shapes=((B * Hq * Lq, slices, D), (B * Hq * Lq, slices, 2)) if split else (out_shape,),
            output_dtypes=("float32", "float32") if split else (MX_DTYPE[dtype],),
            sizes=sizes(slices, chunk))
        return Plan((kernel, _merge(dtype, D, B * Hq * Lq, out_shape, sizes(slices, chunk), config)) if split
                    else (kernel,))

    if config.family not in ("decode", "decode_split"):
        raise ValueError(f"no CUDA kernel for the attention family {config.family!r}")
    warps, lanes, pack = p["warps"], p["key_lanes"], bool(p["pack_gqa"])
    rows = decode_rows(p, f)
    threads = 32 * warps
    heads = B * (Hkv if pack else Hq)
    split = config.family == "decode_split"
    groups = threads // lanes
    chunk = cdiv(cdiv(Lk, p["blocks"]), groups) * groups if split else Lk
    slices = cdiv(Lk, chunk) if split else 1
    assert slices <= MAX_SLICES
    decode_args = common_args + (("R", rows), ("G", lanes), ("WARPS", warps), ("PACK", pack),
                                 ("SPLIT", split)) + flags
    body = ("ke::attention_decode<T, MaskT, D, R, G, WARPS, PACK, SPLIT, SCALE_Q, MASK, CAUSAL, "
            f"SOFTCAP>(q, k, v, {mask_arg}, sizes, "
            + ("static_cast<T*>(nullptr), o_part, ml_part);" if split else
               "out, static_cast<float*>(nullptr), static_cast<float*>(nullptr));"))
    first = LoweredKernel(
        name=_name(config, tag, f"r{rows}"), backend=BACKEND, source=body,
        header=header(*DECODE_HEADER), input_names=inputs,
        output_names=("o_part", "ml_part") if split else ("out",),
        template_args=decode_args,
        grid=_check_grid((slices * threads, heads, 1), config.to_dsl()), threadgroup=(threads, 1, 1),
        shared_memory=decode_smem(p, f),
        output_shapes=((B * Hq * Lq, slices, D), (B * Hq * Lq, slices, 2)) if split else (out_shape,),
        output_dtypes=("float32", "float32") if split else (MX_DTYPE[dtype],),
        sizes=sizes(slices, chunk))
    if not split:
        return Plan((first,))
    return Plan((first, _merge(dtype, D, B * Hq * Lq, out_shape, sizes(slices, chunk), config)))


def _merge(dtype: str, D: int, rows: int, out_shape, sizes, config) -> LoweredKernel:
    """The second pass of split-KV attention: one block per output row merges the slices."""
    return LoweredKernel(
        name=f"attention_merge_{dtype}_d{D}", backend=BACKEND,
        source="ke::attention_merge<T, D>(o_part, ml_part, sizes, out);",
        header=header(*MERGE_HEADER), input_names=("o_part", "ml_part", "sizes"),
        output_names=("out",), template_args=(("T", MX_DTYPE[dtype]), ("D", D)),
        grid=_check_grid((rows * MERGE_THREADS, 1, 1), config.to_dsl()),
        threadgroup=(MERGE_THREADS, 1, 1), shared_memory=(MAX_SLICES + 32) * 4,
        output_shapes=(out_shape,), output_dtypes=(MX_DTYPE[dtype],), sizes=sizes)


# ---- the source MLX compiles ---------------------------------------------------------

CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
              "bool": "bool", "int32": "int32_t"}
MLX_PRELUDE = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def mlx_source(kernel: LoweredKernel, input_dtypes: tuple[str, ...], prelude: str = MLX_PRELUDE,
               header: str | None = None) -> tuple[str, str]:
    """(function name, translation unit): the text MLX 0.32's fast::cuda_kernel builds
    from this kernel for inputs of the given dtypes (mlx/backend/cuda/custom_kernel.cpp,
    build_kernel), for compiling it elsewhere — NVRTC in the tests, or the CPU emulator
    with its own prelude and header."""
    func = "custom_kernel_" + kernel.name
    lines = [prelude, kernel.header if header is None else header,
             "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
             f"__global__ void {func}(\n"]
    for name, dtype in zip(kernel.input_names, input_dtypes):
        lines.append(f"    const {CUDA_TYPES[dtype]}* {name},\n")
    for i, (name, dtype) in enumerate(zip(kernel.output_names, kernel.output_dtypes)):
        last = i == len(kernel.output_names) - 1
        lines.append(f"    {CUDA_TYPES[dtype]}* {name}" + (") {\n" if last else ",\n"))
    for name, value in kernel.template_args:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};\n")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};\n")
        else:
            lines.append(f"  using {name} = {CUDA_TYPES[value]};\n")
    lines.append("\n" + kernel.source + "\n}\n\n} // namespace mlx::core::cu\n")
    return func, "".join(lines)
