"""Launching lowered kernels on a GPU stream: which GPU back-end this MLX has, one
immutable extension launch per lowered kernel, and a plan's kernels run in order.

`kernelevo.lowering.LoweredKernel` is the one statement of what a launch is; the extension
(`_ext.GpuLaunch`) reads it by its field names. `launch_kernel` is the seam tests replace
with the Metal and CUDA emulators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from ... import chips
from ...lowering import LoweredKernel, Plan
from ...config import KernelConfig
from .._runtime import BackendNotSupportedError, ext, select, selection_cache

GPU_BACKENDS = ("cuda", "metal")

_launches = selection_cache()  # id(LoweredKernel) -> (the kernel, its extension launch)
_choices = {"matmul": selection_cache(), "attention": selection_cache()}  # op -> features -> config


def select_config(op: str, features: dict) -> KernelConfig:
    """The heuristics' configuration for a call's features on this machine's GPU."""
    key = tuple(features.values())
    hit = _choices[op].get(key)
    if hit is None:
        hit = _choices[op][key] = select(op, features, chips.gpu_backend()).config
    return hit


def require_gpu(op: str) -> str:
    """The GPU backend that runs `op`, or BackendNotSupportedError."""
    backend = chips.gpu_backend()
    if backend not in GPU_BACKENDS or not (backend == "metal" or mx.cuda.is_available()):
        raise BackendNotSupportedError(
            f"[kernelevo.{op}] not yet supported on this backend: kernelevo launches GPU kernels "
            f"through MLX's Metal back-end (Apple silicon) or its CUDA back-end (mlx-cuda-13), "
            f"and this MLX has neither")
    return backend


def native_launch(kernel: LoweredKernel, inputs: Sequence[mx.array], stream=None) -> list[mx.array]:
    """Runs a lowered kernel through the extension (MLX's fast::cuda_kernel or
    fast::metal_kernel). Its launch is made once and kept while the kernel is (the kernel
    is kept with it, so its id is not reused)."""
    hit = _launches.get(id(kernel))
    if hit is None or hit[0] is not kernel:
        hit = _launches[id(kernel)] = (kernel, ext.GpuLaunch(kernel))
    return hit[1](inputs, stream=stream)


launch_kernel = native_launch  # (LoweredKernel, inputs, stream=) -> outputs; tests put the emulator here


def prepared(cache: dict, key: tuple, prepare: Callable[[], Callable]) -> Callable:
    """What `prepare()` made for this call signature, made now if it is new. A key that does
    not hash (an argument of the wrong type) is prepared without caching, so that
    preparing reports what is wrong with it."""
    try:
        hit = cache.get(key)
    except TypeError:
        return prepare()
    if hit is None:
        hit = cache[key] = prepare()
    return hit


def traced(*arrays) -> bool:
    """Whether a transformation (grad, vjp, compile) traces any of the arrays: only then does
    a GPU op need its custom VJP (MLX's custom kernels have none), which costs ~3 us a call."""
    return ext.any_tracer([x for x in arrays if x is not None])


class PreparedPlan:
    """A plan's kernels for one call signature, with their `sizes` arrays made once."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.steps = [(k, mx.array(k.sizes, dtype=mx.int32) if k.sizes else None) for k in plan.kernels]

    def __call__(self, inputs: dict[str, mx.array], stream=None) -> mx.array:
        """Launches the kernels in order; later kernels read earlier outputs by name."""
        env = dict(inputs)
        for kernel, sizes in self.steps:
            if sizes is not None:
                env["sizes"] = sizes
            outs = launch_kernel(kernel, [env[n] for n in kernel.input_names], stream=stream)
            env.update(zip(kernel.output_names, outs))
        return env[self.plan.result]
