"""A tuning run.

1. For every training shape: the A/A control (the shipped choice, verified, timed against
   itself: the shape's noise band) and MLX's own op; a search of the families' parameter
   spaces (every candidate verified in the dtype that runs before it is timed, paired with
   the shipped choice); the best few confirmed with three times the repetitions.
2. Each group's winners are confirmed on the group's other shapes, so one configuration
   can be shown to serve many.
3. Distillation grows decision trees at several depths from confirmed timings only
   (distill.py); each is scored on the held-out shapes, leaves the held-out shapes do not
   confirm are dropped, and per group the smallest tree within 2% of the best is kept.
4. Every rule left is re-timed in fresh workers on every shape it claims (reproduce.py);
   one that does not reproduce is dropped. The claims written are those re-timed figures.
5. The program is written, and the run's results — observed medians of both sides — go
   to the database.

Candidates run in a worker process (pool.py): a crash or hang is recorded and the worker
replaced. Every measurement is committed as it is taken (db.py): a run killed at any
moment resumes where it stopped.
"""

from __future__ import annotations

import glob
import os
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import ops
from ..chips import Chip
from ..config import KernelConfig
from ..dsl import parse
from ..dsl.select import CompiledProgram
from ..families import families_for
from ..heuristics import seed_program
from ..paths import check_writable, tuned_heuristics_path
from . import DEFAULT_CANDIDATES, distill
from ..families import MLX_BUILTIN
from .db import Database, Measurement, one_line
from .distill import Distilled, Evidence, TunedRule
from .measure import MeasureSettings, Measurer, geomean, noise_band, shape_json
from .pool import DEFAULT_COMMAND
from .reproduce import Reproduction, claim_text, reproduce
from .score import Scorer
from .search import Space, make_strategy
from .workloads import Shape, Workload

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TuneSettings:
    strategy: str = "evolve"
    candidates: int = DEFAULT_CANDIDATES  # configurations searched per shape, besides the shipped one
    reps: int = 5  # pairs per search measurement; control, confirm and reproduce take 3x
    warmup: int = 1
    seed: int = 0
    min_speedup: float = 1.03  # a tuned rule must beat the shipped one by this much
    confirm: int = 3  # the best few of the search are confirmed before one may win
    cross: int = 4  # winners per group confirmed on the group's other shapes
    time_budget_s: float | None = None  # stop searching (not confirming) after this long
    job_timeout_s: float = 300.0
    patience_s: float = 10.0  # how long a measurement waits for a quiet machine
    reproduce_rounds: int = 2  # fresh workers that re-time each rule before it is written

    def measure_settings(self) -> MeasureSettings:
        return MeasureSettings(self.reps, self.warmup, self.seed, self.job_timeout_s, self.patience_s)


@dataclass
class ShapeResult:
    shape: Shape
    shipped: KernelConfig
    split: str = "train"
    control: Measurement | None = None  # the A/A pair
    mlx: Measurement | None = None  # MLX's own op against the shipped choice
    search: dict[str, float] = field(default_factory=dict)  # config -> search-phase ratio
    confirmed: dict[str, Measurement] = field(default_factory=dict)  # usable confirmations
    failure: str | None = None  # why the shipped choice itself failed
    shipped_rule: int | None = None  # the number of the shipped rule that serves the shape

    @property
    def band(self) -> float | None:
        return noise_band(self.control)

    @property
    def best(self) -> tuple[str, float] | None:
        """The confirmed configuration with the lowest ratio, and that ratio."""
        if not self.confirmed:
            return None
        config = min(self.confirmed, key=lambda c: (self.confirmed[c].ratio, c))
        return config, self.confirmed[config].ratio

    def evidence(self) -> Evidence | None:
        if self.band is None:
            return None
        ratios = {c: m.ratio for c, m in self.confirmed.items()}
        # What the shipped rules choose runs exactly as they do: 1 by identity, not measured
        # (an A/A pair's ratio is noise, never a candidate's figure).
        ratios[self.shipped.to_dsl()] = 1.0
        return Evidence(self.shape, self.band, ratios, self.shipped_rule)


@dataclass
class ShapeOutcome:
    """What the written program does on one shape, with the observed timings."""

    split: str
    shape: Shape
    shipped: str
    chosen: str
    rule: int | None = None
    reproduction: Reproduction | None = None
    band: float | None = None
    mlx_ratio: float | None = None
    control: Measurement | None = None

    @property
    def ratio(self) -> float:
        if self.reproduction is None:
            return 1.0
        return self.reproduction.ratio or 1.0

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio


@dataclass
class TuneResult:
    run_id: int
    chip: Chip
    output: Path | None = None
    shapes: list[ShapeResult] = field(default_factory=list)  # training shapes tuned
    outcomes: list[ShapeOutcome] = field(default_factory=list)  # train and held-out
    skipped: list[str] = field(default_factory=list)
    distilled: Distilled | None = None
    dropped: list[str] = field(default_factory=list)  # rules not written, with the reason
    elapsed_s: float = 0.0
    tuning_s: float = 0.0  # of it, tuning the training shapes (what a time budget bounds)
    unchanged: bool = False  # the file written already held these rules: left as it was
    restarts: int = 0
    measured: int = 0
    reused: int = 0
    failed: int = 0
    loaded: int = 0  # measurements taken on a busy machine (never decide anything)
    watched: bool = True  # the machine's load could be read

    def geomean_speedup(self, split: str = "train") -> float:
        """Of the written heuristics over the shipped ones, observed in fresh workers."""
        return geomean(o.speedup for o in self.outcomes if o.split == split)

    @property
    def geomean_best(self) -> float:
        """Of each training shape's own confirmed winner over the shipped choice: the
        distillation's bound."""
        return geomean(max(1.0 / s.best[1], 1.0) if s.best else 1.0 for s in self.shapes)


class Tuner:
    def __init__(self, backend: str, db: Database, settings: TuneSettings = TuneSettings(),
                 progress: Progress | None = None, worker_command: Sequence[str] = DEFAULT_COMMAND):
        self.backend = backend
        self.db = db
        self.settings = settings
        self.report_progress = progress or (lambda done, total, what: None)
        self.measurer = Measurer(backend, db, settings.measure_settings(), worker_command,
                                 progress=self._step)
        self.chip = self.measurer.chip
        self.shipped = self.measurer.shipped
        self.shipped_path = Path(self.shipped.path)
        # where the search starts: on a Mac MLX's choices restated with kernelevo's kernels
        # (the shipped choice, the baseline, is MLX's own op there); elsewhere the shipped program
        self.seed = seed_program(backend, self.chip)
        self._done = self._total = 0
        self._started = 0.0
        self._workload = ""
        #: one plain line per training shape and per later phase (the CLI prints them when its
        #: output is not a terminal, where no progress bar is drawn)
        self.announce: Callable[[str], None] = lambda line: None

    def _step(self, what: str) -> None:
        self._done += 1
        self._total = max(self._total, self._done)
        self.report_progress(self._done, self._total, what)

    def _out_of_time(self) -> bool:
        budget = self.settings.time_budget_s
        return budget is not None and time.perf_counter() - self._started > budget

    # -- a whole run -------------------------------------------------------------------
    def run(self, workload: Workload, output: Path | None = None, write: bool = True) -> TuneResult:
        self._started = time.perf_counter()
        self._workload = workload.source or workload.name
        run_id = self.db.start_run(self.chip.id, self.backend, workload.name, asdict(self.settings))
        self.measurer.run_id = run_id
        result = TuneResult(run_id, self.chip)
        labelled = []
        for split, shape in workload.labelled():
            if not families_for(shape.op, self.backend) or not self.shipped.has(shape.op):
                reason = f"{shape.op}: no {self.backend} kernels or shipped rules"
                if reason not in result.skipped:
                    result.skipped.append(reason)
                continue
            labelled.append((split, shape))
        try:
            self.db.set_run_shapes(run_id, [(s.op, s.key, shape_json(s), s.label, split) for split, s in labelled])
            if write:  # a folder that cannot be written fails now, not after the whole run
                check_writable(Path(output) if output else tuned_heuristics_path(self.chip.id))
        except BaseException as error:
            self.db.fail_run(run_id, one_line(error))
            raise
        train = [s for split, s in labelled if split == "train"]
        held_out = [s for split, s in labelled if split == "held-out"]
        per_shape = 2 + self.settings.candidates + self.settings.confirm
        self._total = len(train) * per_shape + len(held_out) * 2
        try:
            with self.measurer:
                for i, shape in enumerate(train):
                    if self._out_of_time():  # the budget covers the baselines too
                        result.skipped.append(f"{len(train) - i} of {len(train)} training shapes: not "
                                              f"reached within the time budget of "
                                              f"{self.settings.time_budget_s:g} s")
                        self.announce(f"time budget of {self.settings.time_budget_s:g} s spent: "
                                      f"{len(train) - i} of {len(train)} training shapes not reached")
                        break
                    self.announce(f"[{i + 1}/{len(train)}] {shape.label or shape}: {shape}")
                    tuned = self._tune_shape(shape)
                    if tuned.control is None or not tuned.control.ok:
                        result.skipped.append(f"{shape}: the shipped choice {tuned.shipped.to_dsl()} "
                                              f"failed ({tuned.failure})")
                        self.announce(f"      the shipped choice failed ({tuned.failure})")
                    else:
                        result.shapes.append(tuned)
                        best = tuned.best
                        self.announce(f"      {len(tuned.search)} searched; "
                                      + (f"confirmed {1 / best[1]:.2f}x faster than the shipped choice: "
                                         f"{best[0]}" if best and best[1] < 1.0 else
                                         "none confirmed faster than the shipped choice"))
                self._cross_time(result.shapes)
                result.tuning_s = time.perf_counter() - self._started
                if held_out:
                    self.announce(f"judging the rules found on {len(held_out)} held-out shapes")
                rules = self._distill(result, held_out)
                if rules:
                    self.announce(f"re-timing {len(rules)} rule(s) in fresh workers")
                self._reproduce(result, rules, labelled)
                result.restarts = self.measurer.restarts
            self._summarise(result)
            if write:
                result.output = self.write(result, output)
            self.db.finish_run(run_id, "finished", str(result.output) if result.output else None)
        except KeyboardInterrupt:
            self.db.fail_run(run_id, "interrupted", status="interrupted")
            raise
        except BaseException as error:
            self.db.fail_run(run_id, one_line(error))
            raise
        result.elapsed_s = time.perf_counter() - self._started
        return result

    def _group(self, shape: Shape) -> tuple:
        rule = self.shipped.select(shape.op, shape.features()).rule_number
        return distill.group_key(shape.op, shape.features(), rule)

    def _seed_configs(self, shape: Shape, shipped: KernelConfig) -> tuple[KernelConfig, ...]:
        """The seed program's choice for the shape, where it is a kernelevo kernel other than
        the shipped choice (the search's first candidate); none where the seed cannot serve it."""
        try:
            seeded = self.seed.select(shape.op, shape.features()).config if self.seed.has(shape.op) else shipped
        except ValueError:  # a DSLError: the seed chose a configuration invalid for this call
            return ()
        return (seeded,) if seeded != shipped and seeded.family != MLX_BUILTIN else ()

    def _tune_shape(self, shape: Shape) -> ShapeResult:
        m = self.measurer
        shipped = m.shipped_config(shape)
        result = ShapeResult(shape, shipped)
        result.shipped_rule = self.shipped.select(shape.op, shape.features()).rule_number
        base = shipped.to_dsl()
        control = m.control(shape)
        result.control = control
        if not control.ok:
            result.failure = control.reason
            return result
        if base != MLX_BUILTIN and not self._out_of_time():
            result.mlx = m.measure(shape, MLX_BUILTIN, "confirm", verify=False)

        space = Space(shape.op, self.backend, self.chip, shape.features())
        strategy = make_strategy(self.settings.strategy, space,
                                 self.settings.seed + zlib.crc32(shape.key.encode()), {shipped},
                                 seeds=self._seed_configs(shape, shipped))
        searched = 0
        while searched < self.settings.candidates and not self._out_of_time():
            batch = strategy.ask(min(4, self.settings.candidates - searched))
            if not batch:
                break
            for config in batch:
                row = m.measure(shape, config.to_dsl(), "search")
                usable = row.ok and row.ratio is not None
                strategy.tell(config, row.ratio if usable else None)
                if usable:
                    result.search[config.to_dsl()] = row.ratio
                searched += 1
        # A search figure is a first look (one pairing, few repetitions): the best few are
        # timed again with more, and only that second figure can make a winner.
        finalists = sorted((r, c) for c, r in result.search.items() if c != base)[:self.settings.confirm]
        for _, config in finalists:
            if self._out_of_time():
                break
            row = m.measure(shape, config, "confirm")
            if row.usable:
                result.confirmed[config] = row
        return result

    def _cross_time(self, shapes: Sequence[ShapeResult]) -> None:
        """Confirms each group's winners on the group's other shapes: the evidence that
        lets one rule serve several shapes."""
        groups: dict[tuple, list[ShapeResult]] = defaultdict(list)
        for s in shapes:
            groups[self._group(s.shape)].append(s)
        for members in groups.values():
            winners = sorted((s.best[1], s.best[0]) for s in members
                             if s.best and 1.0 / s.best[1] >= self.settings.min_speedup)
            finalists = list(dict.fromkeys(c for _, c in winners))[:self.settings.cross]
            for s in members:
                for config in finalists:
                    if self._out_of_time():
                        return
                    if (config in s.confirmed or config == s.shipped.to_dsl()
                            or not self.measurer.valid_for(config, s.shape)):
                        continue  # (the shipped choice against itself is the A/A control)
                    row = self.measurer.measure(s.shape, config, "confirm")
                    if row.usable:
                        s.confirmed[config] = row

    # -- distillation judged on held-out shapes ---------------------------------------
    def _program(self, rules: Sequence[TunedRule]) -> CompiledProgram:
        text = Distilled(list(rules)).render(self.shipped.program, self.shipped_path.name, self.chip)
        return CompiledProgram(parse(text, "<candidate>"), text, "<candidate>", self.chip)

    def _distill(self, result: TuneResult, held_out: Sequence[Shape]) -> list[TunedRule]:
        evidence = [e for e in (s.evidence() for s in result.shapes) if e is not None]
        per_depth = distill.candidates(evidence, self.backend, self.chip, self.settings.min_speedup,
                                       shipped=distill.shipped_conditions(self.shipped.program))
        if not held_out:
            # Nothing to judge on: the deepest tree, restricted to the training evidence.
            chosen = {key: len(per_depth) - 1 for key in per_depth[0]}
            return [r for key, d in chosen.items() for r in per_depth[d][key]]
        scorer = Scorer(self.measurer, live=True, with_mlx=False, band_for_same=False)
        kept: list[dict[tuple, list[TunedRule]]] = []
        group_scores: dict[tuple[tuple, int], float | None] = {}
        why_dropped: dict[tuple[tuple, int], list[str]] = defaultdict(list)
        for depth, by_group in enumerate(per_depth):
            rules = [r for group in by_group.values() for r in group]
            program = self._program(rules)
            scores = {s.shape.key: s for s in scorer.score(program, [("held-out", h) for h in held_out]).shapes}
            survivors: dict[tuple, list[TunedRule]] = {}
            for key, group in by_group.items():
                members = [h for h in held_out if self._group(h) == key]
                survivors[key] = []
                for r in group:
                    why = self._held_out_objection(r, rules, members, scores)
                    if why:
                        why_dropped[(key, depth)].append(why)
                    else:
                        survivors[key].append(r)
                if members:
                    group_scores[(key, depth)] = geomean(
                        (scores[h.key].speedup or 1.0) if self._selects_kept(scores[h.key], rules, survivors[key])
                        else 1.0 for h in members)
                else:
                    group_scores[(key, depth)] = None
            kept.append(survivors)
        depths = distill.choose_depths(kept, lambda key, d: group_scores.get((key, d)))
        # Why rules went, at every depth tried (the same rule often appears at several).
        result.dropped += list(dict.fromkeys(w for ws in why_dropped.values() for w in ws))
        return [r for key, d in depths.items() for r in kept[d].get(key, [])]

    def _rule_of(self, score, rules: Sequence[TunedRule]) -> TunedRule | None:
        """The tuned rule that chose for a scored shape, or None where a shipped rule chose."""
        if score.rule is None:
            return None
        return Distilled(list(rules)).numbering(self.shipped.program).get((score.shape.op, score.rule))

    def _selects_kept(self, score, rules, kept) -> bool:
        rule = self._rule_of(score, rules)
        return rule is not None and any(rule is k for k in kept)

    def _held_out_objection(self, rule: TunedRule, rules: Sequence[TunedRule],
                            members: Sequence[Shape], scores: dict) -> str | None:
        """Why the held-out shapes do not confirm a rule, or None when they do: some select
        it, none of them is slower than its noise band or unmeasurable, and their
        geometric mean clears the minimum speedup."""
        mine = [scores[h.key] for h in members if self._rule_of(scores[h.key], rules) is rule]
        where = f"{rule.config.to_dsl()} for {len(rule.training)} training shape(s)"
        if not mine:
            return f"{where}: no held-out shape falls under it"
        bad = [s for s in mine if s.ratio is None]
        if bad:
            return f"{where}: held-out {bad[0].shape} {bad[0].status} ({bad[0].reason})"
        slower = [s for s in mine if s.slower_than_noise]
        if slower:
            return (f"{where}: held-out {slower[0].shape} is {slower[0].speedup:.2f}x "
                    f"(slower than its noise band)")
        speedup = geomean(s.speedup for s in mine)
        if speedup < self.settings.min_speedup:
            return (f"{where}: {speedup:.2f}x on {len(mine)} held-out shape(s), under the "
                    f"minimum {self.settings.min_speedup:.2f}x")
        return None

    # -- re-timing in fresh workers ----------------------------------------------------
    def _reproduce(self, result: TuneResult, rules: list[TunedRule],
                   labelled: Sequence[tuple[str, Shape]]) -> None:
        """Re-times every rule on every shape it selects in fresh workers; keeps the rules
        whose speedup reproduces, with those figures as their claims."""
        items = reproduce(self.measurer, self._program(rules), labelled,
                          self.settings.reproduce_rounds) if rules else []
        by_rule: dict[int, list[Reproduction]] = defaultdict(list)
        for item in items:
            rule = self._rule_of(item, rules)
            if rule is not None:
                by_rule[id(rule)].append(item)
        kept = []
        for rule in rules:
            mine = by_rule.get(id(rule), [])
            problem = next((i.problem for i in mine if i.problem), None)
            where = f"{rule.config.to_dsl()} for {len(rule.training)} training shape(s)"
            if problem:
                result.dropped.append(f"{where}: not re-timed cleanly ({problem})")
                continue
            speedups = [i.speedup for i in mine]
            slower = [i for i in mine if i.ratio > 1.0 + (self.measurer.band(i.shape) or 0.0)]
            total = geomean(speedups)
            if not mine or total < self.settings.min_speedup or slower:
                why = (f"{slower[0].shape} {slower[0].speedup:.2f}x" if slower
                       else f"{total:.2f}x over {len(mine)} shape(s)")
                result.dropped.append(f"{where}: did not reproduce in a fresh worker ({why})")
                continue
            train = [i.speedup for i in mine if i.split == "train"]
            held = [i.speedup for i in mine if i.split == "held-out"]
            rule.claim = claim_text(geomean(train), len(train), geomean(held) if held else None,
                                    len(held), result.run_id)
            kept.append(rule)
        result.distilled = Distilled(kept, header=(f"# Workload: {self._workload}",))
        # What the written program does on every shape, from the re-timings.
        program = self._program(kept)
        timed = {(i.split, i.shape.key): i for i in items if self._rule_of(i, kept) is not None}
        train_results = {s.shape.key: s for s in result.shapes}
        for split, shape in labelled:
            selection = program.select(shape.op, shape.features())
            tuned = train_results.get(shape.key) if split == "train" else None
            outcome = ShapeOutcome(split, shape, self.measurer.shipped_config(shape).to_dsl(),
                                   selection.config.to_dsl(), selection.rule_number,
                                   timed.get((split, shape.key)))
            if tuned is not None:
                outcome.band, outcome.control = tuned.band, tuned.control
                outcome.mlx_ratio = tuned.mlx.ratio if tuned.mlx and tuned.mlx.ok else None
            else:
                outcome.band = self.measurer.band(shape)
            result.outcomes.append(outcome)

    # -- results and output ------------------------------------------------------------
    def _summarise(self, result: TuneResult) -> None:
        m = self.measurer
        result.measured, result.reused, result.failed = m.measured, m.reused, m.failed
        rows = self.db.measurements(run_id=result.run_id)
        result.loaded = sum(1 for r in rows if r.loaded)
        result.watched = any(r.load_watched for r in rows) or not rows
        db_rows = []
        for o in result.outcomes:
            row = {"op": o.shape.op, "shape_key": o.shape.key, "split": o.split, "label": o.shape.label,
                   "shipped_config": o.shipped, "chosen_config": o.chosen,
                   "rule": str(o.rule) if o.rule else None, "band": o.band, "mlx_ratio": o.mlx_ratio}
            r = o.reproduction
            if r is not None and r.ratio is not None:
                shipped, chosen, quart = r.times("shipped"), r.times("chosen"), r.ratio_quartiles
                row.update(measurement_id=r.rows[-1].id, ratio=r.ratio,
                           shipped_s=shipped[0], shipped_q1_s=shipped[1], shipped_q3_s=shipped[2],
                           chosen_s=chosen[0], chosen_q1_s=chosen[1], chosen_q3_s=chosen[2],
                           ratio_q1=quart[0] if quart else None, ratio_q3=quart[1] if quart else None,
                           note=f"re-timed in {len(r.usable)} fresh worker(s)")
            else:
                row.update(ratio=1.0, note="the shipped choice (nothing to time against)")
                if o.control is not None and o.control.ok:
                    row.update(measurement_id=o.control.id, shipped_s=o.control.baseline_median_s,
                               shipped_q1_s=o.control.baseline_q1_s, shipped_q3_s=o.control.baseline_q3_s)
            db_rows.append(row)
        self.db.set_shape_results(result.run_id, db_rows)
        self.db.set_run_summary(result.run_id, {
            "train_speedup": result.geomean_speedup("train"),
            "held_out_speedup": result.geomean_speedup("held-out"),
            "best_speedup": result.geomean_best, "rules": len(result.distilled.rules),
            "dropped": result.dropped, "loaded": result.loaded, "measured": result.measured,
            "reused": result.reused, "failed": result.failed, "watched": result.watched})

    def write(self, result: TuneResult, output: Path | None) -> Path:
        text = result.distilled.render(self.shipped.program, self.shipped_path.name, self.chip)
        path = Path(output) if output else tuned_heuristics_path(self.chip.id)
        CompiledProgram(parse(text, str(path)), text, str(path), self.chip)  # must check clean
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            try:
                before = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                before = None
            if before is not None and _without_stamp(before) == _without_stamp(text):
                result.unchanged = True  # the same rules: neither rewritten nor backed up
                ops.forget_selections()
                return path
            # the one previous version is kept beside it (replacing an older backup, and the
            # dated backups earlier versions of kernelevo left, one per run)
            os.replace(path, path.with_name(f"{path.name}.prev"))
            for old in path.parent.glob(f"{glob.escape(path.name)}.*.prev"):
                if re.fullmatch(r"\d{8}-\d{6}", old.name[len(path.name) + 1:-len(".prev")]):
                    old.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        ops.forget_selections()
        return path


def _without_stamp(text: str) -> str:
    """A tuned file's text without its header's date (`# Tuned for ... by `kernelevo tune`,
    DATE.`): two files that differ only there hold the same rules."""
    return re.sub(r"^(# Tuned for .* by `kernelevo tune`), [^\n]*$", r"\1", text, count=1, flags=re.MULTILINE)
