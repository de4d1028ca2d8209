"""kernelevo.matmul on a GPU stream (see kernelevo.matmul).

What depends only on a call's signature — operand shapes and types, transposes, epilogue,
forced configuration, stream — is prepared once per signature: validation, the heuristics'
choice, the operands' layout, the lowered kernels with their launches, and the custom VJP.
A call then looks its signature up and builds its launches, so a model pays for its ~200
matmuls per token what MLX's op costs plus a few microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ... import chips
from ...config import KernelConfig
from ...families import MLX_BUILTIN
from ...features import DTYPE_SYMBOL, epilogue_of, matmul_features
from ...lowering import cuda as cuda_lowering
from ...lowering import metal as metal_lowering
from .._runtime import as_config, ext, selection_cache
from . import launch
from .mlx_ops import apply_epilogue

LOWERING = {"cuda": cuda_lowering, "metal": metal_lowering}  # backend -> its lowering module
MX_TYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}

_prepared = selection_cache()  # call signature -> the function that builds the call


@dataclass(frozen=True)
class Operand:
    """How a caller's operand becomes the kernels' [batch or 1, rows, cols] one."""

    dtype: mx.Dtype
    broadcast: tuple[int, ...] | None  # broadcast to this shape first (a batch axis of the other)
    shape: tuple[int, ...]

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if self.broadcast is not None:
            x = mx.broadcast_to(x, self.broadcast)
        return x if x.shape == self.shape else x.reshape(self.shape)


@dataclass(frozen=True)
class MatmulCall:
    M: int
    N: int
    K: int
    batch: int
    a_batched: bool
    b_batched: bool
    out_shape: tuple[int, ...]
    dtype: str
    a: Operand
    b: Operand


def describe(a: mx.array, b: mx.array, ta: bool, tb: bool) -> MatmulCall:
    """The call's sizes and how its operands reach the kernels: a batch axis only on
    operands that have one; a batch of a against an unbatched b folds into M (one tall
    product). Raises ValueError for operands that do not multiply."""
    M, N, K, batch, dtype = ext.describe_matmul(a, b, ta, tb)
    dtype = DTYPE_SYMBOL[dtype]
    mx_dtype = MX_TYPES[dtype]
    a_shape, b_shape = tuple(a.shape), tuple(b.shape)
    squeeze_a, squeeze_b = len(a_shape) == 1, len(b_shape) == 1
    a_shape = (1,) + a_shape if squeeze_a else a_shape
    b_shape = b_shape + (1,) if squeeze_b else b_shape
    a_batch, b_batch = a_shape[:-2], b_shape[:-2]
    out_batch = tuple(mx.broadcast_shapes(a_batch, b_batch)) if (a_batch or b_batch) else ()
    out_shape = out_batch + (() if squeeze_a else (M,)) + (() if squeeze_b else (N,))
    a_count, b_count = math.prod(a_batch), math.prod(b_batch)
    if b_count == 1 and not ta and a_count > 1:
        return MatmulCall(a_count * M, N, K, 1, False, False, out_shape, dtype,
                          Operand(mx_dtype, None, (a_count * M, K)), Operand(mx_dtype, None, b_shape[-2:]))
    full = math.prod(out_batch)

    def operand(shape, count):
        if count == 1:
            return Operand(mx_dtype, None, shape[-2:]), False
        broadcast = out_batch + shape[-2:] if shape[:-2] != out_batch else None
        return Operand(mx_dtype, broadcast, (full,) + shape[-2:]), True

    (a_op, a_b), (b_op, b_b) = operand(a_shape, a_count), operand(b_shape, b_count)
    return MatmulCall(M, N, K, full, a_b, b_b, out_shape, dtype, a_op, b_op)


def select_matmul_config(features: dict) -> KernelConfig:
    return launch.select_config("matmul", features)


def matmul(a: mx.array, b: mx.array, *, transpose_a: bool = False, transpose_b: bool = False,
           config: KernelConfig | str | None = None, bias: mx.array | None = None,
           activation: str | None = None, residual: mx.array | None = None,
           scale: float | None = None, stream=None) -> mx.array:
    """activation(scale * op(a) @ op(b) + bias) + residual on the GPU (see kernelevo.matmul).
    A signature seen before costs a dictionary lookup on the raw arguments and the launches."""
    key = (a.shape, a.dtype, b.shape, b.dtype, transpose_a, transpose_b, config, activation, scale,
           None if bias is None else (bias.shape, bias.dtype),
           None if residual is None else (residual.shape, residual.dtype), stream)
    build = launch.prepared(_prepared, key, lambda: prepare(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b, config=config,
        epilogue=epilogue_of(bias, activation, residual, scale), bias=bias, residual=residual,
        stream=stream))
    return build(a, b, bias, residual)


def prepare(a, b, *, transpose_a, transpose_b, config, epilogue, bias, residual,
            stream) -> Callable[[mx.array, mx.array, mx.array | None, mx.array | None], mx.array]:
    """The function that builds this call (and any call of the same signature)."""
    backend = launch.require_gpu("matmul")
    call = describe(a, b, transpose_a, transpose_b)
    features = matmul_features(call.M, call.N, call.K, batch=call.batch, dtype=call.dtype,
                               transpose_a=transpose_a, transpose_b=transpose_b, epilogue=epilogue.kind)
    if config is None:
        cfg = select_matmul_config(features)
    else:
        cfg = as_config(config, "matmul", backend)
        cfg.check(chips.detect(backend), features)
    dtype = MX_TYPES[call.dtype]
    if bias is not None and bias.size != call.N:
        raise ValueError(f"bias has {bias.size} elements; the product has {call.N} columns")

    def fit(bias, residual):
        return (None if bias is None else bias.astype(dtype).reshape(-1),
                None if residual is None else mx.broadcast_to(residual.astype(dtype), call.out_shape))

    if cfg.family == MLX_BUILTIN:
        def product_mlx(a, b):
            return mx.matmul(mx.swapaxes(a, -1, -2) if transpose_a else a,
                             mx.swapaxes(b, -1, -2) if transpose_b else b, stream=stream)

        if epilogue.empty:  # what the call costs is MLX's op and the lookup
            return lambda a, b, bias, residual: product_mlx(a, b)
        return lambda a, b, bias, residual: apply_epilogue(product_mlx(a, b), epilogue,
                                                           *fit(bias, residual), stream)

    plan = launch.PreparedPlan(LOWERING[backend].lower_matmul(
        cfg, features, epilogue=epilogue, a_batched=call.a_batched, b_batched=call.b_batched))
    pending = plan.plan.pending
    fused = pending is None and not epilogue.empty
    result_shape = (call.batch, call.M, call.N)

    def forward(x, w, *rest):
        inputs = {"a": x, "b": w}
        if fused:
            inputs.update(zip(epilogue.inputs(), rest))
            if epilogue.residual:
                inputs["residual"] = inputs["residual"].reshape(result_shape)
        y = plan(inputs, stream)
        return y if y.shape == call.out_shape else y.reshape(call.out_shape)

    product = mx.custom_function(forward)

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
        dy = dy.reshape(result_shape if call.batch > 1 else (call.M, call.N))
        return list(product_grads(x, w, transpose_a, transpose_b, dy, stream)) + extra_grads

    def build_kernels(a, b, bias, residual):
        x, w = call.a(a), call.b(b)
        if epilogue.empty:
            return product(x, w) if launch.traced(x, w) else forward(x, w)
        bias, residual = fit(bias, residual)
        extras = ([bias] if fused and epilogue.bias else []) + ([residual] if fused and epilogue.residual else [])
        y = product(x, w, *extras) if launch.traced(x, w, *extras) else forward(x, w, *extras)
        return y if pending is None else apply_epilogue(y, pending, bias, residual, stream)

    return build_kernels


def product_grads(x, w, ta, tb, dy, stream):
    """Gradients of y = op(x) @ op(w) by kernelevo matmuls: with A = op(x), B = op(w),
    dA = dy B^T and dB = A^T dy, transposed back where x or w were."""
    dx = matmul(w, dy, transpose_a=tb, transpose_b=True, stream=stream) if ta else \
        matmul(dy, w, transpose_b=not tb, stream=stream)
    dw = matmul(dy, x, transpose_a=True, transpose_b=ta, stream=stream) if tb else \
        matmul(x, dy, transpose_a=not ta, stream=stream)
    return _sum_to(dx, x.shape), _sum_to(dw, w.shape)


def _sum_to(x: mx.array, shape) -> mx.array:
    """Sums the broadcast batch axes of a gradient back to the operand's shape."""
    shape = tuple(shape)
    extra = x.ndim - len(shape)
    if extra > 0:
        x = x.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (got, want) in enumerate(zip(x.shape[:-2], shape[:-2])) if want == 1 and got != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
