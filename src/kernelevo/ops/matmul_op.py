"""kernelevo.matmul: a drop-in for mx.matmul, run by kernelevo's kernels.

Configurations come from the heuristics in force for this chip (see heuristics/), unless
the caller forces one. The extension calls back into `_select` for every matmul it
builds without a configuration — including those inside gradients.
"""

from __future__ import annotations

import mlx.core as mx

from .. import chips
from ..config import KernelConfig
from ..dsl.select import Selection
from ..features import epilogue_of, matmul_features
from . import gpu
from ._runtime import as_config, backend_of_device, explain, ext, select, selection_cache, stream_backend

_cache = selection_cache()


def select_matmul(features: dict, backend: str = "cpu") -> Selection:
    """The heuristics' choice for a matmul call's features on the local chip."""
    return select("matmul", features, backend)


def explain_matmul(features: dict, backend: str = "cpu"):
    return explain("matmul", features, backend)


def _select(M, N, K, batch, dtype, transpose_a, transpose_b, epilogue, device):
    key = (M, N, K, batch, dtype, transpose_a, transpose_b, epilogue, device)
    hit = _cache.get(key)
    if hit is None:
        features = matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                                   transpose_b=transpose_b, epilogue=epilogue)
        config = select_matmul(features, backend_of_device(device)).config
        hit = _cache[key] = (config.family, config.ext_params())
    return hit


ext.set_matmul_selector(_select)


def matmul(a: mx.array, b: mx.array, *, transpose_a: bool = False, transpose_b: bool = False,
           bias: mx.array | None = None, activation: str | None = None,
           residual: mx.array | None = None, scale: float | None = None,
           config: KernelConfig | str | None = None, stream=None) -> mx.array:
    """Matrix product, a drop-in for `mx.matmul(a, b)`, with an optional fused epilogue.

    transpose_a / transpose_b multiply by the transpose of the last two axes without
    materialising it (`matmul(x, w, transpose_b=True)` is `x @ w.T`, as a linear layer
    stores its weight).

    The epilogue is applied to the f32 product before it is rounded, in this order:

        out = activation(product * scale + bias) + residual

    `activation` is one of "relu", "gelu" (erf), "gelu_tanh", "silu"; `bias` and `residual`
    broadcast to the result's shape (a bias of shape (N,) is a linear layer's) and are cast
    to its dtype. Gradients flow to a, b, bias and residual.

    `config` forces one kernel configuration (a KernelConfig or its DSL form, e.g.
    "gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m engine=fma pack_a=yes
    epilogue=fused"); by default the heuristics in force for this chip choose.
    """
    if stream_backend(stream) in gpu.GPU_BACKENDS:
        return gpu.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, config=config,
                          bias=bias, activation=activation, residual=residual, scale=scale,
                          stream=stream)
    epilogue = _epilogue_args(bias, activation, residual, scale)
    if config is None:
        return ext.matmul(a, b, None, {}, transpose_a, transpose_b, stream=stream, **epilogue)
    return matmul_launcher(a, b, config, transpose_a=transpose_a, transpose_b=transpose_b,
                           stream=stream, **epilogue)()


def _epilogue_args(bias, activation, residual, scale) -> dict:
    """The extension's epilogue arguments (the CPU kernels read them as given)."""
    epilogue_of(bias, activation, residual, scale)  # validates the activation and scale
    return {"bias": bias, "activation": "none" if activation is None else activation,
            "residual": residual, "scale": 1.0 if scale is None else float(scale)}


def epilogue_kind(bias=None, activation=None, residual=None, scale=None) -> str:
    """The call feature `epilogue` for these arguments (as the extension computes it)."""
    return epilogue_of(bias, activation, residual, scale).kind


def matmul_launcher(a: mx.array, b: mx.array, config: KernelConfig | str, *,
                    transpose_a: bool = False, transpose_b: bool = False, bias=None,
                    activation: str | None = "none", residual=None, scale: float | None = 1.0,
                    stream=None):
    """A function that builds `matmul(a, b, config=config, ...)` with the checks done once
    up front, so that timing loops measure the kernel rather than Python. It takes an
    optional replacement for `a` of the same shape and type (the tuner passes one that
    depends on the previous launch, so launches run in a chain as in a model)."""
    backend = stream_backend(stream)
    if backend in gpu.GPU_BACKENDS:
        cfg = as_config(config, "matmul", gpu.require_gpu("matmul"))
        kwargs = dict(transpose_a=transpose_a, transpose_b=transpose_b, config=cfg, bias=bias,
                      activation=activation, residual=residual, scale=scale, stream=stream)
        gpu.matmul(a, b, **kwargs)  # validates once
        return lambda first=a: gpu.matmul(first, b, **kwargs)
    cfg = as_config(config, "matmul", backend)
    epilogue = _epilogue_args(bias, activation, residual, scale)
    features = call_features(a, b, transpose_a, transpose_b,
                             epilogue=epilogue_kind(bias, activation, residual, scale))
    cfg.check(chips.detect(backend), features)
    family, params = cfg.family, cfg.ext_params()
    return lambda first=a: ext.matmul(first, b, family, params, transpose_a, transpose_b,
                                      stream=stream, **epilogue)


def call_features(a, b, transpose_a: bool = False, transpose_b: bool = False,
                  epilogue: str = "none") -> dict:
    """The features of `matmul(a, b)` (the extension validates the shapes)."""
    M, N, K, batch, dtype = ext.describe_matmul(a, b, transpose_a, transpose_b)
    return matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                           transpose_b=transpose_b, epilogue=epilogue)
