"""The tuning database: every measurement ever taken, in SQLite under the user's cache.

Each measurement is committed on its own, so a run killed at any moment loses at most
the one in flight, and a later run finds what is done and skips it. WAL journaling and a
busy timeout let two runs write at once. Rows are keyed by chip, backend, the hash of
the kernel sources, op, shape, configuration, the baseline it was paired with and the
phase: a kernel change invalidates them.

Phases, from the quickest evidence to the firmest:
- `search`: a candidate paired with the shipped choice while searching (a first look:
  it never decides what is written);
- `control`: the shipped choice paired with itself, the A/A pair that gives a shape's
  noise band;
- `confirm`: paired again with more repetitions; what decisions and scores use;
- `reproduce`: re-timed in a fresh worker process before a rule is written, and by
  `kernelevo verify`.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 4

# Each entry upgrades the schema from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at REAL NOT NULL,
        finished_at REAL,
        chip TEXT NOT NULL,
        backend TEXT NOT NULL,
        workload TEXT NOT NULL,
        settings TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'running',
        output TEXT
    );
    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER REFERENCES runs(id),
        created_at REAL NOT NULL,
        chip TEXT NOT NULL,
        backend TEXT NOT NULL,
        template_hash TEXT NOT NULL,
        op TEXT NOT NULL,
        shape_key TEXT NOT NULL,
        config TEXT NOT NULL,
        phase TEXT NOT NULL DEFAULT 'search' CHECK (phase IN ('search', 'confirm')),
        status TEXT NOT NULL CHECK (status IN ('ok', 'wrong', 'error', 'timeout', 'crash')),
        reason TEXT,
        error REAL,
        median_s REAL,
        q1_s REAL,
        q3_s REAL,
        min_s REAL,
        samples TEXT,
        baseline TEXT,
        baseline_median_s REAL,
        ratio REAL
    );
    CREATE INDEX measurement_key
        ON measurements (chip, backend, template_hash, op, shape_key, config, phase);
    """,
    # 2: the workload of each run, so reports can be rebuilt from the database alone
    """
    CREATE TABLE run_shapes (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        position INTEGER NOT NULL,
        op TEXT NOT NULL,
        shape_key TEXT NOT NULL,
        shape TEXT NOT NULL,
        label TEXT,
        PRIMARY KEY (run_id, position)
    );
    ALTER TABLE measurements ADD COLUMN baseline_config TEXT;
    CREATE TABLE run_results (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        shape_key TEXT NOT NULL,
        op TEXT NOT NULL,
        shipped_config TEXT NOT NULL,
        shipped_s REAL,
        mlx_s REAL,
        chosen_config TEXT NOT NULL,
        speedup REAL NOT NULL,
        best_speedup REAL NOT NULL,
        PRIMARY KEY (run_id, shape_key)
    );
    """,
    # 3: the phases above, both sides of a pair with their spread, the pair ratios, the load
    # seen and whether the samples split into two states; results per split of a workload
    """
    CREATE TABLE measurements_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER REFERENCES runs(id),
        created_at REAL NOT NULL,
        chip TEXT NOT NULL,
        backend TEXT NOT NULL,
        template_hash TEXT NOT NULL,
        op TEXT NOT NULL,
        shape_key TEXT NOT NULL,
        config TEXT NOT NULL,
        phase TEXT NOT NULL DEFAULT 'search'
            CHECK (phase IN ('search', 'control', 'confirm', 'reproduce')),
        status TEXT NOT NULL CHECK (status IN ('ok', 'wrong', 'error', 'timeout', 'crash')),
        reason TEXT,
        error REAL,
        median_s REAL,
        q1_s REAL,
        q3_s REAL,
        min_s REAL,
        samples TEXT,
        baseline TEXT,
        baseline_median_s REAL,
        ratio REAL,
        baseline_config TEXT,
        baseline_q1_s REAL,
        baseline_q3_s REAL,
        baseline_samples TEXT,
        ratios TEXT,
        bimodal INTEGER,
        load_watched INTEGER,
        load_median REAL,
        load_worst REAL,
        load_retakes INTEGER,
        reps INTEGER,
        launches INTEGER,
        worker_pid INTEGER
    );
    INSERT INTO measurements_v3 (id, run_id, created_at, chip, backend, template_hash, op,
        shape_key, config, phase, status, reason, error, median_s, q1_s, q3_s, min_s, samples,
        baseline, baseline_median_s, ratio, baseline_config)
        SELECT id, run_id, created_at, chip, backend, template_hash, op, shape_key, config,
               phase, status, reason, error, median_s, q1_s, q3_s, min_s, samples, baseline,
               baseline_median_s, ratio, baseline_config FROM measurements;
    DROP INDEX measurement_key;
    DROP TABLE measurements;
    ALTER TABLE measurements_v3 RENAME TO measurements;
    CREATE INDEX measurement_key
        ON measurements (chip, backend, template_hash, op, shape_key, config, phase);
    CREATE TABLE shape_results (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        op TEXT NOT NULL,
        shape_key TEXT NOT NULL,
        split TEXT NOT NULL,
        label TEXT,
        shipped_config TEXT NOT NULL,
        chosen_config TEXT NOT NULL,
        rule TEXT,
        measurement_id INTEGER REFERENCES measurements(id),
        shipped_s REAL,
        shipped_q1_s REAL,
        shipped_q3_s REAL,
        chosen_s REAL,
        chosen_q1_s REAL,
        chosen_q3_s REAL,
        ratio REAL,
        ratio_q1 REAL,
        ratio_q3 REAL,
        band REAL,
        mlx_ratio REAL,
        note TEXT,
        PRIMARY KEY (run_id, shape_key)
    );
    INSERT INTO shape_results (run_id, op, shape_key, split, shipped_config, chosen_config,
        shipped_s, ratio, note)
        SELECT run_id, op, shape_key, 'train', shipped_config, chosen_config, shipped_s,
               1.0 / speedup, 'from schema 2: the chosen side was never timed on its own'
        FROM run_results;
    DROP TABLE run_results;
    ALTER TABLE runs ADD COLUMN summary TEXT;
    ALTER TABLE run_shapes ADD COLUMN split TEXT NOT NULL DEFAULT 'train';
    """,
    # 4: evolution of whole programs (kernelevo evolve): its runs, every proposal with its
    # prompt and reply, every program with its lineage and scores
    """
    CREATE TABLE evolve_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at REAL NOT NULL,
        finished_at REAL,
        chip TEXT NOT NULL,
        backend TEXT NOT NULL,
        workload TEXT NOT NULL,
        resume_key TEXT NOT NULL,
        settings TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'running',
        output TEXT,
        summary TEXT
    );
    CREATE INDEX evolve_resume ON evolve_runs (resume_key, status);
    CREATE TABLE proposals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        evolve_run INTEGER NOT NULL REFERENCES evolve_runs(id),
        created_at REAL NOT NULL,
        iteration INTEGER NOT NULL,
        island INTEGER NOT NULL,
        parent INTEGER REFERENCES programs(id),
        proposer TEXT NOT NULL,
        prompt TEXT,
        reply TEXT,
        tokens_in INTEGER,
        tokens_out INTEGER,
        cost REAL,
        latency_s REAL,
        outcome TEXT NOT NULL,
        reason TEXT,
        program INTEGER REFERENCES programs(id)
    );
    CREATE TABLE programs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        evolve_run INTEGER NOT NULL REFERENCES evolve_runs(id),
        created_at REAL NOT NULL,
        iteration INTEGER NOT NULL,
        island INTEGER NOT NULL,
        parent INTEGER REFERENCES programs(id),
        other_parent INTEGER REFERENCES programs(id),
        proposer TEXT NOT NULL,
        text TEXT NOT NULL,
        text_hash TEXT NOT NULL,
        rules INTEGER NOT NULL,
        configs INTEGER NOT NULL,
        train_score REAL,
        held_out_score REAL,
        firm INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX program_run ON programs (evolve_run, text_hash);
    """,
]

#: measurement phases, weakest evidence first (see the module's docstring)
PHASES = ("search", "control", "confirm", "reproduce")

#: what `config` holds for the built-in MLX op measured as a baseline
MLX_BUILTIN = "mlx"


@dataclass(frozen=True)
class Measurement:
    id: int
    run_id: int | None
    created_at: float
    chip: str
    backend: str
    template_hash: str
    op: str
    shape_key: str
    config: str
    phase: str
    status: str
    reason: str | None
    error: float | None
    median_s: float | None
    q1_s: float | None
    q3_s: float | None
    min_s: float | None
    samples: str | None
    baseline: str | None
    baseline_median_s: float | None
    ratio: float | None
    baseline_config: str | None = None
    baseline_q1_s: float | None = None
    baseline_q3_s: float | None = None
    baseline_samples: str | None = None
    ratios: str | None = None
    bimodal: int | None = None
    load_watched: int | None = None
    load_median: float | None = None
    load_worst: float | None = None
    load_retakes: int | None = None
    reps: int | None = None
    launches: int | None = None
    worker_pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def loaded(self) -> bool:
        """Taken while other work kept the machine busy (see timing.Load)."""
        from .timing import LOAD_THRESHOLD

        return bool(self.load_watched) and (self.load_median or 0.0) > LOAD_THRESHOLD

    @property
    def pair_ratios(self) -> tuple[float, ...]:
        return tuple(json.loads(self.ratios)) if self.ratios else ()

    @property
    def usable(self) -> bool:
        """Fit to decide on: it ran, quietly, and its samples show one state."""
        return self.ok and not self.loaded and not self.bimodal and self.ratio is not None


#: the columns a measurement is recorded with (besides id and created_at)
RECORDED = tuple(f.name for f in dataclasses.fields(Measurement) if f.name not in ("id", "created_at"))


@dataclass(frozen=True)
class Run:
    id: int
    started_at: float
    finished_at: float | None
    chip: str
    backend: str
    workload: str
    settings: str
    status: str
    output: str | None
    summary: str | None = None


class Database:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._enable_wal()
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    def _enable_wal(self, patience_s: float = 60.0) -> None:
        """Switch the file to write-ahead logging. Changing the journal mode takes an exclusive
        lock for which SQLite does not wait (no busy handler): when two runs open a new
        database at once, the one that loses the race retries here."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on an exception): for the tables other
        modules keep in this file (evolve/store.py)."""
        with self._transaction() as conn:
            yield conn

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, args).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this kernelevo "
                                   f"reads up to {SCHEMA_VERSION} (upgrade kernelevo)")
            for index in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[index].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={index + 1}")

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- runs --------------------------------------------------------------------------
    def start_run(self, chip: str, backend: str, workload: str, settings: dict) -> int:
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (started_at, chip, backend, workload, settings) VALUES (?, ?, ?, ?, ?)",
                (time.time(), chip, backend, workload, json.dumps(settings, sort_keys=True)))
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str, output: str | None) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET finished_at = ?, status = ?, output = ? WHERE id = ?",
                         (time.time(), status, output, run_id))

    def runs(self) -> list[Run]:
        rows = self._conn.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return [Run(**dict(r)) for r in rows]

    def run(self, run_id: int) -> Run | None:
        row = self._conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Run(**dict(row)) if row else None

    def set_run_shapes(self, run_id: int, shapes: list[tuple[str, str, str, str, str]]) -> None:
        """(op, shape_key, shape as JSON, label, split) for each shape of the run's workload."""
        with self._transaction() as conn:
            conn.executemany("INSERT INTO run_shapes (run_id, position, op, shape_key, shape, label, "
                             "split) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(run_id, i, *s) for i, s in enumerate(shapes)])

    def run_shapes(self, run_id: int) -> list[tuple[str, str, str, str, str]]:
        rows = self._conn.execute("SELECT op, shape_key, shape, label, split FROM run_shapes "
                                  "WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        return [tuple(r) for r in rows]

    def set_shape_results(self, run_id: int, rows: list[dict]) -> None:
        """What the written heuristics choose for each shape of a finished run, with the
        observed times of both sides (columns of the shape_results table)."""
        if not rows:
            return
        columns = ("op", "shape_key", "split", "label", "shipped_config", "chosen_config", "rule",
                   "measurement_id", "shipped_s", "shipped_q1_s", "shipped_q3_s", "chosen_s",
                   "chosen_q1_s", "chosen_q3_s", "ratio", "ratio_q1", "ratio_q3", "band",
                   "mlx_ratio", "note")
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO shape_results (run_id, {', '.join(columns)}) "
                f"VALUES (?, {', '.join('?' for _ in columns)})",
                [(run_id, *(r.get(c) for c in columns)) for r in rows])

    def shape_results(self, run_id: int) -> list[dict]:
        rows = self._conn.execute(
            "SELECT r.* FROM shape_results r LEFT JOIN run_shapes s "
            "ON s.run_id = r.run_id AND s.shape_key = r.shape_key WHERE r.run_id = ? "
            "ORDER BY r.split DESC, s.position", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def set_run_summary(self, run_id: int, summary: dict) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET summary = ? WHERE id = ?",
                         (json.dumps(summary, sort_keys=True), run_id))

    def prune(self, *, keep_template_hashes: dict[str, str] | None = None,
              chip: str | None = None, before: float | None = None) -> int:
        """Deletes measurements: those of another kernel version than `keep_template_hashes`
        ({backend: hash}), of one chip, or older than a time. Returns how many went."""
        clauses, args = [], []
        if keep_template_hashes:
            parts = []
            for backend, digest in keep_template_hashes.items():
                parts.append("(backend = ? AND template_hash != ?)")
                args += [backend, digest]
            clauses.append("(" + " OR ".join(parts) + ")")
        if chip is not None:
            clauses.append("chip = ?")
            args.append(chip)
        if before is not None:
            clauses.append("created_at < ?")
            args.append(before)
        if not clauses:
            raise ValueError("prune needs a criterion (stale kernels, a chip or a date)")
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM measurements WHERE " + " AND ".join(clauses), args)
            return cursor.rowcount

    def export(self) -> dict:
        """Everything, as plain data (for `kernelevo db export`)."""
        runs = [dict(r) for r in self._conn.execute("SELECT * FROM runs ORDER BY id")]
        for run in runs:
            run["shapes"] = [dict(zip(("op", "shape_key", "shape", "label", "split"), s))
                             for s in self.run_shapes(run["id"])]
            run["results"] = self.shape_results(run["id"])
        rows = [dict(r) for r in self._conn.execute("SELECT * FROM measurements ORDER BY id")]
        return {"schema_version": self.schema_version, "runs": runs, "measurements": rows}

    # -- measurements ----------------------------------------------------------------
    def record(self, **fields) -> int:
        """Stores one measurement (the columns of `Measurement`; sequences as JSON)."""
        unknown = set(fields) - set(RECORDED)
        if unknown:
            raise TypeError(f"no measurement column {', '.join(sorted(unknown))}")
        values = {k: json.dumps(list(v)) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._transaction() as conn:
            cursor = conn.execute(f"INSERT INTO measurements (created_at, {names}) VALUES (?, {marks})",
                                  (time.time(), *values.values()))
            return int(cursor.lastrowid)

    def latest(self, *, chip: str, backend: str, template_hash: str, op: str, shape_key: str,
               config: str, phase: str | tuple[str, ...] = "search",
               baseline_config: str | None | object = ...) -> Measurement | None:
        """The newest measurement under this key (of any of `phase`, when several are
        given); with `baseline_config`, only pairs with that baseline."""
        phases = (phase,) if isinstance(phase, str) else tuple(phase)
        sql = ("SELECT * FROM measurements WHERE chip = ? AND backend = ? AND template_hash = ? "
               "AND op = ? AND shape_key = ? AND config = ? AND phase IN "
               f"({', '.join('?' for _ in phases)})")
        args = [chip, backend, template_hash, op, shape_key, config, *phases]
        if baseline_config is not ...:
            sql += " AND baseline_config IS ?"
            args.append(baseline_config)
        row = self._conn.execute(sql + " ORDER BY id DESC LIMIT 1", args).fetchone()
        return Measurement(**dict(row)) if row else None

    def measurement(self, measurement_id: int) -> Measurement | None:
        row = self._conn.execute("SELECT * FROM measurements WHERE id = ?", (measurement_id,)).fetchone()
        return Measurement(**dict(row)) if row else None

    def measurements(self, *, chip: str | None = None, backend: str | None = None,
                     run_id: int | None = None, shape_key: str | None = None,
                     template_hash: str | None = None, config: str | None = None,
                     phase: str | None = None) -> list[Measurement]:
        clauses, args = [], []
        for column, value in (("chip", chip), ("backend", backend), ("run_id", run_id),
                              ("shape_key", shape_key), ("template_hash", template_hash),
                              ("config", config), ("phase", phase)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._conn.execute(f"SELECT * FROM measurements {where} ORDER BY id", args).fetchall()
        return [Measurement(**dict(r)) for r in rows]
