"""What the emulator costs: compile time (cold cache) and dispatch time of the example
kernels of tests/test_mslemu_kernels.py. Run from tests/:

    MSLEMU_CACHE_DIR=$(mktemp -d) python -m mslemu.timing

(the cache directory must be empty for compile times to mean anything). Prints a table.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import mlx.core as mx
import numpy as np

from . import build


def main() -> None:
    import test_mslemu_kernels as K  # the example kernels (tests/ is on sys.path)

    if any(build.CACHE_DIR.glob("k-*")):
        raise SystemExit(f"{build.CACHE_DIR} holds builds; point MSLEMU_CACHE_DIR at an empty directory")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    build.runtime_object()
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    print(f"machine: {cpu}, {os.cpu_count()} cores; {build.compiler_version()}")
    print(f"runtime object: {time.perf_counter() - t0:.2f} s (once per runtime version)")

    def f32(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    cases = {
        "elementwise n=1003": lambda **kw: K.AXPBY(
            inputs=[f32(1003), f32(1003), 1.5, 1003], template=[("T", mx.float32)], grid=(1003, 1, 1),
            threadgroup=(256, 1, 1), output_shapes=[(1003,)], output_dtypes=[mx.float32], **kw),
        "row reduction 7x1000": lambda **kw: K.ROW_SUM(
            inputs=[f32(7, 1000), 1000], template=[("T", mx.float32)], grid=(7 * 256, 1, 1),
            threadgroup=(256, 1, 1), output_shapes=[(7,)], output_dtypes=[mx.float32], **kw),
        "softmax 2x4096": lambda **kw: K.SOFTMAX(
            inputs=[f32(2, 4096), 4096], template=[("T", mx.float32)], grid=(256, 1, 1), threadgroup=(128, 1, 1),
            output_shapes=[(2, 4096)], output_dtypes=[mx.float32], **kw),
        "simdgroup GEMM 256^3 (bm=bn=32)": lambda **kw: K.run_gemm(f32(256, 256), f32(256, 256), 32, 32, 16, 2, 2,
                                                                    **kw),
        "decode attention 8/2 heads, kv 1024, D 64": lambda **kw: K.DECODE(
            inputs=[f32(8, 1, 64), f32(2, 1024, 64), f32(2, 1024, 64), mx.array([1024, 64, 8, 2], dtype=mx.int32)],
            template=[("T", mx.float32), ("MAXG", 4)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
            output_shapes=[(8, 1, 64)], output_dtypes=[mx.float32], **kw),
        "causal flash attention 4/2 heads, L 256, D 32": lambda **kw: K.FLASH(
            inputs=[f32(4, 256, 32), f32(2, 256, 32), f32(2, 256, 32), mx.array([256, 256, 32, 4, 2], dtype=mx.int32)],
            template=[("T", mx.float32), ("BQ", 16), ("BK", 8), ("DMAX", 32)], grid=(256, 4, 1),
            threadgroup=(16, 1, 1), output_shapes=[(4, 256, 32)], output_dtypes=[mx.float32], **kw),
    }
    print(f"{'kernel':48} {'compile s':>10} {'dispatch s':>11} {'in-process s':>13}")
    for name, call in cases.items():
        _, first = call()
        walls, runs = [], []
        for _ in range(3):
            t = time.perf_counter()
            _, st = call()
            walls.append(time.perf_counter() - t)
            runs.append(st.run_seconds)
        print(f"{name:48} {first.compile_seconds:10.2f} {statistics.median(walls):11.3f} "
              f"{statistics.median(runs):13.3f}")
    print("compile: generate, compile and link one kernel (cold cache); dispatch: one call with a cached build "
          "(subprocess, transfer, run); in-process: the run inside the emulator; medians of 3")


if __name__ == "__main__":
    main()
