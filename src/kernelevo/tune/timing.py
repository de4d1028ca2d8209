"""Timing in the process that runs the kernel, as DESIGN.md asks: warm-up, repetitions,
medians with spread, candidate and baseline interleaved (A B, B A, ...) so that drift
of the machine cancels in the per-pair ratio, and small kernels timed in batches of
launches per evaluation, the graph built before the clock starts, so the figure is not
Python's overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

Launch = Callable[[], mx.array]

MIN_SAMPLE_SECONDS = 2e-3  # batch launches until one timed evaluation takes this long
MAX_BATCH = 256


@dataclass(frozen=True)
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    samples: tuple[float, ...]
    launches_per_sample: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s > 0 else 0.0


@dataclass(frozen=True)
class PairedTiming:
    candidate: Timing
    baseline: Timing
    ratio: float  # median over pairs of candidate/baseline time: < 1 means faster
    ratios: tuple[float, ...]


def _sample(launch: Launch, n: int) -> float:
    """Seconds per launch of n launches in one evaluation. The graph is built before the
    clock starts: what is timed is the kernels (and the back-end's dispatch of them), not
    the Python that describes them — which a model hides behind the GPU's work (MLX's
    asynchronous evaluation) or removes (mx.compile)."""
    outputs = [launch() for _ in range(n)]
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(outputs)
    mx.synchronize()
    return (time.perf_counter() - start) / n


def _batch_size(launch: Launch) -> int:
    """Launches per sample: doubled (after a warm-up launch) until a sample takes
    MIN_SAMPLE_SECONDS, so the evaluation's fixed cost (tens of microseconds on a GPU) is
    a small share of what is timed."""
    _sample(launch, 1)
    n = 1
    while n < MAX_BATCH and _sample(launch, n) * n < MIN_SAMPLE_SECONDS:
        n *= 2
    return n


def _summary(samples: list[float], n: int) -> Timing:
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return Timing(statistics.median(ordered), quartiles[0], quartiles[2], ordered[0],
                  tuple(samples), n)


def time_one(launch: Launch, reps: int = 5, warmup: int = 1) -> Timing:
    n = _batch_size(launch)
    for _ in range(warmup):
        _sample(launch, n)
    return _summary([_sample(launch, n) for _ in range(reps)], n)


def time_paired(candidate: Launch, baseline: Launch, reps: int = 5, warmup: int = 1) -> PairedTiming:
    # One batch size for both, so that both carry the same share of the fixed cost.
    nc = nb = max(_batch_size(candidate), _batch_size(baseline))
    for _ in range(warmup):
        _sample(candidate, nc)
        _sample(baseline, nb)
    cs, bs = [], []
    for i in range(reps):
        if i % 2 == 0:
            cs.append(_sample(candidate, nc))
            bs.append(_sample(baseline, nb))
        else:
            bs.append(_sample(baseline, nb))
            cs.append(_sample(candidate, nc))
    ratios = tuple(c / b for c, b in zip(cs, bs))
    return PairedTiming(_summary(cs, nc), _summary(bs, nb), statistics.median(ratios), ratios)
