"""The tuning database under damage and hostile conditions: every case ends in one line
from the command, exit non-zero, nothing deleted, and runs marked with what became of them.

Read-only folders are real (chmod); as root, where chmod stops nothing, the command runs
without the capabilities that override file permissions (setpriv drops CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH), still as root, so it reads an interpreter installed under /root. A full disk is SQLite's own "database or disk is full", from a
`PRAGMA max_page_count` set on every connection of the command's process.
"""

import errno
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kernelevo.paths import database_path
from kernelevo.tune import db as dbmod
from kernelevo.tune.db import Database
from kernelevo.tune.runner import Tuner, TuneSettings
from kernelevo.tune.workloads import MatmulShape, Workload


def cli(*args, env=None, prefix=(), timeout=300):
    if args[:1] == ("tune",) and "--backend" not in args:
        args = ("tune", "--backend", "cpu") + args[1:]
    return subprocess.run([*prefix, sys.executable, "-m", "kernelevo.cli", *args], capture_output=True,
                          text=True, env=env or dict(os.environ), timeout=timeout)


def one_line_error(result) -> str:
    """The command failed with one line on stderr, and no traceback anywhere."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def populated(path: Path, measurements: int = 5, status: str = "finished") -> int:
    with Database(path) as db:
        run = db.start_run("test-chip", "cpu", "tiny", {})
        for i in range(measurements):
            db.record(run_id=run, chip="test-chip", backend="cpu", template_hash="h", op="matmul",
                      shape_key=f"s{i}", config="x", status="ok", median_s=1e-3)
        if status != "running":
            db.finish_run(run, status, None)
    return run


def count(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
    finally:
        connection.close()


# -- damaged files ----------------------------------------------------------------------
def _garbage(path):
    path.write_bytes(b"this is not a database\n" * 400)


def _truncated(path):
    populated(path, 200)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1000])


def _foreign(path):
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    connection.execute("INSERT INTO notes (text) VALUES ('not kernelevo')")
    connection.commit()
    connection.close()


def _lost_table(path):
    populated(path)
    connection = sqlite3.connect(path)
    connection.execute("DROP TABLE run_shapes")
    connection.commit()
    connection.close()


DAMAGE = {"garbage": _garbage, "truncated": _truncated, "foreign": _foreign, "lost-table": _lost_table}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_database_is_named_in_one_line_and_left_in_place(kind):
    path = database_path()
    path.parent.mkdir(parents=True)
    DAMAGE[kind](path)
    before = path.read_bytes()
    for command in (("db", "list"), ("report",), ("tune", "--workload", "tiny")):
        line = one_line_error(cli(*command))
        assert "damaged" in line and str(path) in line and "kernelevo db repair" in line, line
        assert path.read_bytes() == before  # nothing moved, nothing rewritten, nothing new
        assert not list(path.parent.glob("*.damaged-*"))


def test_repair_moves_the_damaged_file_aside_and_starts_a_new_one():
    path = database_path()
    path.parent.mkdir(parents=True)
    _truncated(path)
    damaged = path.read_bytes()
    result = cli("db", "repair")
    assert result.returncode == 0, result.stderr
    kept = list(path.parent.glob("tuning.sqlite.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # kept whole, never deleted
    assert "moved to " + kept[0].name in result.stdout
    listed = cli("db", "list")
    assert listed.returncode == 0, listed.stderr
    with Database(path) as db:
        assert db.runs() == [] and db.schema_version == dbmod.SCHEMA_VERSION
    again = cli("db", "repair")
    assert again.returncode == 0 and "nothing to repair" in again.stdout
    assert len(list(path.parent.glob("tuning.sqlite.damaged-*"))) == 1


def test_a_database_of_a_newer_kernelevo_is_refused_in_one_line_and_not_repaired():
    path = database_path()
    populated(path)
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version={dbmod.SCHEMA_VERSION + 1}")
    connection.commit()
    connection.close()
    assert "upgrade kernelevo" in one_line_error(cli("db", "list"))
    assert "upgrade kernelevo" in one_line_error(cli("db", "repair"))
    assert not list(path.parent.glob("*.damaged-*"))


# -- read-only folders --------------------------------------------------------------------
def unprivileged() -> list[str]:
    """A prefix that runs a command as a user whom chmod restrains."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: chmod cannot make a folder read-only")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture
def shared(monkeypatch):
    """Cache and data folders outside pytest's tmp_path, open to every user."""
    top = Path(tempfile.mkdtemp(prefix="kevo-hardening-"))
    top.chmod(0o755)
    for name in ("cache", "data"):
        (top / name).mkdir()
        (top / name).chmod(0o777)
    monkeypatch.setenv("KERNELEVO_CACHE_DIR", str(top / "cache"))
    monkeypatch.setenv("KERNELEVO_DATA_DIR", str(top / "data"))
    yield top
    for p in [top, *top.rglob("*")]:
        if p.is_dir():
            p.chmod(stat.S_IRWXU)
    shutil.rmtree(top)


def test_a_read_only_cache_folder_still_lists_and_a_tune_says_why_it_cannot_write(shared):
    prefix = unprivileged()
    cache = shared / "cache"
    populated(database_path())
    database_path().chmod(0o444)
    cache.chmod(0o555)
    listed = cli("db", "list", prefix=prefix)
    assert listed.returncode == 0, listed.stderr
    assert "test-chip" in listed.stdout and "finished" in listed.stdout
    shown = cli("db", "show", prefix=prefix)
    assert shown.returncode == 0 and "s4" in shown.stdout, shown.stderr
    line = one_line_error(cli("tune", "--workload", "tiny", prefix=prefix))
    assert str(database_path()) in line and ("cannot be written" in line or "cannot be opened" in line)
    with Database(database_path(), readonly=True) as db:
        assert len(db.runs()) == 1  # the refused tune recorded nothing


def test_a_read_only_cache_folder_without_a_database(shared):
    (shared / "cache").chmod(0o555)
    listed = cli("db", "list", prefix=unprivileged())
    assert listed.returncode == 0, listed.stderr
    assert "no tuning database" in listed.stdout
    assert "no tuning database" in one_line_error(cli("report", prefix=unprivileged()))


def test_a_read_only_data_folder_fails_the_tune_before_it_measures(shared):
    prefix = unprivileged()
    (shared / "data").chmod(0o555)
    started = time.monotonic()
    result = cli("tune", "--workload", "tiny", "--candidates", "1", "--reps", "1", prefix=prefix)
    line = one_line_error(result)
    assert "cannot write" in line and str(shared / "data") in line, line
    assert time.monotonic() - started < 60  # it did not tune first
    with Database(database_path(), readonly=True) as db:
        run = db.runs()[-1]
        assert run.status == "failed" and "cannot write" in run.reason
        assert db.measurements() == []


def test_a_failed_write_of_the_tuned_file_marks_the_run_failed_with_the_reason(monkeypatch, tmp_path):
    def full(self, result, output):
        raise OSError(errno.ENOSPC, "No space left on device", str(output))

    monkeypatch.setattr(Tuner, "write", full)
    workload = Workload("t", "test", (MatmulShape(8, 32, 32, "f32"),))
    settings = TuneSettings(candidates=1, reps=1, warmup=0, confirm=0, reproduce_rounds=1)
    with Database(database_path()) as db:
        with pytest.raises(OSError):
            Tuner("cpu", db, settings).run(workload, tmp_path / "tuned.kevo")
        run = db.runs()[-1]
    assert run.status == "failed"
    assert "No space left on device" in run.reason and "disk is full" in run.reason
    assert str(tmp_path / "tuned.kevo") in run.reason


# -- a full disk ----------------------------------------------------------------------------
FULL_DISK = """
import sqlite3, sys
connect = sqlite3.connect
def small(*args, **kwargs):
    connection = connect(*args, **kwargs)
    if str(args[0]).endswith("tuning.sqlite"):
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count={pages + 2}")
    return connection
sqlite3.connect = small
from kernelevo.cli import main
sys.argv = ["kernelevo", *sys.argv[1:]]
main()
"""


def test_a_full_disk_ends_the_tune_in_one_line_and_marks_the_run_failed():
    Database(database_path()).close()  # the schema's pages exist; two more may be taken
    result = subprocess.run([sys.executable, "-c", FULL_DISK, "tune", "--backend", "cpu", "--workload",
                             "tiny", "--candidates", "8", "--reps", "1"],
                            capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk is full" in last, result.stderr
    with Database(database_path(), readonly=True) as db:
        run = db.runs()[-1]
        assert run.status == "failed" and "disk is full" in run.reason
        assert db.measurements()  # what was measured before is kept


# -- runs whose process died ------------------------------------------------------------------
RUNNER = """
import sys, time
from kernelevo.tune.db import Database
db = Database(sys.argv[1])
print(db.start_run("test-chip", "cpu", sys.argv[2], {}), flush=True)
time.sleep(300)
"""


def test_a_killed_run_is_marked_died_and_a_live_run_of_another_process_is_not():
    path = database_path()
    Database(path).close()
    processes = {name: subprocess.Popen([sys.executable, "-c", RUNNER, str(path), name],
                                        stdout=subprocess.PIPE, text=True)
                 for name in ("killed", "alive")}
    try:
        ids = {name: int(p.stdout.readline()) for name, p in processes.items()}
        processes["killed"].send_signal(signal.SIGKILL)
        processes["killed"].wait()
        listed = cli("db", "list")
        assert listed.returncode == 0, listed.stderr
        rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if "│" in line}
        assert "died" in rows[str(ids["killed"])] and "running" in rows[str(ids["alive"])]
        with Database(path) as db:
            assert db.run(ids["killed"]).status == "running"  # opening marks nothing
            db.start_run("test-chip", "cpu", "next", {})  # the next start does
            killed, alive = db.run(ids["killed"]), db.run(ids["alive"])
        assert killed.status == "died" and str(processes["killed"].pid) in killed.reason
        assert killed.finished_at is not None
        assert alive.status == "running" and alive.finished_at is None
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# -- destructive commands ---------------------------------------------------------------------
def test_prune_rejects_negative_ages_and_deletes_only_with_yes():
    path = database_path()
    populated(path, 7)
    result = cli("db", "prune", "--older-than-days", "-1")
    assert result.returncode == 2 and "--older-than-days" in one_line_error(result)
    assert count(path) == 7
    dry = cli("db", "prune", "--older-than-days", "0")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 7" in dry.stdout and "test-chip" in dry.stdout and "--yes" in dry.stdout
    assert count(path) == 7
    assert cli("db", "prune", "--chip", "another-chip", "--yes").returncode == 0
    assert count(path) == 7
    done = cli("db", "prune", "--older-than-days", "0", "--yes")
    assert done.returncode == 0 and "deleted 7 measurements" in done.stdout, done.stderr
    assert count(path) == 0
    assert one_line_error(cli("db", "prune"))


def test_export_into_a_missing_folder_is_a_clear_error(tmp_path):
    populated(database_path())
    target = tmp_path / "missing" / "runs.json"
    line = one_line_error(cli("db", "export", str(target)))
    assert "does not exist" in line and str(target.parent) in line
    assert not target.parent.exists()
    result = cli("db", "export", str(tmp_path / "runs.json"))
    assert result.returncode == 0 and "1 runs and 5 measurements" in result.stdout, result.stderr
