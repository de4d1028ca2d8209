"""The tuner's guarantees: resume after kill -9, containment of crashing, hanging and wrong
kernels, concurrent runs on one database, schema migration, distillation fidelity."""

import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from kernelevo import chips
from kernelevo.config import KernelConfig
from kernelevo.dsl import check, parse
from kernelevo.dsl.select import CompiledProgram
from kernelevo.paths import database_path
from kernelevo.tune import db as dbmod
from kernelevo.tune.db import Database
from kernelevo.tune import distill as distill_mod
from kernelevo.tune.distill import Evidence
from kernelevo.tune.runner import Tuner, TuneSettings
from kernelevo.tune.search import Space, make_strategy
from kernelevo.tune.workloads import (MatmulShape, Workload, architecture_from_config, from_config,
                                      from_shapes_file)

LOCAL = chips.detect("cpu")
FAULTY = str(Path(__file__).parent / "support" / "faulty_worker.py")
SMALL = Workload("t", "test", (MatmulShape(24, 96, 80, "f32", label="a"),
                               MatmulShape(40, 64, 48, "bf16", label="b")))


def cli(*args, **kw):
    if args[:1] == ("tune",) and "--backend" not in args:
        args = ("tune", "--backend", "cpu") + args[1:]  # the CPU backend on any machine
    return subprocess.Popen([sys.executable, "-m", "kernelevo.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ), **kw)


def test_faulty_candidates_are_recorded_and_never_chosen(monkeypatch):
    # The search space depends on the core count (threads=1..cores): pin it to two cores so
    # the exhaustive walk meets the planted faults on any machine.
    two_cores = dataclasses.replace(LOCAL, cores=2)
    monkeypatch.setattr(chips, "detect", lambda backend="cpu": two_cores)
    settings = TuneSettings(strategy="exhaustive", candidates=40, reps=2, warmup=0, confirm=2,
                            job_timeout_s=8)
    shape = MatmulShape(24, 96, 80, "f32")
    # Plant the faults in register tiles the walk meets first on this chip (AVX-512 and AVX2
    # hold different tiles): crashes and wrong results on the second tile, one hang on the first.
    walk = [c.as_dict() for c in Space("matmul", "cpu", two_cores, shape.features()).configs[:40]]
    tiles = list(dict.fromkeys(tuple(f"{n}={c[n]}" for n in ("mc", "nc", "kc", "mr", "nr")) for c in walk))
    assert len(tiles) >= 2
    crash = [*tiles[1], "threads=1", "split=m"]
    hang = [*tiles[0], "threads=2", "split=n", "pack_a=no", "epilogue=fused"]
    wrong = [*tiles[1], "threads=1", "split=n"]
    command = [sys.executable, FAULTY, "crash=" + "+".join(crash), "hang=" + "+".join(hang),
               "wrong=" + "+".join(wrong)]
    workload = Workload("t", "test", (shape,))
    with Database(database_path()) as db:
        result = Tuner("cpu", db, settings, worker_command=command).run(workload, write=False)
        rows = db.measurements()
    by_status = {status: [r for r in rows if r.status == status] for status in
                 ("crash", "timeout", "wrong", "ok")}
    def planted(config, parts):
        return all(f" {p} " in f" {config} " for p in parts)

    assert by_status["crash"] and all(planted(r.config, crash) and "SIGSEGV" in r.reason
                                      for r in by_status["crash"])
    assert [planted(r.config, hang) for r in by_status["timeout"]] == [True]
    assert by_status["wrong"] and all(planted(r.config, wrong) and "relative error" in r.reason
                                      for r in by_status["wrong"])
    assert len(by_status["ok"]) > 10
    assert result.restarts == len(by_status["crash"]) + len(by_status["timeout"])
    faulty = {r.config for s in ("crash", "timeout", "wrong") for r in by_status[s]}
    best = result.shapes[0].best
    assert best is None or best[0] not in faulty
    assert not faulty & set(result.shapes[0].confirmed)
    assert not faulty & {r.config.to_dsl() for r in result.distilled.rules}


def test_a_run_killed_at_any_moment_resumes_without_losing_measurements():
    args = ("tune", "--workload", "qwen3-0.6b", "--candidates", "4", "--reps", "2")
    process = cli(*args)
    path = database_path()
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline:  # kill -9 once a few measurements are in
        if path.exists():
            try:
                count = sqlite3.connect(path).execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 8:
                break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with Database(path) as db:
        before = {(m.shape_key, m.config, m.phase): m.id for m in db.measurements()}
        assert len(before) >= 8 and db.runs()[-1].status == "running"
    # the same command again, on a smaller workload of the same shapes: nothing is re-measured
    shapes = [json.loads(s[2]) for s in Database(path).run_shapes(1)][:3]
    shapes_file = path.parent / "shapes.json"
    shapes_file.write_text(json.dumps([dict(s, op="matmul") for s in shapes]))
    done = cli("tune", "--shapes", str(shapes_file), "--candidates", "4", "--reps", "2")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    with Database(path) as db:
        after = {(m.shape_key, m.config, m.phase): m.id for m in db.measurements()}
        assert all(after[k] == v for k, v in before.items())  # kept, and not measured twice
        assert len(after) == len(db.measurements())
        assert db.runs()[-1].status == "finished"
    assert "reused from the database" in out


def test_two_runs_at_once_share_one_database():
    first = cli("tune", "--workload", "tiny", "--candidates", "5", "--reps", "2", "--output",
                str(database_path().parent / "a.kevo"))
    second = cli("tune", "--workload", "tiny", "--candidates", "5", "--reps", "2", "--seed", "1",
                 "--output", str(database_path().parent / "b.kevo"))
    for p in (first, second):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    connection = sqlite3.connect(database_path())
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Database(database_path()) as db:
        assert [r.status for r in db.runs()] == ["finished", "finished"]
        rows = db.measurements()
        assert len(rows) >= 2 * 3 * 3  # both runs' work is there


def test_schema_migration_keeps_data(tmp_path):
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    for statement in dbmod.MIGRATIONS[0].split(";"):
        if statement.strip():
            connection.execute(statement)
    connection.execute("PRAGMA user_version=1")
    connection.execute("INSERT INTO measurements (created_at, chip, backend, template_hash, op, "
                       "shape_key, config, status) VALUES (1, 'c', 'cpu', 'h', 'matmul', 's', 'x', 'ok')")
    connection.commit()
    connection.close()
    with Database(path) as db:
        assert db.schema_version == dbmod.SCHEMA_VERSION
        assert [m.config for m in db.measurements()] == ["x"]
        assert db.run_shapes(1) == []
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version={dbmod.SCHEMA_VERSION + 1}")
    connection.commit()
    with pytest.raises(RuntimeError, match="upgrade kernelevo"):
        Database(path)


def _synthetic(seed: int):
    """Training evidence: shapes with random confirmed ratios of a shared pool of
    configurations, each measured on every shape (as cross-timing makes them)."""
    import random

    rng = random.Random(seed)
    pool = [f"gemv nb={16 * (i + 1)} kb=256 threads=1 epilogue=fused" for i in range(8)]
    evidence, seen = [], set()
    for i in range(14):
        shape = MatmulShape(rng.choice([1, 2, 4, 8]), rng.choice([64, 128, 256, 512]),
                            rng.choice([64, 96, 128]), rng.choice(["f32", "bf16"]))
        if shape in seen:
            continue
        seen.add(shape)
        evidence.append(Evidence(shape, band=0.02, ratios={c: rng.uniform(0.55, 1.2) for c in pool}))
    return evidence


def _training_loss(rules, evidence):
    chosen = _choices(rules, evidence)
    return sum(math.log(ev.ratios[chosen[ev.shape.key]]) for ev in evidence if ev.shape.key in chosen)


def _choices(rules, evidence):
    """shape key -> the configuration a rule was fitted to give it."""
    return {s.key: r.config.to_dsl() for r in rules for s in r.training}


@pytest.mark.parametrize("seed", range(6))
def test_distilled_trees_fit_their_evidence_and_render_what_they_fit(seed):
    evidence = _synthetic(seed)
    per_depth = distill_mod.candidates(evidence, "cpu", LOCAL, min_speedup=1.03)
    base = parse("kevo 1\ntarget cpu\n\nmatmul {\n  else { gemv nb=512 threads=1 kb=256 epilogue=fused }\n}\n")
    shipped = KernelConfig.parse("gemv nb=512 threads=1 kb=256 epilogue=fused", "matmul", "cpu")
    losses = []
    for by_group in per_depth:
        rules = [r for group in by_group.values() for r in group]
        losses.append(_training_loss(rules, evidence))
        chosen = _choices(rules, evidence)
        for ev in evidence:  # a leaf never gives a shape something slower than its noise band
            if ev.shape.key in chosen:
                assert ev.ratios[chosen[ev.shape.key]] <= 1 + ev.band
        text = distill_mod.Distilled(rules).render(base, "base.kevo", LOCAL)
        assert check(parse(text), text, "tuned.kevo", LOCAL) == []
        compiled = CompiledProgram(parse(text), text, "tuned.kevo", LOCAL)
        for ev in evidence:  # the program selects exactly what each rule was fitted to give
            got = compiled.select("matmul", ev.shape.features()).config
            assert got.to_dsl() == chosen.get(ev.shape.key, shipped.to_dsl())
        # far outside what was measured, and for a dtype never measured: the shipped rules
        for far in (MatmulShape(3, 1 << 15, 1 << 15, "f32"), MatmulShape(4, 128, 96, "f16")):
            assert compiled.select("matmul", far.features()).config == shipped
    # deeper trees extend shallower ones: they fit the training shapes at least as well
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0  # some leaf beat the shipped choice (the ratios go down to 0.55)


def test_search_strategies_propose_valid_unique_configurations():
    shape = MatmulShape(24, 96, 80, "f32")
    space = Space("matmul", "cpu", LOCAL, shape.features())
    for name in ("evolve", "random", "exhaustive"):
        strategy = make_strategy(name, space, 0, set())
        seen = set()
        for round_ in range(8):
            batch = strategy.ask(4)
            for c in batch:
                assert c not in seen and space.valid(c)
                seen.add(c)
                strategy.tell(c, 1.0 / (1 + (hash(c.name) % 7)))
        assert len(seen) == 32
    exhaustive = make_strategy("exhaustive", Space("matmul", "cpu", LOCAL, MatmulShape(1, 64, 64).features(),
                               ), 0, set())
    everything = []
    while batch := exhaustive.ask(500):
        everything += batch
    assert len(everything) == len(Space("matmul", "cpu", LOCAL, MatmulShape(1, 64, 64).features()).configs)


def test_workloads_from_a_model_config_and_a_shapes_file(tmp_path):
    config = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
              "attn_logit_softcapping": 50.0, "sliding_window": 4096}
    arch = architecture_from_config(config)
    assert (arch.heads, arch.kv_heads, arch.head_dim, arch.softcap, arch.window) == (8, 4, 256, 50.0, 4096)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": config}))
    workload = from_config(path)
    mm = workload.for_op("matmul")
    assert MatmulShape(16, 2048, 2304, "bf16") in mm  # q_proj: 8 heads x 256
    attn = workload.for_op("attention")
    assert any(a.q_len == 1 and a.kv_len == 4096 and a.softcap == 50.0 for a in attn)
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"op": "matmul", "M": 5, "N": 7, "K": 9, "dtype": "f16"}]))
    assert from_shapes_file(shapes).shapes == (MatmulShape(5, 7, 9, "f16"),)
    shapes.write_text(json.dumps([{"op": "matmul", "M": 5, "N": 7, "K": 9, "dtype": "f64"}]))
    with pytest.raises(ValueError, match="entry 1: unsupported dtype 'f64'"):
        from_shapes_file(shapes)
    with pytest.raises(ValueError, match="none of hidden_size"):
        architecture_from_config({"num_attention_heads": 8})


def test_report_prints_tables_and_writes_a_plot(tmp_path):
    with Database(database_path()) as db:
        Tuner("cpu", db, TuneSettings(candidates=3, reps=2, warmup=0, confirm=1)).run(SMALL, write=False)
    plot = tmp_path / "report.png"
    result = subprocess.run([sys.executable, "-m", "kernelevo.cli", "report", "--plot", str(plot)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "matmul, train shapes, on" in result.stdout and "geometric-mean speedup" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_eager_baseline_is_timed_around_its_calls():
    """numpy and PyTorch baselines compute in the call: a sample must time the calls
    themselves, not an evaluation of a graph built before the clock starts."""
    import time as _time

    from kernelevo.tune import timing
    from kernelevo.tune.adapters import chained

    calls = []
    baseline = timing.eager(lambda: (calls.append(1), _time.sleep(0.002)))
    x = mx.ones((8, 8))
    candidate = chained(x, lambda first: first * 2)
    paired = timing.time_paired(candidate, baseline, reps=3, warmup=1, patience_s=0.0)
    assert paired.baseline.median_s >= 0.002
    assert paired.candidate.median_s < paired.baseline.median_s
    assert len(calls) >= 3 * paired.baseline.launches_per_sample
