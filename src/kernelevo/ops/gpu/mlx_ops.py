"""MLX's own ops for what kernelevo's GPU kernels compute: the `mlx` family runs them, an
unfused epilogue is applied with them, and the VJPs are built from them."""

from __future__ import annotations

import contextlib

import mlx.core as mx

from ...features import Epilogue


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

    with mx.stream(stream) if stream is not None else contextlib.nullcontext():
        return {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "gelu_tanh": nn.gelu_approx,
                "none": lambda x: x}[name](y)


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
