"""kernelevo.rms_norm and kernelevo.rope: drop-ins for mx.fast.rms_norm and mx.fast.rope.

MLX's CPU back-end has no kernel for either and runs each as a chain of generic ops (about
35 us and 160 us a call on a decode row of the 2-core machine, benchmarks/RESULTS.md); here
each is one primitive with one pass over the data. On a GPU stream MLX's own kernels run
(kernelevo has no GPU kernel for these). Gradients are MLX's.
"""

from __future__ import annotations

import mlx.core as mx

from ._runtime import ext, stream_backend


def rms_norm(x: mx.array, weight: mx.array | None, eps: float, *, stream=None) -> mx.array:
    """x * rsqrt(mean(x^2 over the last axis) + eps), rounded to the output type, times
    weight (as mx.fast.rms_norm; the output type is x's promoted with weight's)."""
    if stream_backend(stream) != "cpu":
        return mx.fast.rms_norm(x, weight, eps, stream=stream)
    return ext.rms_norm(x, weight, float(eps), stream=stream)


def rope(x: mx.array, dims: int, *, traditional: bool, base: float | None, scale: float,
         offset: int | mx.array, freqs: mx.array | None = None, stream=None) -> mx.array:
    """Rotary position embedding of x's first `dims` features (as mx.fast.rope): x is
    [batch, ..., positions, features], position t of batch b turned by
    scale * (offset[b] + t) * f_i with f_i = base^(-2i/dims), or 1 / freqs[i]."""
    if stream_backend(stream) != "cpu":
        return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale,
                            offset=offset, freqs=freqs, stream=stream)
    if not isinstance(offset, mx.array):
        offset = _offset_array(int(offset))
    return ext.rope(x, dims, traditional=traditional, base=base, scale=float(scale),
                    offset=offset, freqs=freqs, stream=stream)


_offsets: dict[int, mx.array] = {}


def _offset_array(offset: int) -> mx.array:
    """An int32 scalar per offset, made once (a decode step asks for the same few often)."""
    hit = _offsets.get(offset)
    if hit is None:
        if len(_offsets) > 65536:
            _offsets.clear()
        hit = _offsets[offset] = mx.array(offset, dtype=mx.int32)
    return hit
