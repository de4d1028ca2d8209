"""A tuning run.

For every shape of a workload: verify and time the shipped choice and MLX's own op, search
the families' parameter spaces (every candidate verified in the dtype that runs before it
is timed, paired with the shipped choice), time the best few again, then time each group's
finalists on the group's other shapes so that one configuration can serve many, distill
the winners into readable rules placed before the shipped ones, and write the file.

Candidates run in a worker process (pool.py): a crash or hang is recorded and the worker
replaced. Every measurement is committed as it is taken (db.py): a run killed at any
moment resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import chips, heuristics, ops
from ..chips import Chip
from ..config import KernelConfig
from ..dsl import parse
from ..dsl.select import CompiledProgram
from ..families import families_for
from ..lowering import templates_hash
from ..paths import tuned_heuristics_path
from . import DEFAULT_CANDIDATES
from .db import MLX_BUILTIN, Database, Measurement
from .distill import Distilled, distill
from .pool import DEFAULT_COMMAND, WorkerPool
from .search import Space, make_strategy
from .workloads import Shape, Workload

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TuneSettings:
    strategy: str = "evolve"
    candidates: int = DEFAULT_CANDIDATES  # configurations searched per shape, besides the shipped one
    reps: int = 5
    warmup: int = 1
    seed: int = 0
    min_speedup: float = 1.03  # a tuned rule must beat the shipped one by this much
    confirm: int = 3  # the best few are timed again (3x the repetitions) before one wins
    cross: int = 6  # finalists per group timed on the group's other shapes
    time_budget_s: float | None = None  # stop searching (not confirming) after this long
    job_timeout_s: float = 300.0


@dataclass
class ShapeResult:
    shape: Shape
    shipped: KernelConfig
    shipped_s: float | None = None
    mlx_s: float | None = None
    best: KernelConfig | None = None  # the per-shape winner, when it beat the shipped choice
    best_s: float | None = None
    speedup: float = 1.0  # of what the written heuristics choose, over the shipped choice
    chosen: KernelConfig | None = None  # what the written heuristics choose
    ratios: dict[str, float] = field(default_factory=dict)  # config -> time / shipped time
    measured: int = 0
    reused: int = 0
    failed: int = 0
    failure: str | None = None  # why the shipped choice itself failed

    @property
    def best_speedup(self) -> float:
        return 1.0 / min(self.ratios.values(), default=1.0) if self.best else 1.0


@dataclass
class TuneResult:
    run_id: int
    chip: Chip
    output: Path | None = None
    shapes: list[ShapeResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    distilled: Distilled | None = None
    elapsed_s: float = 0.0
    restarts: int = 0

    @staticmethod
    def _geomean(values) -> float:
        values = list(values)
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0

    @property
    def geomean_speedup(self) -> float:
        """Of the written heuristics over the shipped ones, on the measured shapes."""
        return self._geomean(s.speedup for s in self.shapes if s.shipped_s)

    @property
    def geomean_best(self) -> float:
        """Of each shape's own winner over the shipped choice: the distillation's bound."""
        return self._geomean(max(s.best_speedup, 1.0) for s in self.shapes if s.shipped_s)


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


def _group(shape: Shape) -> tuple:
    """Shapes whose configurations are worth comparing with each other."""
    f = shape.features()
    if shape.op == "matmul":
        return ("matmul", f["dtype"], f["transpose_b"], f["M"] <= 16)
    return ("attention", f["dtype"], f["q_len"] <= 8, f["mask"])


class Tuner:
    def __init__(self, backend: str, db: Database, settings: TuneSettings = TuneSettings(),
                 progress: Progress | None = None, worker_command: Sequence[str] = DEFAULT_COMMAND):
        self.backend = backend
        self.chip = chips.detect(backend)
        self.db = db
        self.settings = settings
        self.progress = progress or (lambda done, total, what: None)
        self.worker_command = worker_command
        self.template_hash = template_hash(backend)
        source = heuristics.find_source(backend, self.chip, include_tuned=False)
        self.shipped_path = source.path
        text = source.path.read_text(encoding="utf-8")
        self.shipped = CompiledProgram(parse(text, str(source.path)), text, str(source.path), self.chip)
        self._done = self._total = 0
        self._started = 0.0

    # -- measurements ------------------------------------------------------------------
    def _measure(self, pool: WorkerPool, run_id: int, shape: Shape, config: str, result: ShapeResult,
                 phase: str = "search", baseline: str | None = None, verify: bool = True) -> Measurement:
        key = dict(chip=self.chip.id, backend=self.backend, template_hash=self.template_hash,
                   op=shape.op, shape_key=shape.key, config=config, phase=phase)
        done = self.db.latest(**key)
        if done is not None:  # measured before (a resumed run): never twice
            result.reused += 1
        else:
            reps = self.settings.reps * (3 if phase == "confirm" else 1)
            seed = self.settings.seed + zlib.crc32(f"{shape.key}:{config}".encode()) % 100_000
            job = {"op": shape.op, "shape": json.loads(shape_json(shape)), "backend": self.backend,
                   "config": config, "baseline": baseline, "reps": reps,
                   "warmup": self.settings.warmup, "seed": seed, "verify": verify}
            outcome = pool.run(job)
            result.measured += 1
            samples = outcome.get("samples")
            self.db.record(run_id=run_id, **key, status=outcome["status"], reason=outcome.get("reason"),
                           error=outcome.get("error"), median_s=outcome.get("median_s"),
                           q1_s=outcome.get("q1_s"), q3_s=outcome.get("q3_s"),
                           min_s=outcome.get("min_s"), samples=tuple(samples) if samples else None,
                           baseline=f"shipped: {baseline}" if baseline else None,
                           baseline_config=baseline,
                           baseline_median_s=outcome.get("baseline_median_s"), ratio=outcome.get("ratio"))
            done = self.db.latest(**key)
        if not done.ok:
            result.failed += 1
        elif done.ratio is not None and config not in (MLX_BUILTIN,):
            # confirmations overrule a first impression
            if phase == "confirm" or config not in result.ratios:
                result.ratios[config] = done.ratio
        self._done += 1
        self.progress(self._done, self._total, str(shape))
        return done

    def _out_of_time(self) -> bool:
        budget = self.settings.time_budget_s
        return budget is not None and time.perf_counter() - self._started > budget

    # -- a whole run -------------------------------------------------------------------
    def run(self, workload: Workload, output: Path | None = None, write: bool = True) -> TuneResult:
        self._started = time.perf_counter()
        settings = asdict(self.settings)
        run_id = self.db.start_run(self.chip.id, self.backend, workload.name, settings)
        result = TuneResult(run_id, self.chip)
        shapes = []
        for shape in workload.shapes:
            if not families_for(shape.op, self.backend) or not self.shipped.has(shape.op):
                reason = f"{shape.op}: no {self.backend} kernels or shipped rules"
                if reason not in result.skipped:
                    result.skipped.append(reason)
                continue
            shapes.append(shape)
        self.db.set_run_shapes(run_id, [(s.op, s.key, shape_json(s), s.label) for s in shapes])
        per_shape = 2 + self.settings.candidates + self.settings.confirm
        self._total = len(shapes) * per_shape + len(shapes) * self.settings.cross
        try:
            with WorkerPool(self.worker_command, self.settings.job_timeout_s) as pool:
                for shape in shapes:
                    tuned = self._tune_shape(pool, run_id, shape)
                    if tuned.shipped_s is None:  # no baseline to compare with: left as shipped
                        result.skipped.append(f"{shape}: the shipped choice {tuned.shipped.to_dsl()} "
                                              f"failed ({tuned.failure})")
                    else:
                        result.shapes.append(tuned)
                self._cross_time(pool, run_id, result)
                result.restarts = pool.restarts
            result.distilled = distill(result.shapes, self.settings.min_speedup)
            self._apply(result)
            self.db.set_run_results(run_id, [
                {"shape_key": s.shape.key, "op": s.shape.op, "shipped_config": s.shipped.to_dsl(),
                 "shipped_s": s.shipped_s, "mlx_s": s.mlx_s, "chosen_config": s.chosen.to_dsl(),
                 "speedup": s.speedup, "best_speedup": max(s.best_speedup, 1.0)} for s in result.shapes])
            if write:
                result.output = self.write(result, output)
            self.db.finish_run(run_id, "finished", str(result.output) if result.output else None)
        except KeyboardInterrupt:
            self.db.finish_run(run_id, "interrupted", None)
            raise
        result.elapsed_s = time.perf_counter() - self._started
        return result

    def _tune_shape(self, pool: WorkerPool, run_id: int, shape: Shape) -> ShapeResult:
        shipped = self.shipped.select(shape.op, shape.features()).config
        result = ShapeResult(shape, shipped)
        base = shipped.to_dsl()
        own = self._measure(pool, run_id, shape, base, result, baseline=base)
        if not own.ok:
            result.failure = own.reason
            return result
        result.shipped_s = own.median_s
        builtin = self._measure(pool, run_id, shape, MLX_BUILTIN, result, baseline=base, verify=False)
        result.mlx_s = builtin.median_s if builtin.ok else None

        space = Space(shape.op, self.backend, self.chip, shape.features())
        strategy = make_strategy(self.settings.strategy, space,
                                 self.settings.seed + zlib.crc32(shape.key.encode()), {shipped})
        searched = 0
        while searched < self.settings.candidates and not self._out_of_time():
            batch = strategy.ask(min(4, self.settings.candidates - searched))
            if not batch:
                break
            for config in batch:
                row = self._measure(pool, run_id, shape, config.to_dsl(), result, baseline=base)
                strategy.tell(config, row.ratio if row.ok else None)
                searched += 1
        self._done += self.settings.candidates - searched  # budget left unused
        # One pairing on a busy machine can flatter a candidate: the best few are timed
        # again with more repetitions, and only that second figure can make a winner.
        finalists = sorted((r, c) for c, r in result.ratios.items() if c != base)[:self.settings.confirm]
        for _, config in finalists:
            self._measure(pool, run_id, shape, config, result, "confirm", baseline=base)
        self._done += self.settings.confirm - len(finalists)
        names = {c for _, c in finalists}
        confirmed = {c: r for c, r in result.ratios.items() if c in names}
        if confirmed:
            config, ratio = min(confirmed.items(), key=lambda kv: kv[1])
            if 1.0 / ratio >= self.settings.min_speedup:
                result.best = KernelConfig.parse(config, shape.op, self.backend)
                result.best_s = result.shipped_s * ratio
        return result

    def _cross_time(self, pool: WorkerPool, run_id: int, result: TuneResult) -> None:
        """Times each group's finalists on the group's other shapes: the data that lets
        one rule serve several shapes."""
        groups: dict[tuple, list[ShapeResult]] = defaultdict(list)
        for s in result.shapes:
            groups[_group(s.shape)].append(s)
        for members in groups.values():
            winners = sorted((s for s in members if s.best), key=lambda s: -s.best_speedup)
            finalists = list(dict.fromkeys(s.best.to_dsl() for s in winners))[:self.settings.cross]
            for s in members:
                for config in finalists:
                    if self._out_of_time():
                        return
                    if config in s.ratios or not self._valid_for(config, s.shape):
                        continue
                    self._measure(pool, run_id, s.shape, config, s, baseline=s.shipped.to_dsl())

    def _valid_for(self, config: str, shape: Shape) -> bool:
        cfg = KernelConfig.parse(config, shape.op, self.backend)
        return not cfg.schema.violations(cfg.as_dict(), self.chip, shape.features())

    def _apply(self, result: TuneResult) -> None:
        """Records what the distilled rules choose for each shape, and its speedup."""
        for s in result.shapes:
            chosen = result.distilled.choice.get(s.shape.key) if result.distilled else None
            s.chosen = chosen or s.shipped
            s.speedup = 1.0 / s.ratios[chosen.to_dsl()] if chosen else 1.0

    # -- output ------------------------------------------------------------------------
    def write(self, result: TuneResult, output: Path | None) -> Path:
        text = result.distilled.render(self.shipped.program, self.shipped_path.name, self.chip)
        path = Path(output) if output else tuned_heuristics_path(self.chip.id)
        CompiledProgram(parse(text, str(path)), text, str(path), self.chip)  # must check clean
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path.rename(path.with_name(f"{path.name}.{stamp}.prev"))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        ops.forget_selections()
        return path
