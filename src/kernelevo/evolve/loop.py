"""The evolution loop: propose, check, score, keep — until a budget runs out — then choose
the winner on held-out shapes, re-time it in fresh workers and write it.

One loop for both proposers. Offline proposals are made between measurements (they take
milliseconds, and nothing may compete with a kernel being timed); LLM requests run in
threads, up to `parallel` in flight, while the main thread measures: the waiting for the
endpoint overlaps the measuring, and the measuring stays serial on the device.

Killed at any moment, the same command resumes: every proposal is committed when it comes
back, every scored program and every measurement as it is made (store.py, tune/db.py), and
a proposal whose fate was not yet recorded is processed again from its stored reply.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..dsl import ast, format_program, parse
from ..dsl.select import CompiledProgram
from ..heuristics import seed_source
from ..paths import tuned_heuristics_path
from ..tune.db import Database
from ..tune.distill import HELD_OUT_TOLERANCE
from ..tune.measure import MeasureSettings, Measurer, geomean
from ..tune.pool import DEFAULT_COMMAND
from ..tune.reproduce import Reproduction, check_rules, claim_text, reproduce
from ..tune.workloads import Workload
from . import prompt as prompts
from .archive import Archive, Member
from .fitness import Fitness, Rejected, Scored
from .llm import LLMClient, LLMSettings, Reply, ReplyError, program_from_reply
from .mutate import Mutator, vocabulary_from

#: re-timings of the winner, each after removing the rules the last one did not support
PRUNE_ROUNDS = 3
from .store import EvolveStore, text_hash

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvolveSettings:
    iterations: int = 300  # proposals processed
    time_budget_s: float | None = 900.0  # the whole run: judging and re-timing the winner included
    max_measurements: int | None = None  # new measurements
    max_tokens: int | None = None  # LLM tokens, prompt and completion
    max_cost: float | None = None  # LLM cost, in the unit of the prices given
    islands: int = 2
    population: int = 12
    migration_interval: int = 25
    held_out_interval: int = 50  # the running best is judged on held-out shapes this often
    exploit: float = 0.7
    seed: int = 0
    replay: bool = False  # stored measurements only
    reps: int = 5
    finalists: int = 5  # the best few by training score, judged on held-out shapes
    reproduce_rounds: int = 2
    min_speedup: float = 1.03
    rejections_shown: int = 4

    def resume_key(self, **what) -> str:
        """What makes a run 'the same command': not its budgets."""
        keep = {k: v for k, v in asdict(self).items()
                if k in ("islands", "population", "seed", "replay", "reps", "exploit")}
        return hashlib.sha256(json.dumps({**keep, **what}, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class EvolveResult:
    run_id: int
    resumed: bool = False
    iterations: int = 0
    winner: Member | None = None
    winner_train: float | None = None
    winner_held_out: float | None = None
    seed_held_out: dict[str, float | None] = field(default_factory=dict)
    output: Path | None = None
    stopped_by: str = ""
    measurements: int = 0
    tokens: int = 0
    cost: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # rules removed after re-timing, and why
    retimed_train: float | None = None  # the written program, re-timed in fresh workers
    retimed_held_out: float | None = None
    lineage: list[str] = field(default_factory=list)


class Evolution:
    def __init__(self, backend: str, db: Database, workload: Workload, seeds: Sequence[tuple[str, str]],
                 settings: EvolveSettings = EvolveSettings(), llm: LLMSettings | None = None,
                 progress: Progress | None = None, worker_command: Sequence[str] = DEFAULT_COMMAND):
        self.backend = backend
        self.db = db
        self.store = EvolveStore(db)
        self.workload = workload
        self.seeds = list(seeds)
        self.settings = settings
        self.llm_settings = llm
        self.progress = progress or (lambda line: None)
        self.rng = random.Random(settings.seed)
        self.measurer = Measurer(backend, db, MeasureSettings(reps=settings.reps), worker_command)
        self.chip = self.measurer.chip
        # On a Mac the shipped program is MLX's own op everywhere: the population also starts
        # from the seed (MLX's choices restated with kernelevo's kernels); scores stay over the shipped.
        seed = seed_source(backend, self.chip)
        if seed.origin == "seed":
            self.seeds.append((f"seed {seed.path.name}", seed.path.read_text(encoding="utf-8")))
        self.train = [s for s in workload.shapes if self.measurer.shipped.has(s.op)]
        self.held_out = [s for s in workload.held_out if self.measurer.shipped.has(s.op)]
        self.fitness = Fitness(self.measurer, self.train, self.held_out, live=not settings.replay,
                               max_measurements=settings.max_measurements)
        self.archive = Archive(settings.islands, settings.population, self.rng, settings.exploit)
        self.members: dict[int, Member] = {}
        self.programs: dict[int, CompiledProgram] = {}
        self.seen: set[str] = set()
        self.rejections: deque[tuple[str, str]] = deque(maxlen=settings.rejections_shown)
        self.tokens = 0
        self.cost = 0.0
        self.iteration = 0
        self._started = 0.0
        self._vocab_at = -1
        self._reserve: float | None = None  # seconds kept for the finish (_finish_reserve)
        self._reserve_at = -1
        self.mutator: Mutator | None = None

    @property
    def proposer(self) -> str:
        return f"llm:{self.llm_settings.model}" if self.llm_settings else "offline"

    # -- budgets -----------------------------------------------------------------------
    def _stop_reason(self) -> str | None:
        s = self.settings
        if self.iteration >= s.iterations:
            return f"{s.iterations} iterations"
        if s.time_budget_s is not None:
            reserve = self._finish_reserve()
            if time.perf_counter() - self._started + reserve > s.time_budget_s:
                return (f"the time budget ({s.time_budget_s:.0f} s, of which about {reserve:.0f} s are kept "
                        "for judging the finalists and re-timing the winner)")
        if self.fitness.out_of_measurements:
            return f"the measurement budget ({s.max_measurements})"
        if s.max_tokens is not None and self.tokens >= s.max_tokens:
            return f"the token budget ({s.max_tokens})"
        if s.max_cost is not None and self.cost >= s.max_cost:
            return f"the cost budget ({s.max_cost})"
        return None

    def _finish_reserve(self) -> float:
        """Seconds the finish is expected to take, at the seconds per new measurement seen
        so far: the finalists' held-out pairs not yet stored, and the re-timing of the best
        program's pairs (`reproduce_rounds` each, with room for one round of removed rules).
        Re-estimated every 10 iterations."""
        if self.settings.replay or self.archive.best is None:
            return 0.0
        if self._reserve is not None and self.iteration - self._reserve_at < 10:
            return self._reserve
        per_confirm = self.measurer.seconds_per("confirm")
        per_reproduce = self.measurer.seconds_per("reproduce") or per_confirm
        if per_confirm is None:
            return 0.0
        finalists = list({m.id: m for m in self.archive.top(self.settings.finalists)
                          + list(self.archive.cells().values())}.values())
        unstored = set()
        for m in finalists:
            for shape in self.held_out:
                config = self.programs[m.id].select(shape.op, shape.features()).config.to_dsl()
                if config != self.measurer.shipped_config(shape).to_dsl() and \
                        self.measurer.lookup(shape, config) is None:
                    unstored.add((shape.key, config))
        best = self.programs[self.archive.best.id]
        differing = sum(best.select(s.op, s.features()).config.to_dsl() != self.measurer.shipped_config(s).to_dsl()
                        for s in self.train + self.held_out)
        self._reserve = (len(unstored) * per_confirm
                         + 1.5 * differing * self.settings.reproduce_rounds * per_reproduce)
        self._reserve_at = self.iteration
        return self._reserve

    # -- programs ----------------------------------------------------------------------
    def _member(self, program_id: int, scored: Scored, text: str, proposer: str, firm: bool) -> Member:
        m = Member(program_id, text, scored.value, scored.rules, scored.configs, proposer, firm, scored.score)
        self.members[program_id] = m
        self.programs[program_id] = scored.program
        return m

    def _admit(self, run_id: int, island: int, parent: int | None, other: int | None, proposer: str,
               text: str) -> tuple[str, str, int | None]:
        """Checks, scores and keeps a program: (outcome, reason, program id)."""
        digest = text_hash(text)
        if digest in self.seen:
            return "duplicate", "the same program was proposed before", None
        self.seen.add(digest)
        try:
            program = self.fitness.compile(text)
            scored = self.fitness.evaluate(program)
        except Rejected as err:
            self.rejections.append((err.stage, err.message))
            return err.stage, err.message, None
        best = self.archive.islands[island].best
        firm = False
        if best is None or scored.value > best.score:
            # About to become the island's best: its score must rest on re-timed pairs.
            try:
                scored = self.fitness.firm(scored)
                firm = True
            except Rejected as err:
                return err.stage, err.message, None
        pid = self.store.add_program(run_id, self.iteration, island, parent, other, proposer, text,
                                     scored.rules, scored.configs, scored.value, firm)
        member = self._member(pid, scored, text, proposer, firm)
        improved = self.archive.add(island, member)
        kept = any(m.id == pid for isl in self.archive.islands for m in isl.members)
        note = f"{scored.value:.3f}x" + (" (new island best)" if improved else
                                          f" (island best {self.archive.islands[island].best.score:.3f}x)")
        return ("accepted" if kept else "no-improvement"), note, pid

    # -- the run -----------------------------------------------------------------------
    def run(self, output: Path | None = None, write: bool = True) -> EvolveResult:
        self._started = time.perf_counter()
        what = dict(backend=self.backend, chip=self.chip.id, workload=self.workload.source or self.workload.name,
                    proposer=self.proposer, seeds=[text_hash(t) for _, t in self.seeds])
        run, resumed = self.store.start_or_resume(self.chip.id, self.backend, what["workload"],
                                                  self.settings.resume_key(**what),
                                                  {**asdict(self.settings), **what})
        self.measurer.run_id = None
        result = EvolveResult(run.id, resumed)
        try:
            if self.settings.replay:
                self._loop(run.id, result)
            else:
                with self.measurer:
                    self._loop(run.id, result)
                    self._finish(run.id, result, output, write)
            if self.settings.replay:
                self._finish(run.id, result, output, write)
            self.store.finish(run.id, "finished", str(result.output) if result.output else None,
                              self._summary(result))
        except KeyboardInterrupt:
            self.store.finish(run.id, "interrupted")
            raise
        except BaseException:
            self.store.finish(run.id, "failed")
            raise
        return result

    def _restore(self, run_id: int) -> None:
        """Programs, token counts and the iteration counter of an earlier session."""
        for row in self.store.programs(run_id):
            self.seen.add(row.text_hash)
            if row.train_score is None:
                continue
            try:
                program = self.fitness.compile(row.text)
            except Rejected:
                continue
            m = Member(row.id, row.text, row.train_score, row.rules, row.configs, row.proposer, bool(row.firm))
            self.members[row.id] = m
            self.programs[row.id] = program
            self.archive.add(row.island, m)
        proposals = self.store.proposals(run_id)
        self.tokens = sum((p.tokens_in or 0) + (p.tokens_out or 0) for p in proposals)
        self.cost = sum(p.cost or 0.0 for p in proposals)
        self.iteration = max((p.iteration + 1 for p in proposals), default=0)
        for p in proposals:
            if p.outcome not in ("pending", "accepted", "no-improvement", "duplicate"):
                self.rejections.append((p.outcome, p.reason or ""))

    def _seed(self, run_id: int) -> None:
        for name, text in self.seeds:
            digest = text_hash(text)
            if digest in self.seen:
                continue
            self.seen.add(digest)
            try:
                program = self.fitness.compile(text)
                scored = self.fitness.firm(self.fitness.evaluate(program))
            except Rejected as err:
                self.progress(f"seed {name} rejected: {err.stage}: {err.message}")
                continue
            pid = self.store.add_program(run_id, self.iteration, 0, None, None, f"seed:{name}", text,
                                         scored.rules, scored.configs, scored.value, True)
            m = self._member(pid, scored, text, f"seed:{name}", True)
            for island in range(len(self.archive.islands)):
                self.archive.add(island, m)
            self.progress(f"seed {name}: {scored.value:.3f}x on {len(self.train)} training shapes")

    def _refresh_vocabulary(self) -> None:
        if self.mutator is not None and self.iteration - self._vocab_at < 10:
            return
        rows = self.db.measurements(chip=self.chip.id, backend=self.backend,
                                    template_hash=self.measurer.template_hash)
        vocab = vocabulary_from(rows, self.train)
        if self.mutator is None:
            self.mutator = Mutator(self.backend, self.chip, self.train, vocab, self.rng,
                                   live=not self.settings.replay)
        self.mutator.vocab = vocab
        self._vocab_at = self.iteration

    def _loop(self, run_id: int, result: EvolveResult) -> None:
        self._restore(run_id)
        self._seed(run_id)
        if self.archive.best is None:
            raise RuntimeError("no seed program could be scored: nothing to evolve from")
        for p in self.store.proposals(run_id):  # replies that came back before a kill
            if p.outcome == "pending" and p.reply is not None:
                self._settle_reply(run_id, p.id, p.island, p.parent, p.proposer, p.reply, p.prompt)
        if self.llm_settings is not None:
            self._llm_loop(run_id)
        else:
            self._offline_loop(run_id)
        result.stopped_by = self._stop_reason() or "done"

    def _tick(self, island: int, proposer: str, outcome: str, reason: str) -> None:
        best = self.archive.best
        self.progress(f"iteration {self.iteration} island {island} {proposer}: {outcome} {reason[:90]} "
                      f"| best {best.score:.3f}x ({best.rules} rules) | {self.fitness.measurements} "
                      f"measurements" + (f", {self.tokens} tokens" if self.llm_settings else ""))
        self.iteration += 1
        s = self.settings
        if s.migration_interval and self.iteration % s.migration_interval == 0:
            self.archive.migrate()
        if s.held_out_interval and self.iteration % s.held_out_interval == 0 and self.held_out:
            self._judge_best()

    def _judge_best(self) -> None:
        """The running best's held-out score, for the report's curve (it chooses nothing)."""
        best = self.archive.best
        row = self.store.program(best.id)
        if row is None or row.held_out_score is not None:
            return
        try:
            scored = self.fitness.evaluate(self.programs[best.id], "held-out")
        except Rejected:
            return
        self.store.update_program(best.id, held_out_score=scored.value)

    def _offline_loop(self, run_id: int) -> None:
        while self._stop_reason() is None:
            self._refresh_vocabulary()
            island = self.iteration % len(self.archive.islands)
            parent = self.archive.parent(island)
            donor = self.archive.donor(island, parent.id)
            proposal = self.mutator.propose(self.programs[parent.id],
                                            self.programs[donor.id] if donor else None)
            if proposal is None:
                pid = self.store.add_proposal(run_id, self.iteration, island, parent.id, "offline",
                                              outcome="check", reason="no mutation gave a valid program")
                self._tick(island, "offline", "check", "no mutation gave a valid program")
                continue
            text, what = proposal
            proposer = f"offline:{what.split(':')[0]}"
            # the program is stored as the proposal's reply, so a kill before it is scored
            # loses nothing: the next session scores it from here
            pid = self.store.add_proposal(run_id, self.iteration, island, parent.id, proposer, reply=text,
                                          reason=what)
            outcome, reason, program = self._admit(run_id, island, parent.id,
                                                   donor.id if what.startswith("borrow") and donor else None,
                                                   proposer, text)
            self.store.settle(pid, outcome, f"{what} -> {reason}", program)
            self._tick(island, proposer, outcome, f"{what} -> {reason}")

    # -- the LLM proposer ----------------------------------------------------------------
    def _best_known(self) -> dict[str, tuple[str, float]]:
        self._refresh_vocabulary()
        out = {}
        for op, configs in self.mutator.vocab.measured.items():
            for config, ratios in configs.items():
                for key, ratio in ratios.items():
                    if key not in out or ratio < out[key][1]:
                        out[key] = (config, ratio)
        return out

    def _messages(self, island: int) -> tuple[Member, list[dict]]:
        parent = self.archive.parent(island)
        if parent.details is None:  # restored from the database: score it again, from storage
            parent.details = self.fitness._scorer().score(self.programs[parent.id],
                                                          [("train", s) for s in self.train])
        others = [m for m in self.archive.inspirations(island) if m.id != parent.id]
        return parent, prompts.build(self.backend, self.chip, parent, parent.details, self._best_known(),
                                     others, list(self.rejections))

    def _llm_loop(self, run_id: int) -> None:
        client = LLMClient(self.llm_settings)
        inflight: dict[Future, tuple] = {}
        with ThreadPoolExecutor(max_workers=self.llm_settings.parallel) as pool:
            while True:
                while len(inflight) < self.llm_settings.parallel and self._stop_reason() is None:
                    island = (self.iteration + len(inflight)) % len(self.archive.islands)
                    parent, messages = self._messages(island)
                    inflight[pool.submit(client.complete, messages)] = (island, parent, messages, None)
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for future in done:
                    island, parent, messages, repair_of = inflight.pop(future)
                    reply: Reply = future.result()
                    self.tokens += reply.tokens_in + reply.tokens_out
                    self.cost += reply.cost(self.llm_settings)
                    prompt_text = json.dumps(messages)
                    pid = self.store.add_proposal(
                        run_id, self.iteration, island, parent.id, self.proposer + (" (repair)" if repair_of else ""),
                        prompt=prompt_text, reply=reply.text, tokens_in=reply.tokens_in,
                        tokens_out=reply.tokens_out, cost=reply.cost(self.llm_settings),
                        latency_s=reply.latency_s, outcome="pending" if reply.outcome == "ok" else reply.outcome,
                        reason=reply.reason or None)
                    if reply.outcome != "ok":
                        self.rejections.append((reply.outcome, reply.reason))
                        self._tick(island, self.proposer, reply.outcome, reply.reason)
                        continue
                    again = self._settle_reply(run_id, pid, island, parent.id, self.proposer, reply.text,
                                               prompt_text, repaired=repair_of is not None)
                    if again is not None and self._stop_reason() is None:
                        stage, message = again
                        inflight[pool.submit(client.complete, prompts.repair(messages, reply.text, stage,
                                                                             message))] = (
                            island, parent, messages, pid)

    def _settle_reply(self, run_id: int, pid: int, island: int, parent_id: int | None, proposer: str,
                      reply: str, prompt_text: str | None, repaired: bool = False) -> tuple[str, str] | None:
        """Processes a stored reply. Returns (stage, message) when it deserves one repair."""
        parent = self.members.get(parent_id) if parent_id else None
        try:
            text, _ = program_from_reply(reply, parent.text if parent else "")
        except ReplyError as err:
            self.store.settle(pid, "repair-failed" if repaired else "parse", str(err))
            self.rejections.append(("parse", str(err)))
            self._tick(island, proposer, "parse", str(err))
            return None
        outcome, reason, program = self._admit(run_id, island, parent_id, None, proposer, text)
        if outcome in ("parse", "check") and repaired:
            outcome = "repair-failed"
        self.store.settle(pid, outcome, reason, program)
        self._tick(island, proposer, outcome, reason)
        if outcome in ("parse", "check") and not repaired:
            return outcome, reason
        return None

    def first_prompt(self) -> list[dict]:
        """The messages the LLM proposer would send first, from the seeds scored on stored
        measurements only (nothing is timed, nothing is recorded): `evolve --show-prompt`."""
        self.fitness.live = False
        for name, text in self.seeds:
            try:
                scored = self.fitness.evaluate(self.fitness.compile(text))
            except Rejected:
                continue
            m = Member(-len(self.members) - 1, text, scored.value, scored.rules, scored.configs,
                       f"seed:{name}", True, scored.score)
            self.members[m.id] = m
            self.programs[m.id] = scored.program
            for island in range(len(self.archive.islands)):
                self.archive.add(island, m)
        if self.archive.best is None:
            raise RuntimeError("no seed could be scored from stored measurements")
        return self._messages(0)[1]

    # -- the winner --------------------------------------------------------------------
    def _finish(self, run_id: int, result: EvolveResult, output: Path | None, write: bool) -> None:
        result.iterations = self.iteration
        result.measurements = self.fitness.measurements
        result.tokens, result.cost = self.tokens, self.cost
        counts: dict[str, int] = {}
        for p in self.store.proposals(run_id):
            counts[p.outcome] = counts.get(p.outcome, 0) + 1
        result.outcomes = counts
        # The best few by training score, and each grid cell's best (small programs that
        # score a little lower often generalise better): judged on the held-out shapes.
        finalists = list({m.id: m for m in self.archive.top(self.settings.finalists)
                          + list(self.archive.cells().values())}.values())
        seeds = [m for m in self.members.values() if m.proposer.startswith("seed:")]
        judged: list[tuple[float, Member]] = []
        unjudged = 0  # finalists whose held-out pairs are not stored (replay, or budget spent)
        for m in {x.id: x for x in finalists + seeds}.values():
            if not self.held_out:
                judged.append((m.score, m))
                continue
            try:
                scored = self.fitness.evaluate(self.programs[m.id], "held-out")
            except Rejected as err:
                self.progress(f"program {m.id} not judged on held-out shapes: {err.message}")
                unjudged += m in finalists and err.stage == "unmeasured"
                continue
            self.store.update_program(m.id, held_out_score=scored.value)
            if m.proposer.startswith("seed:"):
                result.seed_held_out[m.proposer[5:]] = scored.value
            if m in finalists:
                judged.append((scored.value, m))
        if unjudged or not judged:
            # Choosing among the judged finalists only would favour those that change nothing
            # on held-out shapes (the shipped seed is always judged: it needs no measurement).
            what = f"{unjudged} finalist(s) could not" if unjudged else "no finalist could"
            result.stopped_by += f"; {what} be judged on held-out shapes: chosen by training score"
            winner = self.archive.best
            held = next((v for v, m in judged if m.id == winner.id), None)
        else:
            # The smallest finalist within 2% of the best held-out score.
            top = max(v for v, _ in judged)
            # (Smaller, but never slower than the shipped heuristics on held-out shapes.)
            held, winner = min(((v, m) for v, m in judged if v * HELD_OUT_TOLERANCE >= top and
                                (v > 1.0 or v == top)),
                               key=lambda vm: (vm[1].rules, -vm[0], vm[1].id))
        result.winner, result.winner_train = winner, winner.score
        result.winner_held_out = held if self.held_out else None
        result.lineage = [f"{row.proposer} #{row.id}" for row in self.store.lineage(winner.id)]
        if self.held_out and held is not None and held <= 1.0:
            # Whatever it gains on the training shapes, it does not carry over.
            result.stopped_by += (f"; the winner is no faster than the shipped heuristics on the held-out "
                                  f"shapes ({held:.3f}x; it is the best finalist there unless some could not "
                                  "be judged): nothing written")
            return
        if write and not self.settings.replay:
            result.output = self._write(run_id, winner, result, output)

    def _write(self, run_id: int, winner: Member, result: EvolveResult, output: Path | None) -> Path | None:
        """Re-times the winner in fresh workers against the shipped choices. A rule that does
        not hold up there (slower than the shape's noise band, or not timed cleanly) is
        removed, and what the remaining rules choose instead is re-timed, until every rule
        left holds up. Writes what is left (the previous file kept), its claims and header
        figures the re-timings; nothing if no rule is left or an `else` fails."""
        program = self.programs[winner.id]
        labelled = [("train", s) for s in self.train] + [("held-out", s) for s in self.held_out]
        items: list[Reproduction] = []
        for _ in range(PRUNE_ROUNDS):
            items = reproduce(self.measurer, program, labelled, self.settings.reproduce_rounds, known=items)
            failing = self._failing_rules(check_rules(program, items))
            if not failing:
                break
            result.dropped += [f"{op} rule {rule} ({why})" for (op, rule), why in failing.items()]
            if any(program.program.section(op).rules[rule - 1].is_else for op, rule in failing):
                self.progress("an else rule of the winner did not reproduce in fresh workers; nothing written")
                return None
            program = _without_rules(program, failing)
        else:
            self.progress(f"the winner's rules still failed after {PRUNE_ROUNDS} re-timings; nothing written")
            return None
        if not items:
            self.progress("no rule of the winner held up in fresh workers; nothing written")
            return None
        checks = check_rules(program, items)
        claims: dict[tuple[str, int], str] = {}
        for c in checks:
            train = [i.speedup for i in c.items if i.split == "train"]
            held = [i.speedup for i in c.items if i.split == "held-out"]
            if train:
                claims[(c.items[0].shape.op, c.rule)] = claim_text(
                    geomean(train), len(train), geomean(held) if held else None, len(held), None)
        # over every shape of each split: where the program chooses what the shipped rules
        # choose, the speedup is 1 by construction
        retimed = {split: geomean([i.speedup for i in items if i.split == split]
                                  + [1.0] * (len(shapes) - sum(i.split == split for i in items)))
                   for split, shapes in (("train", self.train), ("held-out", self.held_out)) if shapes}
        result.retimed_train, result.retimed_held_out = retimed.get("train"), retimed.get("held-out")
        if result.retimed_train < self.settings.min_speedup:
            # what is left is not measurably faster: a file that changes nothing real is not written
            self.progress(f"re-timed in fresh workers, what is left of the winner is {result.retimed_train:.3f}x "
                          f"on training shapes, below the minimum speedup {self.settings.min_speedup:.2f}x; "
                          "nothing written")
            return None
        tree = _with_claims(program.program, claims)
        head = (
            f"# Evolved for {self.chip.id} ({self.chip.name}) by `kernelevo evolve` ({self.proposer}), "
            f"{time.strftime('%Y-%m-%d %H:%M')}, run {run_id}.",
            f"# Re-timed in fresh workers over the shipped heuristics: {result.retimed_train:.3f}x on "
            f"{len(self.train)} training shapes" + (f", {result.retimed_held_out:.3f}x on {len(self.held_out)} "
                                                    f"held-out shapes" if self.held_out else "")
            + f" (geometric means; in the loop the winner scored {winner.score:.3f}x on training shapes"
            + (f", {result.winner_held_out:.3f}x held-out" if result.winner_held_out is not None else "") + ").",
            *([f"# Removed after re-timing: {'; '.join(result.dropped)}."] if result.dropped else []),
            "# Lineage: " + " -> ".join(result.lineage),
            f"# Workload: {self.workload.source or self.workload.name}",
        )
        tree = ast.Program(tree.version, tree.target, (self.chip.id,), tree.sections,
                           ast.Comments(head), tree.trailing)
        text = format_program(tree)
        path = Path(output) if output else tuned_heuristics_path(self.chip.id)
        CompiledProgram(parse(text, str(path)), text, str(path), self.chip)  # must check clean
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.rename(path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.prev"))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        from .. import ops

        ops.forget_selections()
        return path

    def _failing_rules(self, checks) -> dict[tuple[str, int], str]:
        """(op, rule number) -> why, for the rules whose re-timings do not support them."""
        failing = {}
        for c in checks:
            problem = next((i.problem for i in c.items if i.problem), None)
            slower = [i for i in c.items if i.speedup and i.speedup < 1 / (1 + (self.measurer.band(i.shape) or 0))]
            if problem:
                failing[(c.items[0].shape.op, c.rule)] = f"{c.config}: not re-timed cleanly, {problem}"
            elif slower:
                failing[(c.items[0].shape.op, c.rule)] = (f"{c.config}: {slower[0].shape} re-timed at "
                                                          f"{slower[0].speedup:.2f}x, slower than its noise band")
        return failing

    def _summary(self, result: EvolveResult) -> dict:
        return {"iterations": result.iterations, "winner": result.winner.id if result.winner else None,
                "train": result.winner_train, "held_out": result.winner_held_out,
                "seed_held_out": result.seed_held_out, "measurements": result.measurements,
                "tokens": result.tokens, "cost": result.cost, "stopped_by": result.stopped_by,
                "outcomes": result.outcomes, "dropped": result.dropped, "lineage": result.lineage}


def _without_rules(program: CompiledProgram, rules: dict[tuple[str, int], str]) -> CompiledProgram:
    """The program less the given (op, rule number) rules, none of them an `else`."""
    sections = []
    for section in program.program.sections:
        victims = [section.rules[n - 1] for op, n in rules if op == section.op]
        sections.append(ast.Section(section.op, tuple(i for i in section.items if not any(i is v for v in victims)),
                                    section.comments, section.trailing))
    tree = ast.Program(program.program.version, program.program.target, program.program.chips,
                       tuple(sections), program.program.comments, program.program.trailing)
    text = format_program(tree)
    return CompiledProgram(parse(text, "<pruned>"), text, "<pruned>", program.chip)


def _with_claims(program: ast.Program, claims: dict[tuple[str, int], str]) -> ast.Program:
    """The program with each rule's claim comment replaced by the re-timed one."""
    from ..tune.reproduce import CLAIM

    sections = []
    for section in program.sections:
        items, number = [], 0
        for item in section.items:
            if isinstance(item, ast.Rule):
                number += 1
                before = tuple(c for c in item.comments.before if not CLAIM.search(c))
                claim = claims.get((section.op, number))
                if claim:
                    before += (claim,)
                item = ast.Rule(item.condition, item.config,
                                ast.Comments(before, item.comments.after, item.comments.blank_line_before))
            items.append(item)
        sections.append(ast.Section(section.op, tuple(items), section.comments, section.trailing))
    return ast.Program(program.version, program.target, program.chips, tuple(sections),
                       program.comments, program.trailing)


def unified_diff(a: str, b: str, a_name: str, b_name: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                        a_name, b_name))
