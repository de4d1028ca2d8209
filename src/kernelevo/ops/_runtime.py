"""What every op shares: the loaded extension, streams and backends, forced configurations,
and the caches of chosen configurations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .. import chips, heuristics
from .._abi import load_extension
from ..config import KernelConfig
from ..dsl.select import Selection

ext = load_extension()
BackendNotSupportedError = ext.BackendNotSupportedError

_cache_clearers: list[Callable[[], None]] = []


def selection_cache() -> dict:
    """A cache of (call features) -> chosen configuration, emptied by forget_selections."""
    cache: dict = {}
    _cache_clearers.append(cache.clear)
    return cache


def forget_selections() -> None:
    """Drop cached choices and loaded heuristics (after new heuristics were written)."""
    for clear in _cache_clearers:
        clear()
    heuristics.invalidate()


def backend_of_device(device: str) -> str:
    """'cpu' or 'gpu' (as the extension reports a call's device) -> a kernelevo backend."""
    return "cpu" if device == "cpu" else chips.gpu_backend()


def stream_backend(stream) -> str:
    """The kernelevo backend that runs an op on `stream` (None: MLX's default device; a
    Stream, Device or DeviceType)."""
    if stream is None:
        return chips.default_backend()
    if isinstance(stream, mx.DeviceType):
        kind = stream
    elif isinstance(stream, mx.Device):
        kind = stream.type
    else:
        kind = stream.device.type
    return "cpu" if kind == mx.DeviceType.cpu else chips.gpu_backend()


def as_config(config: KernelConfig | str, op: str, backend: str) -> KernelConfig:
    if isinstance(config, KernelConfig):
        if (config.op, config.backend) != (op, backend):
            raise ValueError(f"config is for {config.op} on {config.backend}, not {op} on {backend}")
        return config
    if isinstance(config, str):
        return KernelConfig.parse(config, op, backend)
    raise TypeError(f"config must be a KernelConfig or a string, not {type(config).__name__}")


def select(op: str, features: dict, backend: str) -> Selection:
    """The heuristics' choice for a call's features on the local chip."""
    chip = chips.detect(backend)
    return heuristics.active(backend, chip).program.select(op, features)


@dataclass(frozen=True)
class Explanation:
    op: str
    backend: str
    chip: chips.Chip
    source: heuristics.Source
    features: dict
    selection: Selection
    program: object = None  # the CompiledProgram that chose


def explain(op: str, features: dict, backend: str = "cpu",
            chip: chips.Chip | None = None) -> Explanation:
    """What the heuristics choose for a call, on this machine's chip or a named one."""
    chip = chip or chips.detect(backend)
    active = heuristics.active(backend, chip)
    return Explanation(op, backend, chip, active.source, features,
                       active.program.select(op, features), active.program)
