"""The ops users call: drop-ins for their MLX counterparts, run by kernelevo's kernels.

Configurations come from the heuristics in force for this chip (see heuristics/), unless
the caller forces one. The extension calls back into `_select_matmul` for every matmul
it builds without a configuration — including those inside gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import chips, heuristics
from ._abi import load_extension
from .config import KernelConfig
from .dsl.select import Selection
from .features import matmul_features

_ext = load_extension()
BackendNotSupportedError = _ext.BackendNotSupportedError


def _backend_of_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def _stream_backend(stream) -> str:
    if stream is None:
        return chips.default_backend()
    if isinstance(stream, mx.DeviceType):
        kind = stream
    elif isinstance(stream, mx.Device):
        kind = stream.type
    else:
        kind = stream.device.type
    return "cpu" if kind == mx.DeviceType.cpu else _backend_of_device("gpu")


class _SelectionCache:
    """(call features) -> (family, params) for the extension's callback: the hot path."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[str, dict]] = {}

    def clear(self) -> None:
        self.entries.clear()


_matmul_cache = _SelectionCache()


def select_matmul(features: dict, backend: str = "cpu") -> Selection:
    """The heuristics' choice for a matmul call's features on the local chip."""
    chip = chips.detect(backend)
    return heuristics.active(backend, chip).program.select("matmul", features)


def _select_matmul(M, N, K, batch, dtype, transpose_a, transpose_b, device):
    key = (M, N, K, batch, dtype, transpose_a, transpose_b, device)
    hit = _matmul_cache.entries.get(key)
    if hit is None:
        features = matmul_features(M, N, K, batch=batch, dtype=dtype,
                                   transpose_a=transpose_a, transpose_b=transpose_b)
        config = select_matmul(features, _backend_of_device(device)).config
        hit = _matmul_cache.entries[key] = (config.family, config.ext_params())
    return hit


_ext.set_matmul_selector(_select_matmul)


def forget_selections() -> None:
    """Drop cached choices and loaded heuristics (after new heuristics were written)."""
    _matmul_cache.clear()
    heuristics.invalidate()


def _as_config(config: KernelConfig | str, op: str, backend: str) -> KernelConfig:
    if isinstance(config, KernelConfig):
        if (config.op, config.backend) != (op, backend):
            raise ValueError(f"config is for {config.op} on {config.backend}, not {op} on {backend}")
        return config
    if isinstance(config, str):
        return KernelConfig.parse(config, op, backend)
    raise TypeError(f"config must be a KernelConfig or a string, not {type(config).__name__}")


def matmul(a: mx.array, b: mx.array, *, transpose_a: bool = False, transpose_b: bool = False,
           config: KernelConfig | str | None = None, stream=None) -> mx.array:
    """Matrix product, a drop-in for `mx.matmul(a, b)`.

    transpose_a / transpose_b multiply by the transpose of the last two axes without
    materialising it (`matmul(x, w, transpose_b=True)` is `x @ w.T`, as a linear layer
    stores its weight). `config` forces one kernel configuration (a KernelConfig or its
    DSL form, e.g. "gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m"); by default
    the heuristics in force for this chip choose.
    """
    if config is None:
        return _ext.matmul(a, b, None, {}, transpose_a, transpose_b, stream=stream)
    return matmul_launcher(a, b, config, transpose_a=transpose_a, transpose_b=transpose_b,
                           stream=stream)()


def matmul_launcher(a: mx.array, b: mx.array, config: KernelConfig, *,
                    transpose_a: bool = False, transpose_b: bool = False, stream=None):
    """A function that builds `matmul(a, b, config=config)` with the checks done once up
    front, so that timing loops measure the kernel rather than Python."""
    backend = _stream_backend(stream)
    cfg = _as_config(config, "matmul", backend)
    cfg.check(chips.detect(backend), _call_features(a, b, transpose_a, transpose_b))
    family, params = cfg.family, cfg.ext_params()
    return lambda: _ext.matmul(a, b, family, params, transpose_a, transpose_b, stream=stream)


def _call_features(a, b, transpose_a: bool, transpose_b: bool) -> dict:
    M, N, K, batch, dtype = _ext.describe_matmul(a, b, transpose_a, transpose_b)
    return matmul_features(M, N, K, batch=batch, dtype=dtype, transpose_a=transpose_a,
                           transpose_b=transpose_b)


@dataclass(frozen=True)
class Explanation:
    op: str
    backend: str
    chip: chips.Chip
    source: heuristics.Source
    features: dict
    selection: Selection


def explain_matmul(features: dict, backend: str = "cpu") -> Explanation:
    chip = chips.detect(backend)
    act = heuristics.active(backend, chip)
    return Explanation("matmul", backend, chip, act.source, features,
                       act.program.select("matmul", features))
