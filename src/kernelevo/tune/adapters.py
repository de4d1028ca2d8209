"""What the tuner needs to know of each op: its inputs, reference, launchers and the
built-in MLX op it is measured against. One adapter per op; the rest of tune/ is generic.

A launcher returns a `timing.Launch`: given the previous launch's output it makes its
first operand depend on it, so that timed launches run one after another as a model's
layers do (see `chained`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..config import KernelConfig
from .correctness import random_operand, to_f64
from .timing import Launch
from .workloads import AttentionShape, MatmulShape


def chained(first: mx.array, call: Callable[[mx.array], mx.array]) -> Launch:
    """`call(first)`, or after a previous launch `call(first made to depend on it)`.

    On the CPU MLX runs a graph's nodes one at a time, and `mx.depends(first, after)` orders
    them at no cost. MLX's GPU back-ends order kernels by the buffers they read and write
    (CUDA graph edges, Metal barriers), and `mx.depends` hands on `first`'s own buffer,
    which no launch writes: independent launches then overlap on the GPU, which a model's
    consecutive layers do not. There the next launch reads what the last one wrote."""
    on_gpu = mx.default_device().type == mx.DeviceType.gpu

    def launch(after: mx.array | None = None) -> mx.array:
        if after is None:
            return call(first)
        return call(carried(after, first) if on_gpu else mx.depends(first, after))
    return launch


def carried(after: mx.array, first: mx.array) -> mx.array:
    """An operand of `first`'s shape and type made of the previous launch's output `after`:
    a view of it where it has enough elements (no data moves), else `after` padded with
    `first`'s tail (one copy of `first`'s size per launch, the same for both sides of a
    pair). Values are not kept bounded: a GPU kernel's speed does not depend on them."""
    if after.dtype != first.dtype:
        after = after.astype(first.dtype)
    if after.shape == first.shape:
        return after
    flat, n = after.reshape(-1), first.size
    if flat.size >= n:
        return flat[:n].reshape(first.shape)
    return mx.concatenate([flat, first.reshape(-1)[flat.size:]]).reshape(first.shape)


class MatmulAdapter:
    op = "matmul"

    def inputs(self, shape: MatmulShape, seed: int) -> tuple[mx.array, ...]:
        batch = (shape.batch,) if shape.batch > 1 else ()
        b_shape = (shape.N, shape.K) if shape.transpose_b else (shape.K, shape.N)
        return (random_operand(batch + (shape.M, shape.K), shape.dtype, seed),
                random_operand(batch + b_shape, shape.dtype, seed + 1))

    def reference(self, shape: MatmulShape, inputs) -> np.ndarray:
        a, b = (to_f64(x) for x in inputs)
        return a @ (np.swapaxes(b, -1, -2) if shape.transpose_b else b)

    def launcher(self, shape: MatmulShape, inputs, config: KernelConfig) -> Launch:
        from ..ops import matmul_launcher

        a, b = inputs
        return chained(a, matmul_launcher(a, b, config, transpose_b=shape.transpose_b))

    def builtin(self, shape: MatmulShape, inputs) -> Launch:
        a, b = inputs
        bt = mx.swapaxes(b, -1, -2) if shape.transpose_b else b
        return chained(a, lambda first: mx.matmul(first, bt))

    def variants(self, shape: MatmulShape) -> list[MatmulShape]:
        """The shape and a nearby one with odd sizes, so edge handling is verified too."""
        def shrink(n: int, by: int) -> int:
            return n - by if n > 2 * by else n
        return [shape, replace(shape, M=shrink(shape.M, 1), N=shrink(shape.N, 3), K=shrink(shape.K, 5))]


class AttentionAdapter:
    op = "attention"

    def inputs(self, shape: AttentionShape, seed: int) -> tuple[mx.array, ...]:
        q = random_operand((shape.batch, shape.heads, shape.q_len, shape.head_dim), shape.dtype, seed)
        k = random_operand((shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim), shape.dtype, seed + 1)
        v = random_operand((shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim), shape.dtype, seed + 2)
        return q, k, v

    @staticmethod
    def _scale(shape: AttentionShape) -> float:
        return shape.head_dim ** -0.5

    def reference(self, shape: AttentionShape, inputs) -> np.ndarray:
        q, k, v = (to_f64(x) for x in inputs)
        gqa = shape.heads // shape.kv_heads
        k, v = np.repeat(k, gqa, axis=1), np.repeat(v, gqa, axis=1)
        scores = (q @ np.swapaxes(k, -1, -2)) * self._scale(shape)
        if shape.softcap:
            scores = shape.softcap * np.tanh(scores / shape.softcap)
        rows = np.arange(shape.q_len)[:, None] + (shape.kv_len - shape.q_len)  # aligned to the end
        cols = np.arange(shape.kv_len)[None, :]
        keep = np.ones((shape.q_len, shape.kv_len), dtype=bool)
        if shape.mask == "causal":
            keep &= cols <= rows
        if shape.window:
            keep &= cols > rows - shape.window
        # A row that sees no key gets the mean of v over all keys, as MLX and ke.attention give.
        scores = np.where(keep, scores, -np.inf)
        hidden = ~keep.any(axis=-1)
        scores = np.where(hidden[:, None], 0.0, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        return weights @ v

    def launcher(self, shape: AttentionShape, inputs, config: KernelConfig) -> Launch:
        from ..ops import attention_launcher

        q, k, v = inputs
        return chained(q, attention_launcher(q, k, v, config, **self._options(shape)))

    def _options(self, shape: AttentionShape) -> dict:
        return dict(scale=self._scale(shape), mask="causal" if shape.mask == "causal" else None,
                    softcap=shape.softcap or None, window=shape.window or None)

    def builtin(self, shape: AttentionShape, inputs) -> Launch:
        if shape.softcap or shape.window:
            return None  # MLX's op has neither
        q, k, v = inputs
        mask = "causal" if shape.mask == "causal" else None
        return chained(q, lambda first: mx.fast.scaled_dot_product_attention(
            first, k, v, scale=self._scale(shape), mask=mask))

    def variants(self, shape: AttentionShape) -> list[AttentionShape]:
        shorter = 3 if shape.kv_len > 8 else 0
        odd = replace(shape, kv_len=shape.kv_len - shorter,
                      q_len=max(1, min(shape.q_len - 1, shape.kv_len - shorter)) if shape.q_len > 2
                      else shape.q_len)
        return [shape, odd]


ADAPTERS = {"matmul": MatmulAdapter(), "attention": AttentionAdapter()}
