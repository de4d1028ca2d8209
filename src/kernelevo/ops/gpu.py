"""Ops on a GPU stream: select with the same heuristics as everywhere, lower, launch.

MLX exports its custom-kernel launchers but not the primitive behind them, so on a GPU
stream a kernelevo op is the output of `_ext.launch` (MLX's fast::metal_kernel or
fast::cuda_kernel), wrapped in `mx.custom_function` whose VJP is built from kernelevo ops
again; the `mlx` family runs MLX's own op. See docs/architecture.md, "GPU backends".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from .. import chips
from ..config import KernelConfig
from ..features import DTYPE_SYMBOL, attention_features, matmul_features
from ..lowering import LoweredKernel, Plan
from ..lowering import cuda as cuda_lowering
from ..lowering import metal as metal_lowering
from ..features import Epilogue
from ._runtime import BackendNotSupportedError, as_config, ext, select, selection_cache

GPU_BACKENDS = ("cuda", "metal")
LOWERING = {"cuda": cuda_lowering, "metal": metal_lowering}  # backend -> its lowering module
MX_TYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

_matmul_choices = selection_cache()
_attention_choices = selection_cache()
_kernels: dict[tuple[str, str], object] = {}  # (backend, kernel name) -> the extension's GpuKernel
launch_kernel = ext.launch  # (GpuKernel, inputs, stream=) -> outputs; tests put the emulator here
_sizes: OrderedDict[tuple, mx.array] = OrderedDict()  # `sizes` contents -> its int32 array


def gpu_backend() -> str:
    """The kernelevo backend of this machine's GPU."""
    return "metal" if mx.metal.is_available() else "cuda"


def require_gpu(op: str) -> str:
    """The GPU backend that runs `op`, or BackendNotSupportedError."""
    backend = gpu_backend()
    if backend not in GPU_BACKENDS or not (backend == "metal" or mx.cuda.is_available()):
        raise BackendNotSupportedError(
            f"[kernelevo.{op}] not yet supported on this backend: kernelevo launches GPU kernels "
            f"through MLX's Metal back-end (Apple silicon) or its CUDA back-end (mlx-cuda-13), "
            f"and this MLX has neither")
    return backend


def _ext_kernel(k: LoweredKernel):
    hit = _kernels.get((k.backend, k.name))
    if hit is None:
        hit = ext.GpuKernel()
        hit.backend, hit.name, hit.source, hit.header = k.backend, k.name, k.source, k.header
        hit.input_names, hit.output_names = list(k.input_names), list(k.output_names)
        hit.output_shapes = [list(s) for s in k.output_shapes]
        hit.output_dtypes = list(k.output_dtypes)
        hit.grid, hit.threadgroup = k.grid, k.threadgroup
        hit.template_args = list(k.template_args)
        hit.shared_memory, hit.init_value = k.shared_memory, k.init_value
        hit.ensure_row_contiguous = k.ensure_row_contiguous
        _kernels[(k.backend, k.name)] = hit
    # Output shapes change with the call while the name (the compiled kernel) does not.
    hit.output_shapes = [list(s) for s in k.output_shapes]
    hit.grid = k.grid
    return hit


def _sizes_array(values: tuple[int, ...]) -> mx.array:
    hit = _sizes.get(values)
    if hit is None:
        hit = _sizes[values] = mx.array(values, dtype=mx.int32)
        if len(_sizes) > 4096:
            _sizes.popitem(last=False)
    return hit


def run_plan(plan: Plan, inputs: dict[str, mx.array], stream=None) -> mx.array:
    """Launches a plan's kernels in order; later kernels read earlier outputs by name."""
    env = dict(inputs)
    for k in plan.kernels:
        if k.sizes:
            env["sizes"] = _sizes_array(k.sizes)
        outs = launch_kernel(_ext_kernel(k), [env[n] for n in k.input_names], stream=stream)
        env.update(zip(k.output_names, outs))
    return env[plan.result]


# ---- matmul --------------------------------------------------------------------------


def apply_epilogue(y: mx.array, ep: Epilogue, bias: mx.array | None, residual: mx.array | None,
                   stream=None) -> mx.array:
    """The epilogue as MLX ops (the unfused reference and the `separate` choice):
    activation(alpha * y + bias) + residual."""
    if ep.alpha is not None:
        y = mx.multiply(y, mx.array(ep.alpha, dtype=y.dtype), stream=stream)
    if ep.bias:
        y = mx.add(y, bias, stream=stream)
    y = _activation(y, ep.activation, stream)
    if ep.residual:
        y = mx.add(y, residual, stream=stream)
    return y


def _activation(y, name, stream):
    """MLX's own activations (mlx.nn: compiled into one kernel each), as an MLX model runs them."""
    import mlx.nn as nn

    with mx.stream(stream) if stream is not None else _no_stream():
        return {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "gelu_tanh": nn.gelu_approx,
                "none": lambda x: x}[name](y)


class _no_stream:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass(frozen=True)
class _MatmulCall:
    M: int
    N: int
    K: int
    batch: int
    a_batched: bool
    b_batched: bool
    out_shape: tuple[int, ...]
    dtype: str


def _matmul_shapes(a, b, ta, tb) -> tuple[mx.array, mx.array, _MatmulCall]:
    """Operands as the kernels take them — [batch or 1, rows, cols], a batch axis only on
    operands that have one — and the call's sizes. A batch of a against an unbatched b
    folds into M (one tall product)."""
    M, N, K, batch, dtype = ext.describe_matmul(a, b, ta, tb)  # validates; ValueError
    dtype = DTYPE_SYMBOL[dtype]
    a = a.astype(MX_TYPES[dtype]) if a.dtype != MX_TYPES[dtype] else a
    b = b.astype(MX_TYPES[dtype]) if b.dtype != MX_TYPES[dtype] else b
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    if squeeze_a:
        a = a.reshape(1, -1)
    if squeeze_b:
        b = b.reshape(-1, 1)
    a_batch, b_batch = a.shape[:-2], b.shape[:-2]
    out_batch = tuple(mx.broadcast_shapes(tuple(a_batch), tuple(b_batch))) if (a_batch or b_batch) else ()
    out_shape = out_batch + (() if squeeze_a else (M,)) + (() if squeeze_b else (N,))
    a_count, b_count = math.prod(a_batch), math.prod(b_batch)
    if b_count == 1 and not ta and a_count > 1:
        a = a.reshape(a_count * M, K)
        return a, b.reshape(b.shape[-2:]), _MatmulCall(a_count * M, N, K, 1, False, False, out_shape, dtype)
    full = math.prod(out_batch)

    def batched(x, count):
        if count == 1:
            return x.reshape(x.shape[-2:]), False
        if tuple(x.shape[:-2]) != out_batch:
            x = mx.broadcast_to(x, out_batch + tuple(x.shape[-2:]))
        return x.reshape((full,) + tuple(x.shape[-2:])), True

    a, a_b = batched(a, a_count)
    b, b_b = batched(b, b_count)
    return a, b, _MatmulCall(M, N, K, full, a_b, b_b, out_shape, dtype)


def select_matmul_config(features: dict) -> KernelConfig:
    key = tuple(features.values())
    hit = _matmul_choices.get(key)
    if hit is None:
        hit = _matmul_choices[key] = select("matmul", features, gpu_backend()).config
    return hit


def matmul(a: mx.array, b: mx.array, *, transpose_a: bool = False, transpose_b: bool = False,
           config: KernelConfig | str | None = None, epilogue: Epilogue = Epilogue(),
           bias: mx.array | None = None, residual: mx.array | None = None, stream=None) -> mx.array:
    """op(a) @ op(b), then the epilogue, on the GPU (see kernelevo.matmul)."""
    backend = require_gpu("matmul")
    a2, b2, call = _matmul_shapes(a, b, transpose_a, transpose_b)
    features = matmul_features(call.M, call.N, call.K, batch=call.batch, dtype=call.dtype,
                               transpose_a=transpose_a, transpose_b=transpose_b, epilogue=epilogue.kind)
    if config is None:
        cfg = select_matmul_config(features)
    else:
        cfg = as_config(config, "matmul", backend)
        cfg.check(chips.detect(backend), features)
    dtype = MX_TYPES[call.dtype]
    if bias is not None:
        bias = bias.astype(dtype).reshape(-1)
        if bias.size != call.N:
            raise ValueError(f"bias has {bias.size} elements; the product has {call.N} columns")
    if residual is not None:
        residual = mx.broadcast_to(residual.astype(dtype), call.out_shape)
    if cfg.family == "mlx":
        x = mx.swapaxes(a, -1, -2) if transpose_a else a
        w = mx.swapaxes(b, -1, -2) if transpose_b else b
        return apply_epilogue(mx.matmul(x, w, stream=stream), epilogue, bias, residual, stream)
    plan = LOWERING[backend].lower_matmul(cfg, features, epilogue=epilogue, a_batched=call.a_batched,
                                          b_batched=call.b_batched)
    fused = plan.pending is None and not epilogue.empty
    extras = ([bias] if fused and epilogue.bias else []) + ([residual] if fused and epilogue.residual else [])

    @mx.custom_function
    def product(x, w, *rest):
        inputs = {"a": x, "b": w}
        if fused:
            names = (["bias"] if epilogue.bias else []) + (["residual"] if epilogue.residual else [])
            inputs.update(zip(names, rest))
            if epilogue.residual:
                inputs["residual"] = inputs["residual"].reshape(call.batch, call.M, call.N)
        return run_plan(plan, inputs, stream).reshape(call.out_shape)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        x, w = primals[0], primals[1]
        dy, extra_grads = cotangent, []
        if fused:  # through the epilogue first, in MLX ops, from the recomputed product
            plain = matmul(x, w, transpose_a=transpose_a, transpose_b=transpose_b, stream=stream)
            rest = list(primals[2:])

            def tail(p, *args):
                it = iter(args)
                return apply_epilogue(p, epilogue, next(it) if epilogue.bias else None,
                                      next(it) if epilogue.residual else None, stream)

            _, grads = mx.vjp(tail, [plain.reshape(call.out_shape)] + rest, [cotangent])
            dy, extra_grads = grads[0], list(grads[1:])
        dy = dy.reshape((call.batch, call.M, call.N) if call.batch > 1 else (call.M, call.N))
        return list(product_grads(x, w, transpose_a, transpose_b, dy, stream)) + extra_grads

    y = product(a2, b2, *extras)
    if plan.pending is not None:
        y = apply_epilogue(y, plan.pending, bias, residual, stream)
    return y


def product_grads(x, w, ta, tb, dy, stream):
    """Gradients of y = op(x) @ op(w) by kernelevo matmuls: with A = op(x), B = op(w),
    dA = dy B^T and dB = A^T dy, transposed back where x or w were."""
    from .matmul_op import matmul as ke_matmul

    dx = ke_matmul(w, dy, transpose_a=tb, transpose_b=True, stream=stream) if ta else \
        ke_matmul(dy, w, transpose_b=not tb, stream=stream)
    dw = ke_matmul(dy, x, transpose_a=True, transpose_b=ta, stream=stream) if tb else \
        ke_matmul(x, dy, transpose_a=not ta, stream=stream)
    return _sum_to(dx, x.shape), _sum_to(dw, w.shape)


def _sum_to(x: mx.array, shape) -> mx.array:
    """Sums the broadcast batch axes of a gradient back to the operand's shape."""
    shape = tuple(shape)
    extra = x.ndim - len(shape)
    if extra > 0:
        x = x.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (got, want) in enumerate(zip(x.shape[:-2], shape[:-2])) if want == 1 and got != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


# ---- attention -----------------------------------------------------------------------


def describe_attention(q, k, v, mask, softcap, window) -> tuple[dict, str, mx.array | None]:
    """(features, mask kind, mask array or None), validating the call (ValueError)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"[kernelevo.attention] {name} must be [batch, heads, length, dim], "
                             f"got shape {tuple(x.shape)}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise ValueError(f"[kernelevo.attention] shapes do not fit: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"[kernelevo.attention] query heads ({Hq}) must be a multiple of "
                         f"key/value heads ({Hkv})")
    kinds = {q.dtype, k.dtype, v.dtype}
    if not kinds <= {mx.float32, mx.float16, mx.bfloat16}:
        raise ValueError(f"[kernelevo.attention] supports float32, float16 and bfloat16, got "
                         f"{q.dtype}, {k.dtype} and {v.dtype}")
    dtype = kinds.pop() if len(kinds) == 1 else mx.float32  # as MLX promotes mixed floats
    array = None
    if mask is None:
        kind = "none"
    elif isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"[kernelevo.attention] mask must be None, 'causal' or an array, got {mask!r}")
        kind = "causal"
    else:
        array = mask
        kind = "bool" if mask.dtype == mx.bool_ else "additive"
        try:
            mx.broadcast_shapes(tuple(mask.shape), (B, Hq, Lq, Lk))
        except ValueError:
            raise ValueError(f"[kernelevo.attention] mask of shape {tuple(mask.shape)} does not "
                             f"broadcast to {(B, Hq, Lq, Lk)}") from None
    if window is not None and window < 0:
        raise ValueError(f"[kernelevo.attention] window must be positive, got {window}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"[kernelevo.attention] softcap must be positive, got {softcap}")
    features = attention_features(batch=B, heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=D,
                                  dtype=str(dtype).split(".")[-1], mask=kind,
                                  softcap=softcap or 0.0, window=window or 0)
    return features, kind, array


def select_attention_config(features: dict) -> KernelConfig:
    key = tuple(features.values())
    hit = _attention_choices.get(key)
    if hit is None:
        hit = _attention_choices[key] = select("attention", features, gpu_backend()).config
    return hit


def mlx_attention(q, k, v, *, scale, mask, softcap, window, stream=None):
    """MLX's own attention for the call: its fused SDPA, or where MLX has no such option
    (softcap, window) the same function in MLX ops."""
    if not softcap and not window:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    gqa = q.shape[1] // k.shape[1]
    kk = mx.repeat(k, gqa, axis=1) if gqa > 1 else k
    vv = mx.repeat(v, gqa, axis=1) if gqa > 1 else v
    s = (q.astype(mx.float32) * scale) @ mx.swapaxes(kk.astype(mx.float32), -1, -2)
    if softcap:
        s = softcap * mx.tanh(s / softcap)
    Lq, Lk = q.shape[2], k.shape[2]
    keep = None
    if mask == "causal" or window:
        i = mx.arange(Lq)[:, None] + (Lk - Lq)
        j = mx.arange(Lk)[None, :]
        keep = j <= i
        if window:
            keep = mx.logical_and(keep, j > i - window)
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            keep = mask if keep is None else mx.logical_and(keep, mask)
        else:
            s = s + mask.astype(mx.float32)
    if keep is not None:
        s = mx.where(keep, s, mx.array(-1e30, mx.float32))
    p = mx.softmax(s, axis=-1)
    return (p @ vv.astype(mx.float32)).astype(q.dtype)


def _mask_layout(mask: mx.array, shape4) -> tuple[mx.array, tuple[int, int, int, int]]:
    """The mask as a row-major array of its own (unbroadcast) shape, and the element strides
    that map (b, h, i, j) into it (0 along broadcast axes)."""
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) if mask.ndim < 4 else mask
    strides, step = [0, 0, 0, 0], 1
    for axis in (3, 2, 1, 0):
        strides[axis] = step if m.shape[axis] > 1 else 0
        step *= m.shape[axis]
    return m, tuple(strides)


def attention(q, k, v, *, scale: float, mask=None, softcap: float | None = None,
              window: int | None = None, config: KernelConfig | str | None = None,
              stream=None) -> mx.array:
    """softmax(mask(softcap(scale * q k^T))) v on the GPU (see kernelevo.attention)."""
    backend = require_gpu("attention")
    features, kind, mask_array = describe_attention(q, k, v, mask, softcap, window)
    if config is None:
        cfg = select_attention_config(features)
    else:
        cfg = as_config(config, "attention", backend)
        cfg.check(chips.detect(backend), features)
    if cfg.family == "mlx":
        return mlx_attention(q, k, v, scale=scale, mask=mask, softcap=softcap, window=window, stream=stream)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"[kernelevo.attention] the {cfg.family} kernel needs v's head dimension "
                         f"({v.shape[-1]}) equal to q's ({q.shape[-1]}); choose the mlx family")
    dtype = MX_TYPES[features["dtype"]]
    q, k, v = (x.astype(dtype) if x.dtype != dtype else x for x in (q, k, v))
    inputs = {}
    mask_dtype, strides = None, (0, 0, 0, 0)
    if mask_array is not None:
        m = mask_array if kind == "bool" else mask_array.astype(dtype)
        m, strides = _mask_layout(m, (features["batch"], features["heads"], features["q_len"], features["kv_len"]))
        inputs["mask"] = m
        mask_dtype = "bool" if kind == "bool" else str(dtype).split(".")[-1]
    plan = LOWERING[backend].lower_attention(cfg, features, scale=scale, mask_dtype=mask_dtype,
                                             mask_strides=strides)

    @mx.custom_function
    def fused(q_, k_, v_, *rest):
        return run_plan(plan, {"q": q_, "k": k_, "v": v_, **dict(zip(inputs, rest))}, stream)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        # The backward pass of MLX's attention in MLX ops (kernelevo has no backward kernel).
        def reference(q_, k_, v_):
            return mlx_attention(q_, k_, v_, scale=scale, mask=mask, softcap=softcap,
                                 window=window, stream=stream)

        _, grads = mx.vjp(reference, list(primals[:3]), [cotangent])
        return list(grads) + [mx.zeros_like(x) for x in primals[3:]]

    return fused(q, k, v, *inputs.values())
