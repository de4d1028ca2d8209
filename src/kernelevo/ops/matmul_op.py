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
from ..features import matmul_features
from . import gpu
from ._runtime import as_config, backend_of_device, explain, ext, select, selection_cache, stream_backend

_cache = selection_cache()


def select_matmul(features: dict, backend: str = "cpu") -> Selection:
    """The heuristics' choice for a matmul call's features on the local chip."""
    return select("matmul", features, backend)


def explain_matmul(features: dict, backend: str = "cpu"):
    return explain("matmul", features, backend)


def _select(M, N, K, batch, dtype, transpose_a, transpose_b, device):
    key = (M, N, K, batch, dtype, transpose_a, transpose_b, device)
    hit = _cache.get(key)
    if hit is None:
        features = matmul_features(M, N, K, batch=batch, dtype=dtype,
                                   transpose_a=transpose_a, transpose_b=transpose_b)
        config = select_matmul(features, backend_of_device(device)).config
        hit = _cache[key] = (config.family, config.ext_params())
    return hit


ext.set_matmul_selector(_select)


def matmul(a: mx.array, b: mx.array, *, transpose_a: bool = False, transpose_b: bool = False,
           config: KernelConfig | str | None = None, stream=None) -> mx.array:
    """Matrix product, a drop-in for `mx.matmul(a, b)`.

    transpose_a / transpose_b multiply by the transpose of the last two axes without
    materialising it (`matmul(x, w, transpose_b=True)` is `x @ w.T`, as a linear layer
    stores its weight). `config` forces one kernel configuration (a KernelConfig or its
    DSL form, e.g. "gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m"); by default
    the heuristics in force for this chip choose.
    """
    if stream_backend(stream) in gpu.GPU_BACKENDS:
        return gpu.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, config=config,
                          stream=stream)
    if config is None:
        return ext.matmul(a, b, None, {}, transpose_a, transpose_b, stream=stream)
    return matmul_launcher(a, b, config, transpose_a=transpose_a, transpose_b=transpose_b,
                           stream=stream)()


def matmul_launcher(a: mx.array, b: mx.array, config: KernelConfig | str, *,
                    transpose_a: bool = False, transpose_b: bool = False, stream=None):
    """A function that builds `matmul(a, b, config=config)` with the checks done once up
    front, so that timing loops measure the kernel rather than Python."""
    backend = stream_backend(stream)
    if backend in gpu.GPU_BACKENDS:
        cfg = as_config(config, "matmul", gpu.require_gpu("matmul"))
        gpu.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, config=cfg, stream=stream)
        return lambda: gpu.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b,
                                  config=cfg, stream=stream)
    cfg = as_config(config, "matmul", backend)
    cfg.check(chips.detect(backend), call_features(a, b, transpose_a, transpose_b))
    family, params = cfg.family, cfg.ext_params()
    return lambda: ext.matmul(a, b, family, params, transpose_a, transpose_b, stream=stream)


def call_features(a, b, transpose_a: bool = False, transpose_b: bool = False) -> dict:
    """The features of `matmul(a, b)` (the extension validates the shapes)."""
    M, N, K, batch, dtype = ext.describe_matmul(a, b, transpose_a, transpose_b)
    return matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                           transpose_b=transpose_b)
