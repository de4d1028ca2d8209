"""Per-call cost of choosing a kernel: what the heuristics add to a call on a cache hit.

    python3 benchmarks/bench_overhead.py

Times, in the same process: the selection callback alone on a cache hit, building a
`ke.matmul` graph node chosen by the heuristics, building one with a forced
configuration, and building `mx.matmul` (no evaluation in any: the figure is the Python
and graph-construction cost a model pays per call). Target: selection <= 5 us per call.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

import kernelevo as ke
from kernelevo import chips
from kernelevo.ops import matmul_op

CALLS = 20000


def per_call(fn, repeat: int = 7) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - start) / CALLS)
    return statistics.median(samples)


def main() -> None:
    a, b = mx.ones((16, 4096), dtype=mx.bfloat16), mx.ones((4096, 4096), dtype=mx.bfloat16)
    mx.eval(a, b)
    config = ke.select_matmul(matmul_op.call_features(a, b)).config
    ke.matmul(a, b)  # warm the caches

    select = per_call(lambda: matmul_op._select(16, 4096, 4096, 1, "bfloat16", False, False, "cpu"))
    chosen = per_call(lambda: ke.matmul(a, b))
    launcher = matmul_op.matmul_launcher(a, b, config)
    forced = per_call(launcher)
    builtin = per_call(lambda: mx.matmul(a, b))

    chip = chips.detect("cpu")
    print(f"per-call cost on {chip.id} ({chip.name}), median of 7 x {CALLS} calls, no evaluation")
    print(f"  selection callback, cache hit        {select * 1e6:7.2f} us   (target <= 5 us)")
    print(f"  ke.matmul, heuristics choose          {chosen * 1e6:7.2f} us")
    print(f"  ke.matmul, configuration given        {forced * 1e6:7.2f} us")
    print(f"  mx.matmul                             {builtin * 1e6:7.2f} us")
    print(f"  heuristics' share of a ke.matmul call {(chosen - forced) * 1e6:7.2f} us")


if __name__ == "__main__":
    main()
