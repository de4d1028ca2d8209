"""Measurements as every scorer of programs takes them: through the worker, into the
database, under one key, with one grade per phase.

`Measurer` is shared by the tuner, `kernelevo score`, `kernelevo verify` and evolution, so
a configuration measured by one is found by the others. A configuration is always timed
against the configuration the shipped heuristics choose for the shape (its baseline), so a
stored ratio means the same thing to every reader: time of the configuration over time of
the shipped choice, median of interleaved pairs.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from .. import chips, heuristics, ops
from ..chips import Chip
from ..config import KernelConfig
from ..dsl import parse
from ..dsl.select import CompiledProgram
from ..lowering import templates_hash
from ..families import MLX_BUILTIN
from .db import Database, Measurement
from .pool import DEFAULT_COMMAND, WorkerPool
from .workloads import Shape

Progress = Callable[[str], None]

#: repetitions (interleaved pairs) per phase, as multiples of the search's
GRADE = {"search": 1, "control": 3, "confirm": 3, "reproduce": 3}


@dataclass(frozen=True)
class MeasureSettings:
    reps: int = 5  # pairs per search measurement; the other phases take GRADE times as many
    warmup: int = 1
    seed: int = 0
    job_timeout_s: float = 300.0
    patience_s: float = 10.0  # how long a measurement waits for a quiet machine


def template_hash(backend: str) -> str:
    """What the measurements of `backend` are valid for: the compiled CPU kernels' source
    hash, or the GPU templates' and lowering's."""
    if backend == "cpu":
        return ops._ext.build_info()["cpu_kernel_hash"]
    return templates_hash(backend)


def shape_json(shape: Shape) -> str:
    data = asdict(shape)
    data.pop("label", None)
    return json.dumps(data, sort_keys=True)


def shipped_program(backend: str, chip: Chip) -> CompiledProgram:
    """The shipped heuristics for this chip: the baseline of every measurement."""
    source = heuristics.find_source(backend, chip, include_tuned=False)
    text = source.path.read_text(encoding="utf-8")
    return CompiledProgram(parse(text, str(source.path)), text, str(source.path), chip)


BOOTSTRAP = 2000  # resamples of the A/A pairs


def noise_band(control: Measurement | None) -> float | None:
    """A shape's noise band, from its A/A pair (the shipped choice against itself): how far
    from 1 the median of that many pair ratios of two identical kernels strays — the larger
    end of the central 95% of the medians of bootstrap resamples of its pairs — as a
    fraction (0.03: the figure a candidate is judged by, its median pair ratio, can be off
    by 3% with nothing changed). None when the control did not run or ran on a busy machine.
    (Seeded: the same pairs always give the same band.)"""
    if control is None or not control.ok or control.loaded:
        return None
    logs = [math.log(r) for r in control.pair_ratios if r > 0]
    if not logs:
        return None
    rng = random.Random(len(logs))
    medians = sorted(statistics.median(rng.choices(logs, k=len(logs))) for _ in range(BOOTSTRAP))
    low, high = medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]
    return math.exp(max(abs(low), abs(high))) - 1.0


def geomean(values: Iterable[float]) -> float:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


class Measurer:
    """Measures (shape, configuration) pairs through a worker, each paired with the shipped
    choice for the shape, and keeps every result in the database."""

    def __init__(self, backend: str, db: Database, settings: MeasureSettings = MeasureSettings(),
                 worker_command=DEFAULT_COMMAND, progress: Progress | None = None,
                 run_id: int | None = None):
        self.backend = backend
        self.chip = chips.detect(backend)
        self.db = db
        self.settings = settings
        self.worker_command = worker_command
        self.progress = progress or (lambda what: None)
        self.run_id = run_id
        self.template_hash = template_hash(backend)
        self.shipped = shipped_program(backend, self.chip)
        self.pool: WorkerPool | None = None
        self.measured = self.reused = self.failed = 0
        self._spent: dict[str, list[float]] = {}  # phase -> [seconds, new measurements]

    # -- the worker ------------------------------------------------------------------
    def __enter__(self) -> Measurer:
        self.pool = WorkerPool(self.worker_command, self.settings.job_timeout_s)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()

    @property
    def restarts(self) -> int:
        return self.pool.restarts if self.pool else 0

    def fresh_worker(self) -> None:
        """The next measurement runs in a new worker process."""
        if self.pool is not None:
            self.pool.fresh()

    # -- keys ------------------------------------------------------------------------
    def shipped_config(self, shape: Shape) -> KernelConfig:
        return self.shipped.select(shape.op, shape.features()).config

    def key(self, shape: Shape, config: str) -> dict:
        return dict(chip=self.chip.id, backend=self.backend, template_hash=self.template_hash,
                    op=shape.op, shape_key=shape.key, config=config)

    def valid_for(self, config: KernelConfig | str, shape: Shape) -> bool:
        cfg = config if isinstance(config, KernelConfig) else KernelConfig.parse(config, shape.op, self.backend)
        return not cfg.schema.violations(cfg.as_dict(), self.chip, shape.features())

    def lookup(self, shape: Shape, config: str, phases: tuple[str, ...] = ("confirm", "reproduce"),
               baseline: str | None = None) -> Measurement | None:
        """The newest stored measurement of `config` on `shape` in one of `phases`, paired
        with `baseline` (default: the shipped choice)."""
        baseline = baseline or self.shipped_config(shape).to_dsl()
        return self.db.latest(**self.key(shape, config), phase=phases, baseline_config=baseline)

    # -- measuring -------------------------------------------------------------------
    def measure(self, shape: Shape, config: str, phase: str = "confirm", *, reuse: bool = True,
                verify: bool = True, baseline: str | None = None) -> Measurement:
        """`config` on `shape`, paired with `baseline` (default: the shipped choice). With
        `reuse`, a stored measurement of this phase is returned instead of a new one,
        unless it was taken on a busy machine."""
        baseline = baseline or self.shipped_config(shape).to_dsl()
        if reuse:
            done = self.db.latest(**self.key(shape, config), phase=phase, baseline_config=baseline)
            if done is not None and not done.loaded:
                self.reused += 1
                if not done.ok:
                    self.failed += 1
                return done
        if self.pool is None:
            raise RuntimeError("Measurer.measure needs `with Measurer(...)` (a worker)")
        reps = self.settings.reps * GRADE[phase]
        seed = self.settings.seed + zlib.crc32(f"{shape.key}:{config}".encode()) % 100_000
        job = {"op": shape.op, "shape": json.loads(shape_json(shape)), "backend": self.backend,
               "config": config, "baseline": baseline, "reps": reps, "warmup": self.settings.warmup,
               "seed": seed, "verify": verify and config != MLX_BUILTIN, "phase": phase,
               # waiting for a quiet machine must not look like a hang
               "patience_s": min(self.settings.patience_s, self.settings.job_timeout_s / 4)}
        self.progress(f"{phase} {shape}")
        started = time.perf_counter()
        outcome = self.pool.run(job)
        spent = self._spent.setdefault(phase, [0.0, 0])
        spent[0] += time.perf_counter() - started
        spent[1] += 1
        self.measured += 1
        load = outcome.get("load") or {}
        row = self.db.record(
            run_id=self.run_id, **self.key(shape, config), phase=phase, status=outcome["status"],
            reason=outcome.get("reason"), error=outcome.get("error"),
            median_s=outcome.get("median_s"), q1_s=outcome.get("q1_s"), q3_s=outcome.get("q3_s"),
            min_s=outcome.get("min_s"), samples=outcome.get("samples"),
            baseline=f"shipped: {baseline}", baseline_config=baseline,
            baseline_median_s=outcome.get("baseline_median_s"),
            baseline_q1_s=outcome.get("baseline_q1_s"), baseline_q3_s=outcome.get("baseline_q3_s"),
            baseline_samples=outcome.get("baseline_samples"), ratio=outcome.get("ratio"),
            ratios=outcome.get("ratios"),
            bimodal=int(outcome["bimodal"]) if "bimodal" in outcome else None,
            load_watched=int(load["watched"]) if load else None, load_median=load.get("median"),
            load_worst=load.get("worst"), load_retakes=load.get("retakes"), reps=reps,
            launches=outcome.get("launches"), worker_pid=outcome.get("pid"))
        done = self.db.measurement(row)
        if not done.ok:
            self.failed += 1
        return done

    def seconds_per(self, phase: str) -> float | None:
        """Wall seconds a new measurement of this phase has taken here, on average."""
        seconds, count = self._spent.get(phase, (0.0, 0))
        return seconds / count if count else None

    def control(self, shape: Shape, reuse: bool = True) -> Measurement:
        """The A/A pair: the shipped choice against itself (verified, as every candidate)."""
        base = self.shipped_config(shape).to_dsl()
        return self.measure(shape, base, "control", reuse=reuse, baseline=base)

    def band(self, shape: Shape) -> float | None:
        base = self.shipped_config(shape).to_dsl()
        return noise_band(self.db.latest(**self.key(shape, base), phase="control", baseline_config=base))
