"""Where the time of a small GPU matmul goes: graph building (Python), and evaluation of
batches of 1, 16 and 256 launches, for mx.matmul and for ke.matmul's `mlx` family and a
lowered gemv kernel; then the tuner's paired timing of the same pairs (plain vs plain is
the control: ~1.0). Needs a GPU with MLX's CUDA (or Metal) backend.

    python3 benchmarks/probe_gpu_dispatch.py
"""

import time

import mlx.core as mx

from kernelevo.ops import matmul_launcher
from kernelevo.tune.timing import _sample, time_paired
from kernelevo.tune.correctness import random_operand


def main() -> None:
    mx.set_default_device(mx.gpu)
    a = random_operand((1, 1024), "bf16", 1)
    b = random_operand((2048, 1024), "bf16", 2)
    bt = mx.swapaxes(b, -1, -2)
    launches = {
        "mx.matmul": lambda: mx.matmul(a, bt),
        "ke mlx family": matmul_launcher(a, b, "mlx", transpose_b=True),
        "ke gemv kernel": matmul_launcher(a, b, "gemv warps=4 rows=2 vec=8 epilogue=fused", transpose_b=True),
    }
    print(f"{mx.default_device()}, 1x2048x1024 bf16 (b transposed)")
    for name, launch in launches.items():
        for n in (1, 16, 256):
            _sample(launch, n)
            times = sorted(_sample(launch, n) for _ in range(7))
            print(f"{name:15s} evaluation, {n:3d} launches: {times[3] * 1e6:7.1f} us per launch (median of 7)")
        start = time.perf_counter()
        [launch() for _ in range(256)]
        print(f"{name:15s} graph building: {(time.perf_counter() - start) / 256 * 1e6:.1f} us per call")
    plain, ke_mlx = launches["mx.matmul"], launches["ke mlx family"]
    for label, (x, y) in {"ke mlx / mx.matmul": (ke_mlx, plain), "mx.matmul / ke mlx": (plain, ke_mlx),
                          "mx.matmul / mx.matmul": (plain, plain)}.items():
        p = time_paired(x, y, 7, 1)
        print(f"paired {label:22s} {p.candidate.median_s * 1e6:6.2f} us vs {p.baseline.median_s * 1e6:6.2f} us, "
              f"ratio {p.ratio:.3f}")


if __name__ == "__main__":
    main()
