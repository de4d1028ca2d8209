"""Lowering to the Metal templates (metal/ at the repository root, installed as
kernelevo/templates/metal), launched through MLX's `fast::metal_kernel`.

A kernel body is the threadgroup arrays its template needs (MSL allows them only at kernel
scope) and one call into the family's template, every choice a template argument; MLX
writes the [[kernel]] signature around it. The body names the thread-position attributes
it uses, which is how MLX knows to add them to the signature. Limits are the schema's
(families/metal_*.py, checked when a rule is selected); lowering asserts them again on
what it generates. See lowering/__init__.py for the contract.
"""

from __future__ import annotations

from functools import lru_cache

from ..config import KernelConfig
from ..families.metal_attention import flash_tile_bytes
from ..families.metal_matmul import gemm_tile_bytes
from ..features import Epilogue, is_causal
from . import LoweredKernel, Plan, cdiv, f32_bits, template

BACKEND = "metal"
MX_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
MAX_THREADGROUP_MEMORY = 32768  # bytes, every Apple GPU MLX supports
MAX_THREADS = 1024
MAX_GRID = 2**31 - 1  # threads per grid dimension (MLX passes them as int)
MERGE_SLICES = 1024  # attention_merge's weight buffer (metal/attention.h)
REDUCE_THREADS = 256
MASK_KINDS = {"none": 0, "causal": 0, "bool": 1, "additive": 2}

GEMM_HEADER = ("ke_common.h", "gemm.h")
GEMV_HEADER = ("ke_common.h", "gemv.h")
ATTENTION_HEADER = ("ke_common.h", "attention.h")

# The attributes the bodies pass to the templates (MLX adds those a body names).
_TG, _SG, _LANE, _TID = ("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                         "thread_index_in_simdgroup", "thread_index_in_threadgroup")


def _kernel(config: KernelConfig, *, name: str, body: str, header: tuple[str, ...], inputs, outputs,
            template_args, grid, threads: int, threadgroup_bytes: int, output_shapes, output_dtypes,
            sizes) -> LoweredKernel:
    """A LoweredKernel, after asserting Apple's limits on what was generated (the schema
    keeps configurations within them; a failure here is a bug in a family's constraints)."""
    assert threads <= MAX_THREADS, f"{config.to_dsl()}: {threads} threads per threadgroup"
    assert threads % 32 == 0, f"{config.to_dsl()}: {threads} threads is not whole simdgroups"
    assert threadgroup_bytes <= MAX_THREADGROUP_MEMORY, \
        f"{config.to_dsl()}: {threadgroup_bytes} bytes of threadgroup memory"
    if max(grid) > MAX_GRID:
        raise ValueError(f"{config.to_dsl()}: the launch grid {grid} exceeds Metal's limit of "
                         f"{MAX_GRID} threads per dimension")
    # At least 8 sizes, so MLX binds them in the device address space every time.
    sizes = tuple(sizes) + (0,) * max(0, 8 - len(sizes))
    return LoweredKernel(
        name=name, backend=BACKEND, source=body, header=template(BACKEND, *header),
        input_names=tuple(inputs), output_names=tuple(outputs), template_args=tuple(template_args),
        grid=tuple(grid), threadgroup=(threads, 1, 1), shared_memory=0,
        output_shapes=tuple(tuple(s) for s in output_shapes), output_dtypes=tuple(output_dtypes),
        sizes=sizes)


def _key(features: dict) -> tuple:
    return tuple(sorted(features.items()))


def _flags(args) -> str:
    return ", ".join(name for name, _ in args)


# ---- matmul --------------------------------------------------------------------------


def lower_matmul(config: KernelConfig, features: dict, *, epilogue: Epilogue = Epilogue(),
                 a_batched: bool = True, b_batched: bool = True) -> Plan:
    """The kernels of a matmul `batch x (M x K) @ (K x N)` (operands as the features say:
    transposed or not), a and/or b with a batch axis (a_batched / b_batched; a broadcast
    operand has none). The result `out` is [batch, M, N]. `gemm epilogue=separate` leaves
    the epilogue to the op (the plan's `pending`); the other families apply it in their
    output stage."""
    return _lower_matmul(config, _key(features), epilogue, a_batched, b_batched)


@lru_cache(maxsize=4096)
def _lower_matmul(config: KernelConfig, features: tuple, epilogue: Epilogue, a_batched: bool,
                  b_batched: bool) -> Plan:
    f = dict(features)
    if config.backend != BACKEND or config.op != "matmul":
        raise ValueError(f"{config} is not a Metal matmul configuration")
    p = config.as_dict()
    fused = p.get("epilogue", "fused") == "fused"
    ep = epilogue if fused else Epilogue()
    pending = None if fused or epilogue.empty else epilogue
    M, N, K, batch, dtype = f["M"], f["N"], f["K"], f["batch"], f["dtype"]
    ta, tb = bool(f["transpose_a"]), bool(f["transpose_b"])
    alpha = f32_bits(epilogue.alpha if epilogue.alpha is not None else 1.0)
    inputs = ("a", "b") + ep.inputs() + ("sizes",)
    bias = "bias" if ep.bias else "a"  # an absent input is replaced by one never read
    residual = "residual" if ep.residual else "a"
    ep_args = ep.template_args()
    dtype_arg = (("T", MX_DTYPE[dtype]),)
    out = dict(output_shapes=((batch, M, N),), output_dtypes=(MX_DTYPE[dtype],))

    if config.family == "gemv":
        mat_a = N == 1  # a [M, K] times the vector b; else the vector a times b
        out_len = M if mat_a else N
        mat_t = ta if mat_a else not tb  # the matrix stored [K, out]
        bm, bn, sm, sn, tm, tn = (p[k] for k in ("bm", "bn", "sm", "sn", "tm", "tn"))
        threads = 32 * bm * bn
        per_group = bn * sn * tn if mat_t else bm * sm * tm
        scratch = (bm * bn * sn * tn if bm > 1 else 1) if mat_t else (bn * bm * sm * tm if bn > 1 else 1)
        args = dtype_arg + (("BM", bm), ("BN", bn), ("SM", sm), ("SN", sn), ("TM", tm), ("TN", tn),
                            ("MAT_T", mat_t), ("MAT_A", mat_a)) + ep_args
        body = (f"threadgroup float ke_scratch[ke::GemvScratch<BM, BN, SM, SN, TM, TN, MAT_T>::SIZE];\n"
                f"ke::gemv<{_flags(args)}>(a, b, {bias}, {residual}, sizes, out, ke_scratch, "
                f"{_TG}, {_SG}, {_LANE});")
        kernel = _kernel(config, name=f"{config.name}_{dtype}_ma{int(mat_a)}_mt{int(mat_t)}_{ep.tag()}",
                         body=body, header=GEMV_HEADER, inputs=inputs, outputs=("out",),
                         template_args=args, grid=(cdiv(out_len, per_group) * threads, 1, batch),
                         threads=threads, threadgroup_bytes=4 * scratch,
                         sizes=(M, N, K, int(a_batched), int(b_batched), alpha, out_len, 0, batch), **out)
        return Plan((kernel,), pending=pending)

    if config.family == "gemv_wide":
        vecs, lanes, split = p["vecs"], p["lanes"], bool(p["split_passes"])
        assert tb and not ta and K % 4 == 0, "gemv_wide takes x [M, K] and a weight [N, K]"
        threads = 4 * lanes  # four weight rows per threadgroup
        passes = cdiv(M, vecs)
        args = dtype_arg + (("VECS", vecs), ("LANES", lanes), ("SPLIT", split)) + ep_args
        body = (f"ke::gemv_wide<{_flags(args)}>(a, b, {bias}, {residual}, sizes, out, {_TG}, {_SG}, "
                f"{_LANE});")
        kernel = _kernel(config, name=f"{config.name}_{dtype}_{ep.tag()}", body=body, header=GEMV_HEADER,
                         inputs=inputs, outputs=("out",), template_args=args,
                         grid=((passes if split else 1) * threads, cdiv(N, 4), batch), threads=threads,
                         threadgroup_bytes=0,
                         sizes=(M, N, K, int(a_batched), int(b_batched), alpha, 0, 0, batch), **out)
        return Plan((kernel,), pending=pending)

    if config.family not in ("gemm", "splitk"):
        raise ValueError(f"no Metal kernel for the matmul family {config.family!r}")
    bm, bn, bk, wm, wn = (p[k] for k in ("bm", "bn", "bk", "wm", "wn"))
    swizzle = p.get("swizzle", 0)
    threads = 32 * wm * wn
    split = config.family == "splitk"
    chunk = cdiv(cdiv(K, p["parts"]), bk) * bk if split else K
    parts = cdiv(K, chunk) if split else 1
    tiles_m, tiles_n = cdiv(M, bm), cdiv(N, bn)
    grid = ((tiles_n << swizzle) * threads, cdiv(tiles_m, 1 << swizzle), batch * parts)
    tile_bytes = gemm_tile_bytes(p, f)
    sizes = (M, N, K, int(a_batched), int(b_batched), alpha, chunk, parts, batch)
    layout = f"{dtype}_ta{int(ta)}_tb{int(tb)}"
    tiles = ("threadgroup T ke_as[ke::GemmTiles<T, BM, BN, BK, TA, TB>::A];\n"
             "threadgroup T ke_bs[ke::GemmTiles<T, BM, BN, BK, TA, TB>::B];\n")
    tile_args = dtype_arg + (("BM", bm), ("BN", bn), ("BK", bk), ("WM", wm), ("WN", wn),
                             ("SWIZZLE", swizzle), ("TA", ta), ("TB", tb))
    positions = f"ke_as, ke_bs, {_TG}, {_SG}, {_LANE}, {_TID}"
    if not split:
        args = tile_args + ep_args
        body = tiles + (f"ke::gemm<T, BM, BN, BK, WM, WN, SWIZZLE, TA, TB, false, {_flags(ep_args)}>"
                        f"(a, b, {bias}, {residual}, sizes, out, {positions});")
        kernel = _kernel(config, name=f"{config.name}_{layout}_{ep.tag()}", body=body, header=GEMM_HEADER,
                         inputs=inputs, outputs=("out",), template_args=args, grid=grid, threads=threads,
                         threadgroup_bytes=tile_bytes, sizes=sizes, **out)
        return Plan((kernel,), pending=pending)

    body = tiles + ("ke::gemm<T, BM, BN, BK, WM, WN, SWIZZLE, TA, TB, true, false, 0, false, false>"
                    f"(a, b, a, a, sizes, partials, {positions});")
    partial = _kernel(config, name=f"{config.name}_{layout}", body=body, header=GEMM_HEADER,
                      inputs=("a", "b", "sizes"), outputs=("partials",), template_args=tile_args,
                      grid=grid, threads=threads, threadgroup_bytes=tile_bytes,
                      output_shapes=((batch * parts, M, N),), output_dtypes=("float32",), sizes=sizes)
    args = dtype_arg + ep_args
    reduce = _kernel(config, name=f"splitk_reduce_{dtype}_{ep.tag()}",
                     body=(f"ke::splitk_reduce<{_flags(args)}>(partials, {'bias' if ep.bias else 'partials'}, "
                           f"{'residual' if ep.residual else 'partials'}, sizes, out, thread_position_in_grid.x);"),
                     header=GEMM_HEADER, inputs=("partials",) + ep.inputs() + ("sizes",), outputs=("out",),
                     template_args=args, grid=(batch * M * N, 1, 1), threads=REDUCE_THREADS,
                     threadgroup_bytes=0, sizes=sizes, **out)
    return Plan((partial, reduce), pending=pending)


# ---- attention -----------------------------------------------------------------------


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
        raise ValueError(f"{config} is not a Metal attention configuration")
    p = config.as_dict()
    B, Hq, Hkv, Lq, Lk, D = (f[k] for k in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"))
    dtype = f["dtype"]
    kind = MASK_KINDS[f["mask"]]
    if kind and mask_dtype is None:
        raise ValueError(f"a {f['mask']} mask needs its array")
    inputs = ("q", "k", "v") + (("mask",) if kind else ()) + ("sizes",)
    mask_arg = "mask" if kind else "q"  # an absent mask is replaced by an input never read
    causal = is_causal(f)
    flags = (("SCALE_Q", p["scale_at"] == "q"), ("MASK", kind), ("CAUSAL", causal),
             ("SOFTCAP", f["softcap"] > 0))
    tag = f"{dtype}_d{D}_m{kind}_c{int(causal)}_s{int(f['softcap'] > 0)}"
    out_shape = (B, Hq, Lq, D)
    dtype_arg = (("T", MX_DTYPE[dtype]), ("D", D))

    def sizes(slices: int = 1, chunk: int = 0) -> tuple[int, ...]:
        return (B, Hq, Hkv, Lq, Lk, f32_bits(scale), f32_bits(f["softcap"]), f["window"],
                *mask_strides, slices, chunk)

    if config.family == "flash":
        bq, bk, wm, wn = p["bq"], p["bk"], p["wm"], p["wn"]
        threads = 32 * wm * wn
        args = dtype_arg + (("BQ", bq), ("BK", bk), ("WM", wm), ("WN", wn),
                            ("SKIP", p["skip_masked_blocks"])) + flags
        body = ("threadgroup T ke_qs[ke::FlashTiles<T, D, BQ, BK>::Q];\n"
                "threadgroup T ke_kvs[ke::FlashTiles<T, D, BQ, BK>::KV];\n"
                f"ke::attention_flash<{_flags(args)}>(q, k, v, {mask_arg}, sizes, out, ke_qs, ke_kvs, "
                f"{_TG}, {_SG}, {_LANE}, {_TID});")
        kernel = _kernel(config, name=f"{config.name}_{tag}", body=body, header=ATTENTION_HEADER,
                         inputs=inputs, outputs=("out",), template_args=args,
                         grid=(cdiv(Lq, bq) * threads, B * Hq, 1), threads=threads,
                         threadgroup_bytes=flash_tile_bytes(p, f), output_shapes=(out_shape,),
                         output_dtypes=(MX_DTYPE[dtype],), sizes=sizes())
        return Plan((kernel,))

    if config.family not in ("decode", "decode_split"):
        raise ValueError(f"no Metal kernel for the attention family {config.family!r}")
    pack = bool(p["pack_gqa"])
    rows = Lq * (Hq // Hkv) if pack else 1  # query rows per threadgroup
    split = config.family == "decode_split"
    simdgroups = 1 if split else p["simdgroups"]  # a split decode slice is one simdgroup
    threads = 32 * simdgroups
    heads = B * (Hkv if pack else Hq * Lq)  # threadgroups along grid y
    chunk = cdiv(Lk, p["blocks"]) if split else Lk
    slices = cdiv(Lk, chunk) if split else 1
    assert slices <= MERGE_SLICES
    args = dtype_arg + (("R", rows), ("S", simdgroups), ("PACK", pack), ("SPLIT", split)) + flags
    red_o, red_ml = _decode_scratch(D, rows, simdgroups)
    outs = ("o_part", "ml_part") if split else ("out",)
    placeholders = "o_part, o_part, ml_part" if split else "out, out, out"
    body = ("threadgroup float ke_red_o[ke::DecodeScratch<D, R, S>::O];\n"
            "threadgroup float ke_red_ml[ke::DecodeScratch<D, R, S>::ML];\n"
            f"ke::attention_decode<{_flags(args)}>(q, k, v, {mask_arg}, sizes, {placeholders}, ke_red_o, "
            f"ke_red_ml, {_TG}, {_SG}, {_LANE}, {_TID});")
    total_rows = B * Hq * Lq
    first = _kernel(config, name=f"{config.name}_{tag}_r{rows}", body=body, header=ATTENTION_HEADER,
                    inputs=inputs, outputs=outs, template_args=args, grid=(slices * threads, heads, 1),
                    threads=threads, threadgroup_bytes=4 * (red_o + red_ml),
                    output_shapes=((total_rows, slices, D), (total_rows, slices, 2)) if split else (out_shape,),
                    output_dtypes=("float32", "float32") if split else (MX_DTYPE[dtype],),
                    sizes=sizes(slices, chunk))
    if not split:
        return Plan((first,))
    merge = _kernel(config, name=f"attention_merge_{dtype}_d{D}",
                    body=(f"threadgroup float ke_weight[{MERGE_SLICES}];\n"
                          f"ke::attention_merge<T, D>(o_part, ml_part, sizes, out, ke_weight, "
                          f"{_TG}.x, {_LANE});"),
                    header=ATTENTION_HEADER, inputs=("o_part", "ml_part", "sizes"), outputs=("out",),
                    template_args=dtype_arg, grid=(total_rows * 32, 1, 1), threads=32,
                    threadgroup_bytes=4 * MERGE_SLICES, output_shapes=(out_shape,),
                    output_dtypes=(MX_DTYPE[dtype],), sizes=sizes(slices, chunk))
    return Plan((first, merge))


def _decode_scratch(D: int, rows: int, simdgroups: int) -> tuple[int, int]:
    """Floats of decode's merge buffers (metal/attention.h, DecodeScratch)."""
    if simdgroups == 1:
        return 1, 1
    per_pass = min(rows * cdiv(D, 32), 128 // simdgroups)
    return simdgroups * per_pass * 32, 2 * simdgroups * rows + rows
