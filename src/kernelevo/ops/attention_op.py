"""kernelevo.attention: a drop-in for mx.fast.scaled_dot_product_attention, run by
kernelevo's fused kernels, plus logit softcapping and a sliding window.

Configurations come from the heuristics in force for this chip (see heuristics/), unless
the caller forces one. The extension calls back into `_select` for every attention it
builds without a configuration.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .. import chips
from ..config import KernelConfig
from ..dsl.select import Selection
from ..features import attention_features
from . import gpu
from ._runtime import as_config, backend_of_device, explain, ext, select, selection_cache, stream_backend

_cache = selection_cache()


def select_attention(features: dict, backend: str = "cpu") -> Selection:
    """The heuristics' choice for an attention call's features on the local chip."""
    return select("attention", features, backend)


def explain_attention(features: dict, backend: str = "cpu"):
    return explain("attention", features, backend)


def _select(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, mask, softcap, window, device):
    key = (batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, mask, softcap, window, device)
    hit = _cache.get(key)
    if hit is None:
        features = attention_features(batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len,
                                      kv_len=kv_len, head_dim=head_dim, dtype=dtype, mask=mask,
                                      softcap=softcap, window=window)
        config = select_attention(features, backend_of_device(device)).config
        hit = _cache[key] = (config.family, config.ext_params())
    return hit


ext.set_attention_selector(_select)


def default_scale(q: mx.array, scale: float | None) -> float:
    """`scale`, or 1/sqrt(D) for q's head dimension D when it is None."""
    if scale is not None:
        return scale
    if q.ndim == 0 or q.shape[-1] == 0:
        raise ValueError("attention: the default scale 1/sqrt(head_dim) needs a head dimension > 0")
    return 1.0 / math.sqrt(q.shape[-1])


def attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None,
              mask: str | mx.array | None = None, softcap: float | None = None,
              window: int | None = None, config: KernelConfig | str | None = None,
              stream=None) -> mx.array:
    """softmax(q k^T * scale + mask) v: a drop-in for mx.fast.scaled_dot_product_attention.

    q is [B, Hq, Lq, D]; k and v are [B, Hkv, Lkv, D] and [B, Hkv, Lkv, Dv] with Hq a
    multiple of Hkv (grouped-query attention: query head h reads key/value head
    h // (Hq // Hkv), without copying them). mask is None, "causal" (the last query aligns
    with the last key) or an array broadcastable to [B, Hq, Lq, Lkv]: boolean (False
    excludes a key) or additive (added to the scaled scores; its type must promote to the
    inputs'). The result has the promoted type of q, k and v (f32, f16 or bf16); the
    softmax runs in f32. scale multiplies the scores; it defaults to 1/sqrt(D), D being
    q's last dimension (mx.fast.scaled_dot_product_attention takes it explicitly).

    softcap caps the scores before the mask: softcap * tanh(scores / softcap). window
    lets a query see only the last `window` keys at or before its aligned position (so it
    implies causality). A row its boolean, causal or window mask hides fully outputs the
    mean of v over all keys, which is what MLX outputs for a row its boolean mask masks
    fully; a row whose visible keys all score -inf (an additive -inf mask) is NaN, as in
    MLX. NaN and Inf propagate as in MLX's op: a NaN in q, in a visible key or in the
    row's additive mask makes the row NaN, a key scoring +inf makes it NaN too.

    `config` forces one kernel configuration (a KernelConfig or its DSL form, e.g.
    "flash bq=64 bk=96 threads=2 pack_gqa=yes skip_masked_blocks=yes scale_at=q dot=fma"); by default
    the heuristics in force for this chip choose.
    """
    scale = default_scale(q, scale)
    if stream_backend(stream) in gpu.GPU_BACKENDS:
        return gpu.attention(q, k, v, scale=scale, mask=mask, softcap=softcap, window=window,
                             config=config, stream=stream)
    if config is None:
        return ext.attention(q, k, v, scale=scale, mask=mask, softcap=softcap, window=window,
                             stream=stream)
    return attention_launcher(q, k, v, config, scale=scale, mask=mask, softcap=softcap,
                              window=window, stream=stream)()


def attention_launcher(q: mx.array, k: mx.array, v: mx.array, config: KernelConfig | str, *,
                       scale: float | None = None, mask: str | mx.array | None = None,
                       softcap: float | None = None, window: int | None = None, stream=None):
    """A function that builds `attention(q, k, v, ..., config=config)` with the checks done
    once up front, so that timing loops measure the kernel rather than Python. It takes an
    optional replacement for `q` of the same shape and type (see matmul_launcher)."""
    scale = default_scale(q, scale)
    backend = stream_backend(stream)
    if backend in gpu.GPU_BACKENDS:
        cfg = as_config(config, "attention", gpu.require_gpu("attention"))
        kwargs = dict(scale=scale, mask=mask, softcap=softcap, window=window, config=cfg,
                      stream=stream)
        gpu.attention(q, k, v, **kwargs)  # validates once
        return lambda first=q: gpu.attention(first, k, v, **kwargs)
    cfg = as_config(config, "attention", backend)
    cfg.check(chips.detect(backend), call_features(q, k, v, mask=mask, softcap=softcap,
                                                   window=window))
    family, params = cfg.family, cfg.ext_params()
    return lambda first=q: ext.attention(first, k, v, scale=scale, mask=mask, softcap=softcap,
                                         window=window, family=family, params=params, stream=stream)


def call_features(q, k, v, *, mask=None, softcap=None, window=None) -> dict:
    """The features of `attention(q, k, v, ...)` (the extension validates the inputs)."""
    batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, kind = ext.describe_attention(
        q, k, v, mask, softcap, window)
    return attention_features(batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len,
                              kv_len=kv_len, head_dim=head_dim, dtype=dtype, mask=kind,
                              softcap=softcap or 0.0, window=window or 0)
