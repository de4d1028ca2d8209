"""kernelevo.attention on a GPU stream (see kernelevo.attention).

As for the GPU matmul, everything that depends only on a call's signature (shapes and
types of q, k, v and the mask, scale, softcap, window, forced configuration, stream) is
prepared once per signature.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ... import chips
from ...config import KernelConfig
from ...families import MLX_BUILTIN
from ...features import attention_features
from .._runtime import as_config, selection_cache
from . import launch
from .matmul_op import LOWERING, MX_TYPES
from .mlx_ops import mlx_attention

_prepared = selection_cache()  # call signature -> the function that builds the call


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
    return launch.select_config("attention", features)


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
    mask_key = (mask.shape, mask.dtype) if isinstance(mask, mx.array) else mask
    key = (q.shape, q.dtype, k.shape, k.dtype, v.shape, v.dtype, scale, mask_key, softcap, window,
           config, stream)
    build = launch.prepared(_prepared, key, lambda: prepare(
        q, k, v, scale=scale, mask=mask, softcap=softcap, window=window, config=config, stream=stream))
    return build(q, k, v, mask)


def prepare(q, k, v, *, scale, mask, softcap, window, config,
            stream) -> Callable[[mx.array, mx.array, mx.array, object], mx.array]:
    """The function that builds this call (and any call of the same signature)."""
    backend = launch.require_gpu("attention")
    features, kind, mask_array = describe_attention(q, k, v, mask, softcap, window)
    if config is None:
        cfg = select_attention_config(features)
    else:
        cfg = as_config(config, "attention", backend)
        cfg.check(chips.detect(backend), features)
    if cfg.family == MLX_BUILTIN and not softcap and not window:  # MLX's fused op, called directly
        return lambda q, k, v, mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask,
                                                                          stream=stream)
    if cfg.family == MLX_BUILTIN:
        return lambda q, k, v, mask: mlx_attention(q, k, v, scale=scale, mask=mask, softcap=softcap,
                                                   window=window, stream=stream)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"[kernelevo.attention] the {cfg.family} kernel needs v's head dimension "
                         f"({v.shape[-1]}) equal to q's ({q.shape[-1]}); choose the mlx family")
    dtype = MX_TYPES[features["dtype"]]
    mask_dtype, strides, mask_shape = None, (0, 0, 0, 0), None
    if mask_array is not None:
        m, strides = _mask_layout(mask_array, (features["batch"], features["heads"],
                                               features["q_len"], features["kv_len"]))
        mask_shape = tuple(m.shape)
        mask_dtype = "bool" if kind == "bool" else str(dtype).split(".")[-1]
    plan = launch.PreparedPlan(LOWERING[backend].lower_attention(
        cfg, features, scale=scale, mask_dtype=mask_dtype, mask_strides=strides))

    def forward(q_, k_, v_, *rest):
        return plan({"q": q_, "k": k_, "v": v_, **dict(zip(("mask",), rest))}, stream)

    fused = mx.custom_function(forward)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        # The backward pass of MLX's attention in MLX ops (kernelevo has no backward kernel).
        def reference(q_, k_, v_):
            return mlx_attention(q_, k_, v_, scale=scale, mask=mask_of(primals), softcap=softcap,
                                 window=window, stream=stream)

        _, grads = mx.vjp(reference, list(primals[:3]), [cotangent])
        return list(grads) + [mx.zeros_like(x) for x in primals[3:]]

    def mask_of(primals):
        return mask if mask_array is None else primals[3]

    def build(q, k, v, mask):
        q, k, v = (x.astype(dtype) if x.dtype != dtype else x for x in (q, k, v))
        inputs = [q, k, v]
        if mask_shape is not None:
            m = mask if kind == "bool" else mask.astype(dtype)
            inputs.append(m if m.shape == mask_shape else m.reshape(mask_shape))
        return fused(*inputs) if launch.traced(*inputs) else forward(*inputs)

    return build
