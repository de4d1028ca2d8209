"""Is the CPU thread team's latency stable? 200 consecutive timings of one configuration.

    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE flock /tmp/kernelevo-bench.lock \\
        python3 benchmarks/bench_thread_stability.py

A timing is what the tuner takes (tune/timing.py): a chain of launches in one evaluation,
lasting at least 5 ms. For each case, after the tuner's warm-up, 200 timings are taken back
to back; the figure of merit is the ratio of their 90th to their 10th percentile (issue 16
asks <= 1.3), and whether they fall into two states (the tuner's own test). Cases: the
shipped configuration of a small and of a large shape, the small one's configuration
forced to two and to one thread (where that differs from it) (a two-thread team that flips between states is what the
tuner and evolution kept finding unusable), a decode projection (gemv), and numpy
(OpenBLAS, f32, threads sleeping between calls) on the large shape for comparison. Also
the single-call latency (one call per evaluation), where a team that sleeps between calls
pays its wake-up every time. Writes its section of RESULTS.md and a PNG of the series.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import HERE, machine_line, record_section  # noqa: E402

import mlx.core as mx  # noqa: E402

import kernelevo as ke  # noqa: E402
from kernelevo.ops import matmul_op  # noqa: E402
from kernelevo.tune import timing  # noqa: E402
from kernelevo.tune.adapters import MatmulAdapter  # noqa: E402
from kernelevo.tune.workloads import MatmulShape  # noqa: E402

SECTION = "CPU thread team: latency stability (bench_thread_stability.py)"
TIMINGS = 200
SINGLE_CALLS = 400
TARGET = 1.3


def with_threads(config: ke.KernelConfig, threads: int) -> ke.KernelConfig:
    return ke.KernelConfig.make(config.op, config.backend, config.family, {**dict(config.params), "threads": threads})


def series(launch: timing.Launch) -> tuple[list[float], int]:
    """TIMINGS consecutive tuner timings (seconds per launch) after the tuner's warm-up."""
    n = timing._batch_size(launch)
    timing._warm([launch], n, 3)
    n = max(n, timing._batch_size(launch))
    return [timing._sample(launch, n) for _ in range(TIMINGS)], n


def single_calls(launch: timing.Launch) -> list[float]:
    """Seconds of one launch evaluated on its own, SINGLE_CALLS times back to back."""
    out = []
    for _ in range(SINGLE_CALLS):
        y = launch(None)
        start = time.perf_counter()
        mx.eval(y)
        out.append(time.perf_counter() - start)
    return out


def numpy_series(shape: MatmulShape) -> tuple[list[float], int]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((shape.M, shape.K), dtype=np.float32)
    w = rng.standard_normal((shape.N, shape.K), dtype=np.float32)
    a @ w.T
    start = time.perf_counter()
    a @ w.T
    n = max(1, int(5e-3 / max(time.perf_counter() - start, 1e-7)))
    out = []
    for _ in range(TIMINGS):
        start = time.perf_counter()
        for _ in range(n):
            a @ w.T
        out.append((time.perf_counter() - start) / n)
    return out, n


def stats(samples: list[float]) -> dict:
    p10, p50, p90 = (float(np.percentile(samples, q)) for q in (10, 50, 90))
    return {"p10": p10, "p50": p50, "p90": p90, "spread": p90 / p10, "bimodal": timing.is_bimodal(samples),
            "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "thread-stability.png")
    args = parser.parse_args()
    from kernelevo.mlx_lm.bench import wait_for_quiet

    load = wait_for_quiet()
    adapter = MatmulAdapter()
    small = MatmulShape(16, 1024, 1024, "bf16", transpose_b=True, label="small")
    large = MatmulShape(512, 2048, 2048, "f32", transpose_b=True, label="large")
    decode = MatmulShape(1, 2048, 2048, "bf16", transpose_b=True, label="decode")
    cases = []
    for shape in (small, large, decode):
        inputs = adapter.inputs(shape, 0)
        mx.eval(*inputs)
        chosen = ke.select_matmul(matmul_op.call_features(*inputs, transpose_b=True)).config
        variants = [("shipped", chosen)]
        if shape is small:
            variants += [(f"threads={n}", with_threads(chosen, n)) for n in (2, 1)
                         if with_threads(chosen, n) != chosen]
        for name, config in variants:
            cases.append((f"{shape.M}x{shape.N}x{shape.K} {shape.dtype}, {name}", config, shape, inputs))

    rows, plotted = [], []
    for label, config, shape, inputs in cases:
        launch = adapter.launcher(shape, inputs, config)
        samples, n = series(launch)
        single = single_calls(launch)
        row = {"case": label, "config": config.to_dsl(), "chain": n, **stats(samples),
               "single": stats(single)}
        rows.append(row)
        plotted.append((label, samples))
        print(f"{label:40s} p10 {row['p10'] * 1e6:8.1f} us  p50 {row['p50'] * 1e6:8.1f}  p90 {row['p90'] * 1e6:8.1f}"
              f"  p90/p10 {row['spread']:.2f}{'  two states' if row['bimodal'] else ''}"
              f"  | one per eval p50 {row['single']['p50'] * 1e6:8.1f} us p90/p10 {row['single']['spread']:.2f}",
              flush=True)
    samples, n = numpy_series(large)
    row = {"case": f"numpy {large.M}x{large.N}x{large.K} f32 (OpenBLAS)", "config": "-", "chain": n, **stats(samples),
           "single": None}
    rows.append(row)
    plotted.append((row["case"], samples))
    print(f"{row['case']:40s} p10 {row['p10'] * 1e6:8.1f} us  p50 {row['p50'] * 1e6:8.1f}  p90 {row['p90'] * 1e6:8.1f}"
          f"  p90/p10 {row['spread']:.2f}", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plotted), 1, figsize=(9, 1.9 * len(plotted)), sharex=True)
    for ax, (label, values) in zip(axes, plotted):
        ax.plot([v * 1e6 for v in values], ".", markersize=3)
        ax.set_ylabel("us / call")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("timing (consecutive, each a chain of >= 5 ms)")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)

    lines = [machine_line("cpu"), "",
             "Command: `OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE python3 benchmarks/bench_thread_stability.py` "
             f"(under `flock /tmp/kernelevo-bench.lock`; others used {load:.0%} of the machine before the start). "
             f"{TIMINGS} consecutive tuner timings per case (each a chain of launches in one evaluation, >= 5 ms), "
             f"after the tuner's warm-up; then {SINGLE_CALLS} calls each evaluated on its own. Target: p90/p10 <= {TARGET}. "
             f"Series: `benchmarks/results/{args.plot.name}`.", "",
             "| case | configuration | chain | p10 us | p50 us | p90 us | p90/p10 | two states | one per eval: p50 us | p90/p10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        single = r["single"]
        lines.append(f"| {r['case']} | `{r['config']}` | {r['chain']} | {r['p10'] * 1e6:.1f} | {r['p50'] * 1e6:.1f} | "
                     f"{r['p90'] * 1e6:.1f} | {r['spread']:.2f}{'' if r['spread'] <= TARGET else ' (miss)'} | "
                     f"{'yes' if r['bimodal'] else 'no'} | "
                     + (f"{single['p50'] * 1e6:.1f} | {single['spread']:.2f} |" if single else "- | - |"))
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record_section(SECTION, text)
        print(f"recorded in {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
