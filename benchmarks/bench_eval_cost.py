"""Per-evaluation cost on the CPU: what a call costs when each call is its own `mx.eval`,
against the same calls chained in one evaluation (each consuming the previous output).

    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock \\
        python3 benchmarks/bench_eval_cost.py

Cases: `ke.matmul` as the heuristics choose and with the same configuration forced to one
thread, `mx.matmul`, and `mx.add`, on the shape issue 11 reported (16x2048x2048 bf16, W
stored [N, K]), a quarter of it (16x1024x1024: does the extra cost grow with the packed
weight?) and decode projections (1xNxK bf16, gemv: nothing packed). A model's token is one
evaluation of ~200 such calls, so the chained figure is the one a model pays per call; the
difference is the cost of an evaluation boundary (tuning timings that evaluate one call at a
time carry it).
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np

import kernelevo as ke
from kernelevo import chips
from kernelevo.ops import matmul_op

CHAIN = 100
REPS = 9


def per_call(step, x0, chained: bool) -> tuple[float, float, float]:
    """Median, first and third quartile (seconds per call) over REPS repetitions of CHAIN calls."""
    def once():
        y = x0
        if chained:
            for _ in range(CHAIN):
                y = step(y)
            mx.eval(y)
        else:
            for _ in range(CHAIN):
                y = step(y)
                mx.eval(y)

    once()
    samples = []
    for _ in range(REPS):
        tic = time.perf_counter()
        once()
        samples.append((time.perf_counter() - tic) / CHAIN)
    q1, q3 = np.percentile(samples, [25, 75])
    return statistics.median(samples), float(q1), float(q3)


def one_thread(config: ke.KernelConfig) -> ke.KernelConfig:
    return ke.KernelConfig.make("matmul", "cpu", config.family, {**dict(config.params), "threads": 1})


def main() -> None:
    from kernelevo.mlx_lm.bench import wait_for_quiet

    load = wait_for_quiet()
    rng = np.random.default_rng(0)
    chip = chips.detect("cpu")
    print(f"per-call cost on {chip.id} ({chip.name}), mlx {mx.__version__}; {REPS} x {CHAIN} calls, "
          f"median [quartiles] in us; others used {load:.0%} of the machine before the start")
    print(f"{'case':44s} {'chained':>22s} {'one per eval':>22s} {'difference':>10s}")
    for M, N, K in ((16, 2048, 2048), (16, 1024, 1024), (1, 2048, 2048), (1, 1024, 1024)):
        w = mx.array((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)).astype(mx.bfloat16)
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(mx.bfloat16)
        mx.eval(w, x)
        config = ke.select_matmul(matmul_op.call_features(x, w, transpose_b=True)).config
        single_thread = one_thread(config)
        print(f"{M}x{N}x{K}: the heuristics choose {config.to_dsl()}")
        cases = [
            (f"ke.matmul {M}x{N}x{K} bf16, as chosen", lambda y: ke.matmul(y, w, transpose_b=True)),
            (f"ke.matmul {M}x{N}x{K} bf16, chosen with threads=1",
             lambda y: ke.matmul(y, w, transpose_b=True, config=single_thread)),
            (f"mx.matmul {M}x{N}x{K} bf16 (x @ W.T)", lambda y: y @ w.T),
            (f"mx.add {M}x{K} bf16", lambda y: y + x),
        ]
        for label, step in cases:
            chained = per_call(step, x, True)
            single = per_call(step, x, False)
            print(f"{label:44s} {chained[0] * 1e6:8.1f} [{chained[1] * 1e6:.1f}, {chained[2] * 1e6:.1f}]"
                  f" {single[0] * 1e6:8.1f} [{single[1] * 1e6:.1f}, {single[2] * 1e6:.1f}]"
                  f" {(single[0] - chained[0]) * 1e6:10.1f}")


if __name__ == "__main__":
    main()
