"""mslemu: run the Metal kernels MLX would JIT on the CPU, with checks and counters.

    import mslemu
    k = mslemu.metal_kernel(name="axpy", input_names=["a", "x"], output_names=["y"], source=...)
    (y,), stats = k(inputs=[a, x], template=[("T", mx.float32)], grid=(n, 1, 1),
                    threadgroup=(256, 1, 1), output_shapes=[(n,)], output_dtypes=[mx.float32])

See README.md in this directory for what is checked, what is counted, and the limits.
"""

from .errors import (
    CompileError,
    DeadlockError,
    DivergenceError,
    KernelCrash,
    KernelError,
    LimitError,
    OutOfBoundsError,
    RaceError,
    ScheduleMismatchError,
    UninitializedReadError,
)
from .kernel import BufferStats, MetalKernel, Stats, metal_kernel, run_schedules
from .prelude import mlx_utils

__all__ = [
    "BufferStats",
    "CompileError",
    "DeadlockError",
    "DivergenceError",
    "KernelCrash",
    "KernelError",
    "LimitError",
    "MetalKernel",
    "OutOfBoundsError",
    "RaceError",
    "ScheduleMismatchError",
    "Stats",
    "UninitializedReadError",
    "metal_kernel",
    "mlx_utils",
    "run_schedules",
]
