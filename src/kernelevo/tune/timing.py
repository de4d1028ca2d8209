"""Timing in the process that runs the kernel, as DESIGN.md asks.

- **As a model runs it.** A sample is a chain of launches in one evaluation, each launch
  depending on the one before (on a GPU through the buffer it wrote: adapters.chained),
  the graph built before the clock starts: the regime of a model's forward pass, where MLX
  neither overlaps independent launches (as it may on a GPU) nor pays one evaluation's
  fixed cost per call.
- **Paired.** Candidate and baseline alternate (A B, B A, ...) with one batch size for
  both, and the ratio is taken pair by pair, so drift of the machine cancels.
- **Watched.** Pairs are taken in blocks of at least BLOCK_SECONDS, and for each block the
  CPU time the rest of the machine used is read: all CPUs' busy time (/proc/stat) less this
  process's own (all its threads). A block in which other work used more than
  LOAD_THRESHOLD of the machine's capacity is re-taken after a pause; when the machine
  stays busy for `patience` seconds the pairs are kept and the result says it was taken
  under load, so the tuner can refuse to decide anything on it. (The kernel's CPU pressure
  counter is no guide: a chain of small launches keeps MLX's threads and the kernel's
  team runnable at once, and that contention is the configuration's own.)
- **Warm.** Before the pairs, both sides are run alternately until their samples settle
  (the last three of each within 10%, at most a quarter of a second): on the 2-core VM a thread team
  that has been idle wakes slowly — 2 ms a launch instead of 0.4 — for the first several
  samples of a job.
- **Shape of the evidence.** Pairs whose ratios fall into two separate states (a thread
  team that wakes slowly for one configuration but not the other, for seconds at a time)
  are flagged `bimodal`: a median then reports one state's luck, and no rule may be written
  on it. (A state that slows both sides of every pair alike cancels in the ratios.)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

#: A launch builds one call; given the previous launch's output, it depends on it.
Launch = Callable[[mx.array | None], mx.array]

MIN_SAMPLE_SECONDS = 5e-3  # chain launches until one timed evaluation takes this long
MAX_BATCH = 256
WARMUP_MAX_SECONDS = 0.25  # warm up until samples settle, at most this long
SETTLED = 1.10  # the last three samples of each side within 10% of each other
LOAD_THRESHOLD = 0.2  # share of the machine's CPU time other work may use during a block
BLOCK_SECONDS = 0.2  # /proc/stat counts in ticks (10 ms): a block this long reads within ~5%
BUSY_PAUSE_S = 0.05  # wait before re-taking a block that ran under load
#: two states: the samples split by a gap wider than this factor, each side this share
BIMODAL_GAP = 1.25
BIMODAL_SHARE = 0.2

STAT_FILE = Path("/proc/stat")


@dataclass(frozen=True)
class Reading:
    busy_s: float  # CPU time all CPUs spent busy since boot
    own_s: float  # CPU time of this process (every thread)
    wall_s: float


class LoadProbe:
    """Reads how much CPU time the rest of the machine takes. Where the kernel offers no
    /proc/stat (macOS), `available` is False: the load is then not watched, and results
    say so."""

    def __init__(self, path: Path = STAT_FILE):
        self.path = path
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.cpus = 1
        self.available = self._busy() is not None

    def _busy(self) -> float | None:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
            values = [int(v) for v in lines[0].split()[1:9]]
            self.cpus = max(1, sum(1 for line in lines[1:] if line.startswith(b"cpu")))
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + values[4]  # idle, iowait
        return (sum(values) - idle) * self.tick

    def read(self) -> Reading | None:
        if not self.available:
            return None
        busy = self._busy()
        return None if busy is None else Reading(busy, time.process_time(), time.perf_counter())

    def foreign_share(self, before: Reading | None, after: Reading | None) -> float:
        """Share of the machine's CPU capacity that other work used between two readings."""
        if before is None or after is None or after.wall_s <= before.wall_s:
            return 0.0
        foreign = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
        return max(0.0, foreign / ((after.wall_s - before.wall_s) * self.cpus))


_PROBE = LoadProbe()


def use_probe(probe: LoadProbe) -> None:
    """Replace the machine's probe (tests inject a scripted one)."""
    global _PROBE
    _PROBE = probe


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

    @property
    def bimodal(self) -> bool:
        return is_bimodal(self.samples)


@dataclass(frozen=True)
class Load:
    """What the load probe saw during a measurement."""

    watched: bool  # False where the machine's CPU time cannot be read
    median: float = 0.0  # median over the kept blocks of the share other work used
    worst: float = 0.0
    retakes: int = 0  # blocks re-taken because the machine was busy
    waited_s: float = 0.0

    @property
    def loaded(self) -> bool:
        """Kept pairs ran on a busy machine (the patience ran out)."""
        return self.watched and self.median > LOAD_THRESHOLD


@dataclass(frozen=True)
class PairedTiming:
    candidate: Timing
    baseline: Timing
    ratio: float  # median over pairs of candidate/baseline time: < 1 means faster
    ratios: tuple[float, ...]
    load: Load

    @property
    def bimodal(self) -> bool:
        return is_bimodal(self.ratios)


def is_bimodal(samples: Sequence[float]) -> bool:
    """Two states: sorted, the samples have a gap wider than BIMODAL_GAP with at least
    BIMODAL_SHARE of them (and at least 2) on each side."""
    values = sorted(s for s in samples if s > 0)
    n = len(values)
    least = max(2, math.ceil(BIMODAL_SHARE * n))
    return any(values[i] / values[i - 1] > BIMODAL_GAP
               for i in range(least, n - least + 1))


class _Eager:
    """A launch whose work happens in the call (numpy, PyTorch): see `eager`."""

    _done = mx.array(0)

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn

    def __call__(self, after: mx.array | None = None) -> mx.array:
        self.fn()
        return self._done


def eager(fn: Callable[[], object]) -> Launch:
    """A baseline computed eagerly (numpy, PyTorch) as a launch: its samples time n calls in
    a row around the calls themselves (no graph to build before the clock starts), so it
    can be paired with kernelevo's chained launches."""
    return _Eager(fn)


def _chain(launch: Launch, n: int) -> mx.array:
    out = None
    for _ in range(n):
        out = launch(out)
    return out


def _sample(launch: Launch, n: int) -> float:
    """Seconds per launch of a chain of n launches in one evaluation. The graph is built
    before the clock starts: what is timed is the kernels (and the back-end's dispatch of
    them), not the Python that describes them — which a model hides behind the GPU's work
    (MLX's asynchronous evaluation) or removes (mx.compile)."""
    if isinstance(launch, _Eager):
        start = time.perf_counter()
        for _ in range(n):
            launch.fn()
        return (time.perf_counter() - start) / n
    out = _chain(launch, n)
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(out)
    mx.synchronize()
    return (time.perf_counter() - start) / n


def _batch_size(launch: Launch) -> int:
    """Launches per sample: doubled (after a warm-up launch) until a sample takes
    MIN_SAMPLE_SECONDS, so the evaluation's fixed cost (tens of microseconds) and the jitter
    of single launches are a small share of what is timed."""
    _sample(launch, 1)
    n = 1
    while n < MAX_BATCH and _sample(launch, n) * n < MIN_SAMPLE_SECONDS:
        n *= 2
    return n


def _settled(values: list[float]) -> bool:
    last = values[-3:]
    return len(last) == 3 and max(last) <= SETTLED * min(last)


def _warm(launches: Sequence[Launch], n: int, at_least: int) -> None:
    """Runs the launches in turn until each one's last three samples agree within SETTLED
    (and at least `at_least` rounds), or WARMUP_MAX_SECONDS have passed."""
    seen: list[list[float]] = [[] for _ in launches]
    deadline = time.perf_counter() + WARMUP_MAX_SECONDS
    rounds = 0
    while True:
        for launch, values in zip(launches, seen):
            values.append(_sample(launch, n))
        rounds += 1
        if rounds >= at_least and all(_settled(v) for v in seen):
            return
        if time.perf_counter() > deadline:
            return


def _summary(samples: list[float], n: int) -> Timing:
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return Timing(statistics.median(ordered), quartiles[0], quartiles[2], ordered[0],
                  tuple(samples), n)


def time_one(launch: Launch, reps: int = 5, warmup: int = 1) -> Timing:
    n = _batch_size(launch)
    _warm([launch], n, warmup)
    n = max(n, _batch_size(launch))  # (a batch sized on a cold team is too small)
    return _summary([_sample(launch, n) for _ in range(reps)], n)


class _Patience:
    """How long to wait for a quiet machine. Once a whole wait ran out, the machine is
    taken to be busy and later measurements wait only briefly, until a quiet pair shows
    the load has gone (so a run on a machine that stays busy does not stall for good)."""

    def __init__(self) -> None:
        self.busy = False

    def allowance(self, patience_s: float) -> float:
        return min(patience_s, 4 * BUSY_PAUSE_S) if self.busy else patience_s


_patience = _Patience()


def time_paired(candidate: Launch, baseline: Launch, reps: int = 5, warmup: int = 1,
                patience_s: float = 10.0) -> PairedTiming:
    # One batch size for both, so that both carry the same share of the fixed cost; sized
    # again once warm (a batch sized on a cold team is too small).
    n = max(_batch_size(candidate), _batch_size(baseline))
    _warm([candidate, baseline], n, warmup)
    n = max(n, _batch_size(candidate), _batch_size(baseline))
    cs: list[float] = []
    bs: list[float] = []
    shares: list[float] = []
    retakes, waited, allowance = 0, 0.0, _patience.allowance(patience_s)
    while len(cs) < reps:
        # A block: pairs until it lasts BLOCK_SECONDS (or the repetitions are done).
        block_c, block_b = [], []
        start = _PROBE.read()
        began = time.perf_counter()
        while len(cs) + len(block_c) < reps and (not block_c or time.perf_counter() - began < BLOCK_SECONDS):
            if (len(cs) + len(block_c)) % 2 == 0:
                c, b = _sample(candidate, n), _sample(baseline, n)
            else:
                b, c = _sample(baseline, n), _sample(candidate, n)
            block_c.append(c)
            block_b.append(b)
        share = _PROBE.foreign_share(start, _PROBE.read())
        if share > LOAD_THRESHOLD and waited < allowance:
            retakes += 1
            time.sleep(BUSY_PAUSE_S)
            waited += BUSY_PAUSE_S + (time.perf_counter() - began)
            continue
        if share <= LOAD_THRESHOLD:
            _patience.busy = False
        else:
            _patience.busy = True  # the wait ran out: keep it, marked as taken under load
        cs += block_c
        bs += block_b
        shares.append(share)
    ratios = tuple(c / b for c, b in zip(cs, bs))
    load = Load(_PROBE.available, statistics.median(shares), max(shares), retakes, waited)
    return PairedTiming(_summary(cs, n), _summary(bs, n), statistics.median(ratios), ratios, load)
