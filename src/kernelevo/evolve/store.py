"""The program database of evolution, in the tuning database's SQLite file (tables
evolve_runs, proposals and programs, tune/db.py's schema 4).

Every proposal is committed when it arrives — its prompt, the reply, tokens, cost, and
what became of it — and every program that was scored with its parent links and scores,
so a run killed at any moment resumes with nothing lost: a proposal whose fate was not yet
recorded is processed again from its stored reply.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from ..tune.db import Database, left_by_a_dead_process, this_process

#: what can become of a proposal (the report counts them)
OUTCOMES = ("pending", "accepted", "no-improvement", "parse", "check", "repair-failed",
            "invalid", "unmeasured", "duplicate", "empty", "truncated", "timeout", "error",
            "rate-limited")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class EvolveRun:
    id: int
    started_at: float
    finished_at: float | None
    chip: str
    backend: str
    workload: str
    resume_key: str
    settings: str
    status: str
    output: str | None
    summary: str | None
    pid: int | None = None
    host: str | None = None
    process_start: str | None = None


class RunInProgress(RuntimeError):
    """The run a command would resume is being run by another live process."""


@dataclass
class ProgramRow:
    id: int
    evolve_run: int
    created_at: float
    iteration: int
    island: int
    parent: int | None
    other_parent: int | None
    proposer: str
    text: str
    text_hash: str
    rules: int
    configs: int
    train_score: float | None
    held_out_score: float | None
    firm: int


@dataclass
class ProposalRow:
    id: int
    evolve_run: int
    created_at: float
    iteration: int
    island: int
    parent: int | None
    proposer: str
    prompt: str | None
    reply: str | None
    tokens_in: int | None
    tokens_out: int | None
    cost: float | None
    latency_s: float | None
    outcome: str
    reason: str | None
    program: int | None


class EvolveStore:
    def __init__(self, db: Database):
        self.db = db

    # -- runs ------------------------------------------------------------------------
    def start_or_resume(self, chip: str, backend: str, workload: str, resume_key: str,
                        settings: dict) -> tuple[EvolveRun, bool]:
        """The unfinished run of the same command, or a new one; and whether it resumed.
        Runs whose process is gone are marked "died" first (and resumed like an interrupted
        one); a run that another live process is running is not taken over."""
        self.mark_dead_runs()
        rows = self.db.query("SELECT * FROM evolve_runs WHERE resume_key = ? AND status IN "
                             "('running', 'interrupted', 'died') ORDER BY id DESC LIMIT 1", (resume_key,))
        owner = this_process()
        if rows:
            run = EvolveRun(**dict(rows[0]))
            if run.status == "running" and run.pid != owner["pid"]:
                raise RunInProgress(
                    f"evolution run {run.id} (the same command) is being run by process {run.pid} on "
                    f"{run.host or 'an unknown machine'}: wait for it, or stop it and run this again to resume it")
            with self.db.transaction() as conn:
                conn.execute("UPDATE evolve_runs SET status = 'running', finished_at = NULL, pid = :pid, "
                             "host = :host, process_start = :process_start WHERE id = :id",
                             {**owner, "id": run.id})
            return self.run(run.id), True
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO evolve_runs (started_at, chip, backend, workload, resume_key, settings, pid, host, "
                "process_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), chip, backend, workload, resume_key, json.dumps(settings, sort_keys=True),
                 owner["pid"], owner["host"], owner["process_start"]))
        return self.run(int(cursor.lastrowid)), False

    @staticmethod
    def dead(run: EvolveRun) -> bool:
        return left_by_a_dead_process(run)

    def mark_dead_runs(self) -> list[int]:
        """Marks "died" the runs left "running" by a process of this machine that is gone
        (kill -9, a crash); their proposals and programs are kept. Returns their ids."""
        dead = [r for r in self.runs() if self.dead(r)]
        if dead:
            with self.db.transaction() as conn:
                for r in dead:
                    conn.execute("UPDATE evolve_runs SET status = 'died', finished_at = ? "
                                 "WHERE id = ? AND status = 'running'", (time.time(), r.id))
        return [r.id for r in dead]

    def run(self, run_id: int) -> EvolveRun | None:
        rows = self.db.query("SELECT * FROM evolve_runs WHERE id = ?", (run_id,))
        return EvolveRun(**dict(rows[0])) if rows else None

    def runs(self) -> list[EvolveRun]:
        return [EvolveRun(**dict(r)) for r in self.db.query("SELECT * FROM evolve_runs ORDER BY id")]

    def finish(self, run_id: int, status: str, output: str | None = None, summary: dict | None = None) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE evolve_runs SET finished_at = ?, status = ?, output = ?, summary = ? "
                         "WHERE id = ?", (time.time(), status, output,
                                          json.dumps(summary, sort_keys=True) if summary else None, run_id))

    # -- proposals -------------------------------------------------------------------
    def add_proposal(self, run_id: int, iteration: int, island: int, parent: int | None,
                     proposer: str, prompt: str | None = None, reply: str | None = None,
                     tokens_in: int | None = None, tokens_out: int | None = None,
                     cost: float | None = None, latency_s: float | None = None,
                     outcome: str = "pending", reason: str | None = None) -> int:
        assert outcome in OUTCOMES, outcome
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO proposals (evolve_run, created_at, iteration, island, parent, proposer, "
                "prompt, reply, tokens_in, tokens_out, cost, latency_s, outcome, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, time.time(), iteration, island, parent, proposer, prompt, reply, tokens_in,
                 tokens_out, cost, latency_s, outcome, reason))
            return int(cursor.lastrowid)

    def settle(self, proposal_id: int, outcome: str, reason: str | None = None,
               program: int | None = None) -> None:
        assert outcome in OUTCOMES, outcome
        with self.db.transaction() as conn:
            conn.execute("UPDATE proposals SET outcome = ?, reason = ?, program = ? WHERE id = ?",
                         (outcome, reason, program, proposal_id))

    def proposals(self, run_id: int) -> list[ProposalRow]:
        return [ProposalRow(**dict(r)) for r in
                self.db.query("SELECT * FROM proposals WHERE evolve_run = ? ORDER BY id", (run_id,))]

    # -- programs --------------------------------------------------------------------
    def add_program(self, run_id: int, iteration: int, island: int, parent: int | None,
                    other_parent: int | None, proposer: str, text: str, rules: int, configs: int,
                    train_score: float | None, firm: bool = False) -> int:
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO programs (evolve_run, created_at, iteration, island, parent, other_parent, "
                "proposer, text, text_hash, rules, configs, train_score, firm) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, time.time(), iteration, island, parent, other_parent, proposer, text,
                 text_hash(text), rules, configs, train_score, int(firm)))
            return int(cursor.lastrowid)

    def update_program(self, program_id: int, **fields) -> None:
        allowed = {"train_score", "held_out_score", "firm", "island"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE programs SET {sets} WHERE id = ?", (*fields.values(), program_id))

    def programs(self, run_id: int) -> list[ProgramRow]:
        return [ProgramRow(**dict(r)) for r in
                self.db.query("SELECT * FROM programs WHERE evolve_run = ? ORDER BY id", (run_id,))]

    def program(self, program_id: int) -> ProgramRow | None:
        rows = self.db.query("SELECT * FROM programs WHERE id = ?", (program_id,))
        return ProgramRow(**dict(rows[0])) if rows else None

    def lineage(self, program_id: int) -> list[ProgramRow]:
        """The program and its first parents back to a seed, oldest first."""
        chain = []
        seen = set()
        current = self.program(program_id)
        while current is not None and current.id not in seen:
            seen.add(current.id)
            chain.append(current)
            current = self.program(current.parent) if current.parent else None
        return chain[::-1]
