"""A tuning run: for every shape of a workload, verify and time candidate configurations
against the shipped choice, keep every measurement, and write the winners as a .kevo file.
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import chips, heuristics, ops
from ..chips import Chip
from ..config import ConfigError, KernelConfig
from ..dsl import DSLError, parse
from ..dsl.select import CompiledProgram
from ..families import families_for
from ..paths import tuned_heuristics_path
from .db import MLX_BUILTIN, Database
from .distill import TunedRule, distill
from .timing import time_paired
from .verify import compare, matmul_reference, random_operand
from .workloads import MatmulShape, Workload

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TuneSettings:
    candidates: int = 12  # sampled per shape, besides the shipped choice
    reps: int = 5
    warmup: int = 1
    seed: int = 0
    min_speedup: float = 1.03  # a tuned rule must beat the shipped one by this much
    confirm: int = 3  # the best few are timed again, with more repetitions, before one wins


@dataclass
class ShapeResult:
    shape: MatmulShape
    shipped: KernelConfig
    shipped_s: float | None = None
    mlx_s: float | None = None
    best: KernelConfig | None = None  # the tuned winner, when it beat the shipped choice
    best_s: float | None = None
    speedup: float = 1.0  # shipped time / time of what the written heuristics choose
    measured: int = 0
    reused: int = 0
    failed: int = 0


@dataclass
class TuneResult:
    run_id: int
    chip: Chip
    output: Path | None
    shapes: list[ShapeResult] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def geomean_speedup(self) -> float:
        values = [s.speedup for s in self.shapes if s.shipped_s]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def template_hash(backend: str) -> str:
    if backend == "cpu":
        return ops._ext.build_info()["cpu_kernel_hash"]
    raise ValueError(f"the {backend} backend has no kernels yet")


def odd_variant(shape: MatmulShape) -> MatmulShape:
    """A nearby shape with odd sizes, so edge handling is verified too."""
    def shrink(n: int, by: int) -> int:
        return n - by if n > 2 * by else n
    return MatmulShape(shrink(shape.M, 1), shrink(shape.N, 3), shrink(shape.K, 5), shape.dtype,
                       shape.batch, shape.transpose_b, shape.label)


def operands(shape: MatmulShape, seed: int) -> tuple[mx.array, mx.array]:
    batch = (shape.batch,) if shape.batch > 1 else ()
    b_shape = (shape.N, shape.K) if shape.transpose_b else (shape.K, shape.N)
    return (random_operand(batch + (shape.M, shape.K), shape.dtype, seed),
            random_operand(batch + b_shape, shape.dtype, seed + 1))


def candidates(shape: MatmulShape, backend: str, chip: Chip, count: int, seed: int,
               exclude: KernelConfig) -> list[KernelConfig]:
    """A seeded random sample of the valid configurations (all families) for this call."""
    features = shape.features()
    space = [KernelConfig.make(shape.op, backend, fam.name, params)
             for fam in families_for(shape.op, backend)
             for params in fam.search_space(chip, features)]
    space = [c for c in space if c != exclude]
    rng = random.Random(f"{seed}:{shape.key}")
    return rng.sample(space, min(count, len(space)))


class Tuner:
    def __init__(self, backend: str, db: Database, settings: TuneSettings = TuneSettings(),
                 progress: Progress | None = None):
        self.backend = backend
        self.chip = chips.detect(backend)
        self.db = db
        self.settings = settings
        self.progress = progress or (lambda done, total, what: None)
        self.template_hash = template_hash(backend)
        source = heuristics.find_source(backend, self.chip, include_tuned=False)
        self.shipped_path = source.path
        self.shipped_text = source.path.read_text(encoding="utf-8")
        self.shipped = CompiledProgram(parse(self.shipped_text, str(source.path)),
                                       self.shipped_text, str(source.path), self.chip)

    # -- one measurement -------------------------------------------------------------
    def _key(self, shape: MatmulShape, config: str) -> dict:
        return dict(chip=self.chip.id, backend=self.backend, template_hash=self.template_hash,
                    op=shape.op, shape_key=shape.key, config=config)

    def _verify(self, shape: MatmulShape, config: KernelConfig, seed: int) -> tuple[bool, float, str]:
        worst = 0.0
        for variant in (shape, odd_variant(shape)):
            a, b = operands(variant, seed)
            out = ops.matmul(a, b, transpose_b=variant.transpose_b, config=config)
            check = compare(out, matmul_reference(a, b, variant.transpose_b), shape.dtype)
            worst = max(worst, check.error)
            if not check.ok:
                return False, check.error, f"wrong result at {variant}: {check.reason}"
        return True, worst, ""

    def measure(self, run_id: int, shape: MatmulShape, config: KernelConfig,
                baseline: Callable[[], mx.array], inputs: tuple[mx.array, mx.array],
                result: ShapeResult, baseline_name: str, phase: str = "search"):
        """Verifies then times one configuration against the baseline; records it."""
        key = self._key(shape, config.to_dsl()) | {"phase": phase}
        done = self.db.latest(**key)
        if done is not None:
            result.reused += 1
            result.failed += not done.ok
            return done
        result.measured += 1
        seed = self.settings.seed + zlib.crc32(config.name.encode()) % 100_000
        try:
            ok, error, reason = self._verify(shape, config, seed)
            if not ok:
                result.failed += 1
                self.db.record(run_id=run_id, **key, status="wrong", reason=reason, error=error)
                return self.db.latest(**key)
            a, b = inputs
            launch = ops.matmul_launcher(a, b, config, transpose_b=shape.transpose_b)
            reps = self.settings.reps * (3 if phase == "confirm" else 1)
            t = time_paired(launch, baseline, reps, self.settings.warmup)
        except (RuntimeError, ValueError, ConfigError, DSLError, MemoryError) as err:
            result.failed += 1
            self.db.record(run_id=run_id, **key, status="error", reason=f"{type(err).__name__}: {err}")
            return self.db.latest(**key)
        self.db.record(run_id=run_id, **key, status="ok", error=error, median_s=t.candidate.median_s,
                       q1_s=t.candidate.q1_s, q3_s=t.candidate.q3_s, min_s=t.candidate.min_s,
                       samples=t.candidate.samples, baseline=baseline_name,
                       baseline_median_s=t.baseline.median_s, ratio=t.ratio)
        return self.db.latest(**key)

    # -- a whole run -------------------------------------------------------------------
    def run(self, workload: Workload, output: Path | None = None, write: bool = True) -> TuneResult:
        started = time.perf_counter()
        run_id = self.db.start_run(self.chip.id, self.backend, workload.name, asdict(self.settings))
        result = TuneResult(run_id, self.chip, None)
        total = len(workload.shapes) * (self.settings.candidates + 2 + self.settings.confirm)
        done = 0
        try:
            for shape in workload.shapes:
                shape_result, done = self._tune_shape(run_id, shape, done, total)
                result.shapes.append(shape_result)
            if write:
                result.output = self.write(result, output)
            self.db.finish_run(run_id, "finished", str(result.output) if result.output else None)
        except KeyboardInterrupt:
            self.db.finish_run(run_id, "interrupted", None)
            raise
        result.elapsed_s = time.perf_counter() - started
        return result

    def _tune_shape(self, run_id: int, shape: MatmulShape, done: int, total: int):
        shipped = self.shipped.select(shape.op, shape.features()).config
        result = ShapeResult(shape, shipped)
        inputs = operands(shape, self.settings.seed)
        a, b = inputs
        try:
            baseline = ops.matmul_launcher(a, b, shipped, transpose_b=shape.transpose_b)
        except (ConfigError, ValueError) as err:
            raise RuntimeError(f"the shipped heuristics chose an invalid configuration for "
                               f"{shape}: {err}") from err
        name = f"shipped: {shipped.to_dsl()}"
        # The shipped choice against itself: its own time, and a check that it is right.
        shipped_row = self.measure(run_id, shape, shipped, baseline, inputs, result, name)
        done += 1
        self.progress(done, total, f"{shape}")
        if shipped_row.ok:
            result.shipped_s = shipped_row.median_s
        # The built-in MLX op, for reference.
        mlx_row = self._measure_mlx(run_id, shape, baseline, inputs, result, name)
        result.mlx_s = mlx_row.median_s if mlx_row.ok else None
        done += 1
        self.progress(done, total, f"{shape}")
        timed = []
        for config in candidates(shape, self.backend, self.chip, self.settings.candidates,
                                 self.settings.seed, shipped):
            row = self.measure(run_id, shape, config, baseline, inputs, result, name)
            done += 1
            self.progress(done, total, f"{shape}")
            if row.ok and row.ratio is not None:
                timed.append((row.ratio, config))
        # One pairing on a busy machine can flatter a candidate: the best few are timed
        # again with more repetitions, and only that second figure can make a winner.
        best = None
        timed.sort(key=lambda t: t[0])
        for _, config in timed[:self.settings.confirm]:
            row = self.measure(run_id, shape, config, baseline, inputs, result, name, "confirm")
            if row.ok and (best is None or row.ratio < best[1].ratio):
                best = (config, row)
        done += self.settings.confirm
        self.progress(done, total, f"{shape}")
        if best is not None and result.shipped_s and 1.0 / best[1].ratio >= self.settings.min_speedup:
            config, row = best
            result.best, result.best_s = config, row.median_s
            result.shipped_s = row.baseline_median_s  # the same pairs as the winner's time
            result.speedup = 1.0 / row.ratio
        return result, done

    def _measure_mlx(self, run_id, shape, baseline, inputs, result, baseline_name):
        key = self._key(shape, MLX_BUILTIN)
        done = self.db.latest(**key)
        if done is not None:
            result.reused += 1
            return done
        a, b = inputs
        bt = mx.swapaxes(b, -1, -2) if shape.transpose_b else b
        t = time_paired(lambda: mx.matmul(a, bt), baseline, self.settings.reps, self.settings.warmup)
        self.db.record(run_id=run_id, **key, status="ok", median_s=t.candidate.median_s,
                       q1_s=t.candidate.q1_s, q3_s=t.candidate.q3_s, min_s=t.candidate.min_s,
                       samples=t.candidate.samples, baseline=baseline_name,
                       baseline_median_s=t.baseline.median_s, ratio=t.ratio)
        return self.db.latest(**key)

    # -- output ------------------------------------------------------------------------
    def write(self, result: TuneResult, output: Path | None) -> Path:
        rules = [TunedRule(s.shape, s.best, s.speedup, s.shipped_s, s.best_s)
                 for s in result.shapes if s.best is not None]
        text = distill(rules, self.shipped.program, self.shipped_path.name, self.chip)
        path = Path(output) if output else tuned_heuristics_path(self.chip.id)
        CompiledProgram(parse(text, str(path)), text, str(path), self.chip)  # must check clean
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path.rename(path.with_name(f"{path.name}.{stamp}.prev"))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        ops.forget_selections()
        return path
