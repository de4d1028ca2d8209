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
import errno
import functools
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCHEMA_VERSION = 6

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
    # 5: which process runs a run (so a run whose process died is marked so, and a live one
    # of another process sharing the file is left alone) and why a run failed
    """
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    ALTER TABLE runs ADD COLUMN host TEXT;
    ALTER TABLE runs ADD COLUMN process_start TEXT;
    ALTER TABLE runs ADD COLUMN reason TEXT;
    """,
    # 6: the same for evolution runs (one that is resumed while its process still runs would
    # be run twice at once)
    """
    ALTER TABLE evolve_runs ADD COLUMN pid INTEGER;
    ALTER TABLE evolve_runs ADD COLUMN host TEXT;
    ALTER TABLE evolve_runs ADD COLUMN process_start TEXT;
    """,
]

#: measurement phases, weakest evidence first (see the module's docstring)
PHASES = ("search", "control", "confirm", "reproduce")


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
    pid: int | None = None
    host: str | None = None
    process_start: str | None = None
    reason: str | None = None


# -- what can be wrong with the file, said in one line -------------------------------------
class DatabaseProblem(Exception):
    """The tuning database cannot be used as it is; str() is one line for the user."""


class NoDatabase(DatabaseProblem):
    """A command that only reads found no database."""


class DamagedDatabase(DatabaseProblem):
    """Not an SQLite file, truncated, failing its integrity check, or another program's
    schema: `kernelevo db repair` moves it aside and starts a new one."""

    def __init__(self, path: Path | None, what: str):
        self.path, self.what = (Path(path) if path else None), what
        where, command = ((f" {path}", f"`{repair_command(path)}`") if path else
                          ("", "`kernelevo db repair` (with the same --db, if one was given)"))
        super().__init__(f"the tuning database{where} is damaged: {what}. {command} "
                         f"moves it aside (nothing is deleted) and starts a new one")


def repair_command(path: Path | str) -> str:
    from ..paths import database_path

    default = Path(path) == database_path()
    return "kernelevo db repair" + ("" if default else f" --db {path}")


class NewerSchema(DatabaseProblem, RuntimeError):
    """Written by a newer kernelevo."""


class ReadOnlyDatabase(DatabaseProblem):
    pass


class DiskFull(DatabaseProblem):
    pass


SQLITE_MAGIC = b"SQLite format 3\x00"


def problem(error: BaseException, path: Path | str | None = None) -> DatabaseProblem:
    """The one-line account of an sqlite3 error (or OSError) met on the database at `path`."""
    if isinstance(error, DatabaseProblem):
        return error
    where = f"the tuning database {path}" if path else "the tuning database"
    text = str(error) or type(error).__name__
    low = text.lower()
    code = getattr(error, "errno", None)
    if "readonly" in low or "read-only" in low or code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyDatabase(f"{where} cannot be written ({text}); check the permissions of "
                                f"its folder, or point KERNELEVO_CACHE_DIR or --db elsewhere")
    if "disk is full" in low or code == errno.ENOSPC:
        return DiskFull(f"{where} cannot grow: the disk is full ({text}); free some space "
                        f"(or `kernelevo db prune`) and run the same command again to resume")
    if "unable to open" in low:
        return ReadOnlyDatabase(f"{where} cannot be opened ({text}): its folder is missing or "
                                f"not writable; point KERNELEVO_CACHE_DIR or --db elsewhere")
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return DamagedDatabase(path, text)
    if "locked" in low or "busy" in low:
        return DatabaseProblem(f"{where} is locked by another process ({text}); try again")
    return DatabaseProblem(f"{where}: {text}")


def one_line(error: BaseException) -> str:
    """What went wrong, in one line for the user (a database problem, a file that cannot be
    written, anything else by its type and message)."""
    if isinstance(error, DatabaseProblem):
        return str(error)
    if isinstance(error, sqlite3.Error):
        return str(problem(error))
    if isinstance(error, OSError):
        what = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            what += " (the disk is full)"
        name = str(error.filename) if error.filename else ""
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            return f"cannot write {name}: {what}" if name else f"cannot write: {what}"
        return f"{name}: {what}" if name else what
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@functools.cache
def expected_schema(version: int) -> dict[str, frozenset[str]]:
    """{table: columns} of a database built by the migrations up to `version`."""
    conn = sqlite3.connect(":memory:")
    for index in range(version):
        for statement in MIGRATIONS[index].split(";"):
            if statement.strip():
                conn.execute(statement)
    return _schema(conn)


def _schema(conn: sqlite3.Connection) -> dict[str, frozenset[str]]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    return {t: frozenset(r[1] for r in conn.execute(f"PRAGMA table_info(\"{t}\")")) for t in tables}


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except IsADirectoryError:
        raise DatabaseProblem(f"the tuning database {path} is a folder, not a file") from None
    if not head:
        return  # empty: SQLite makes a new database in it
    if not SQLITE_MAGIC.startswith(head[:16]):
        raise DamagedDatabase(path, "not an SQLite file")
    if len(head) < 100:
        raise DamagedDatabase(path, f"truncated ({len(head)} bytes)")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    size = path.stat().st_size
    if page < 512 or size % page:
        raise DamagedDatabase(path, f"truncated ({size} bytes is not a whole number of "
                                    f"{page}-byte pages)")


def open_connection(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """THE way the database is opened (Database() calls it): the header, SQLite's
    quick_check and the schema are checked, the schema migrated (unless `readonly`). Raises
    DatabaseProblem, whose message is one line; nothing is moved or deleted here."""
    path = Path(path)
    if path.is_dir():
        raise DatabaseProblem(f"the tuning database {path} is a folder, not a file")
    if readonly:
        if not path.is_file():
            raise NoDatabase(f"no tuning database at {path} yet: `kernelevo tune --chip auto` makes one")
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise problem(error, path) from None
    try:
        if path.is_file():
            _check_header(path)
        conn = _connect(path, readonly)
    except OSError as error:
        raise problem(error, path) from None
    except sqlite3.Error as error:
        raise problem(error, path) from None
    try:
        _check_contents(conn, path, readonly)
    except BaseException as error:
        conn.close()
        if isinstance(error, sqlite3.Error):
            raise problem(error, path) from None
        raise
    return conn


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if not readonly:
        conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        return conn  # (write-ahead logging once the contents are known to be ours)
    uri = "file:" + quote(str(path.resolve()))
    try:
        conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as error:
        if "readonly" not in str(error) and "unable to open" not in str(error):
            raise
    # A WAL database in a folder this process cannot write: SQLite cannot make the shared
    # memory file, so read it as a file that nobody changes (nobody can, here).
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None)


def _enable_wal(conn: sqlite3.Connection, patience_s: float = 60.0) -> None:
    """Switch the file to write-ahead logging. Changing the journal mode takes an exclusive
    lock for which SQLite does not wait (no busy handler): when two runs open a new
    database at once, the one that loses the race retries here."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _check_contents(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
    conn.execute("BEGIN")  # one snapshot: a run migrating a new file at once commits all or nothing
    try:
        try:
            verdict = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as error:
            if "locked" in str(error) or "readonly" in str(error) or "unable to open" in str(error):
                raise
            raise DamagedDatabase(path, str(error)) from None
        if verdict != ["ok"]:
            raise DamagedDatabase(path, "integrity check failed: " + "; ".join(verdict))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        found = _schema(conn)
    finally:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            pass
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"{path} has schema version {version}; this kernelevo reads up to "
                          f"{SCHEMA_VERSION} (upgrade kernelevo)")
    if version == 0 and found:
        raise DamagedDatabase(path, "not a kernelevo database (it holds tables "
                                    f"{', '.join(sorted(found)[:5])} and no schema version)")
    if version == 0 and readonly:
        raise NoDatabase(f"the tuning database {path} is empty")
    _check_schema(found, version, path)
    if readonly:
        return
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    if version < SCHEMA_VERSION:
        _migrate(conn)
        _check_schema(_schema(conn), SCHEMA_VERSION, path)


def _check_schema(found: dict[str, frozenset[str]], version: int, path: Path) -> None:
    for table, columns in expected_schema(version).items():
        if table not in found:
            raise DamagedDatabase(path, f"schema version {version} without its table {table} "
                                        "(another program's file?)")
        missing = columns - found[table]
        if missing:
            raise DamagedDatabase(path, f"table {table} lacks column(s) {', '.join(sorted(missing))}")


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another run may have done it
        for index in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[index].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={index + 1}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def move_aside(path: Path) -> Path:
    """Renames a damaged database (and its -wal and -shm files) to
    <name>.damaged-<timestamp>; returns the new name. Nothing is deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    path.rename(target)
    return target


def repair(path: Path) -> tuple[str, Path | None]:
    """`kernelevo db repair`: a damaged file is moved aside and a new database made in its
    place. Returns (what was done, where the damaged file went)."""
    path = Path(path)
    if not path.exists():
        Database(path).close()
        return f"no database at {path}; made a new one", None
    try:
        Database(path).close()
        return f"{path} is sound: nothing to repair", None
    except DamagedDatabase as damage:
        what = damage.what
    try:
        moved = move_aside(path)
    except OSError as error:
        raise problem(error, path) from None
    Database(path).close()
    return f"{path} was damaged ({what}): moved to {moved.name}; made a new database", moved


# -- which process runs a run ---------------------------------------------------------------
def host_name() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """When the process started (Linux: clock ticks after boot), to tell a reused pid from
    the process that recorded it; None where the system does not say."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def this_process() -> dict:
    """What a run records of the process that runs it (columns pid, host, process_start)."""
    pid = os.getpid()
    return {"pid": pid, "host": host_name(), "process_start": process_start(pid)}


def left_by_a_dead_process(run) -> bool:
    """A run (of tuning or of evolution) marked "running" whose process, of this machine,
    is gone."""
    return (run.status == "running" and run.pid is not None and run.host == host_name()
            and not process_alive(run.pid, run.process_start))


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether the process of this machine with this pid (and start) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    except OSError:
        return True  # cannot tell: assume it runs
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):
            return False  # killed, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    if started is not None:
        now = process_start(pid)
        if now is not None and now != started:
            return False  # the pid was given to another process since
    return True


class Database:
    """The tuning database. Opened through `open_connection` (checked, migrated); with
    `readonly`, a missing file is an error, nothing is written and nothing migrated. Errors
    of writing (read-only file, full disk) come out as DatabaseProblem."""

    def __init__(self, path: Path | str, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._conn = open_connection(self.path, readonly)
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

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
        """A write: an sqlite3 error (read-only file, full disk, ...) comes out as the
        DatabaseProblem that says it in one line."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise problem(error, self.path) from error
        try:
            yield self._conn
        except BaseException as error:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back itself (a full disk does that)
            if isinstance(error, sqlite3.Error):
                raise problem(error, self.path) from error
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as error:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise problem(error, self.path) from error

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- runs --------------------------------------------------------------------------
    def start_run(self, chip: str, backend: str, workload: str, settings: dict) -> int:
        """A new run of this process; runs left "running" by a process of this machine that
        died (kill -9, a crash, power) are marked "died" first."""
        self.mark_dead_runs()
        me = this_process()
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (started_at, chip, backend, workload, settings, pid, host, "
                "process_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), chip, backend, workload, json.dumps(settings, sort_keys=True), me["pid"],
                 me["host"], me["process_start"]))
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str, output: str | None, reason: str | None = None) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET finished_at = ?, status = ?, output = ?, reason = ? WHERE id = ?",
                         (time.time(), status, output, reason, run_id))

    def fail_run(self, run_id: int, reason: str, status: str = "failed") -> bool:
        """Marks a run failed with its reason, without raising (the run's own error is what
        the user must see); False when even that could not be written (a full disk: the
        next run marks it "died")."""
        try:
            self.finish_run(run_id, status, None, reason)
            return True
        except DatabaseProblem:
            return False

    @staticmethod
    def dead(run: Run) -> bool:
        return left_by_a_dead_process(run)

    def mark_dead_runs(self) -> list[int]:
        """Marks "died" the runs whose process is gone; a run of a live process (another run
        sharing the file) or of another machine is left alone. Returns their ids."""
        dead = [r for r in self.runs() if self.dead(r)]
        if not dead:
            return []
        with self._transaction() as conn:
            for r in dead:
                conn.execute("UPDATE runs SET status = 'died', finished_at = ?, reason = ? "
                             "WHERE id = ? AND status = 'running'",
                             (time.time(), f"its process (pid {r.pid} on {r.host}) ended without "
                              "finishing (killed?); its measurements are kept", r.id))
        return [r.id for r in dead]

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
        where, args = self._prune_where(keep_template_hashes, chip, before)
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM measurements WHERE " + where, args)
            return cursor.rowcount

    def prune_preview(self, *, keep_template_hashes: dict[str, str] | None = None,
                      chip: str | None = None, before: float | None = None) -> list[dict]:
        """What `prune` with these criteria would delete: per chip, backend and run, how many
        measurements and their dates."""
        where, args = self._prune_where(keep_template_hashes, chip, before)
        rows = self._conn.execute(
            "SELECT chip, backend, run_id, COUNT(*) AS n, MIN(created_at) AS first, "
            "MAX(created_at) AS last FROM measurements WHERE " + where +
            " GROUP BY chip, backend, run_id ORDER BY chip, backend, run_id", args).fetchall()
        return [dict(r) for r in rows]

    @staticmethod
    def _prune_where(keep_template_hashes, chip, before) -> tuple[str, list]:
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
        return " AND ".join(clauses), args

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
