"""kernelevo tune: measurements kept across runs, the written file is the one in force,
wrong kernels are rejected and never chosen."""

import os
import subprocess
import sys

import mlx.core as mx

import kernelevo as ke
from kernelevo import chips
from kernelevo.dsl import check, parse
from kernelevo.features import matmul_features
from kernelevo.paths import database_path, tuned_heuristics_path
from kernelevo.tune.db import Database
from kernelevo.tune.runner import Tuner, TuneSettings
from kernelevo.tune.workloads import PRESETS, MatmulShape, Workload

LOCAL = chips.detect("cpu")
FAST = TuneSettings(candidates=3, reps=2, warmup=0, confirm=1, strategy="random")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kernelevo.cli", *args], capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


def test_tune_writes_heuristics_that_matmul_then_uses():
    result = run_cli("tune", "--chip", "auto", "--backend", "cpu", "--workload", "tiny",
                     "--candidates", "4", "--reps", "2")
    assert result.returncode == 0, result.stderr
    path = tuned_heuristics_path(LOCAL.id)
    assert path.is_file() and f"wrote {path}" in result.stdout.replace("\n", "")
    text = path.read_text()
    assert check(parse(text, str(path)), text, str(path), LOCAL) == []

    explained = run_cli("explain", "matmul", "--shape", "64x128x256", "--dtype", "bf16", "--transpose-b")
    assert explained.returncode == 0, explained.stderr
    assert str(path) in explained.stdout.replace("\n", "") and "tuned" in explained.stdout

    # In this process too: the tuned file decides what ke.matmul runs.
    ke.forget_selections()
    e = ke.explain_matmul(matmul_features(64, 128, 256, dtype="bf16", transpose_b=True))
    assert e.source.path == path
    out = ke.matmul(mx.ones((64, 256), dtype=mx.bfloat16), mx.ones((128, 256), dtype=mx.bfloat16),
                    transpose_b=True, stream=mx.cpu)
    family, params = ke.ops._ext.config_of(out)
    assert ke.KernelConfig.make("matmul", "cpu", family, params) == e.selection.config


def test_database_keeps_every_measurement_across_runs():
    workload = Workload("t", "test", (MatmulShape(16, 64, 48, "f32", label="a"),))
    with Database(database_path()) as db:
        def tuning():  # all but the final re-timing in fresh workers, which every run repeats
            return [m for m in db.measurements() if m.phase != "reproduce"]

        first = Tuner("cpu", db, FAST).run(workload, write=False)
        n = len(tuning())
        # the candidates, the shipped choice (its A/A pair), mx.matmul, and the confirmation
        # of the best
        assert n == FAST.candidates + 2 + FAST.confirm
        assert first.measured == len(db.measurements()) and first.reused == 0
        before = len(db.measurements())
        busy = [m for m in tuning() if m.loaded]  # taken on a busy machine: worth taking again
        second = Tuner("cpu", db, FAST).run(workload, write=False)
        # nothing measured twice, but what the first run could only take under load
        again = [m for m in tuning() if m.run_id == second.run_id]
        assert sorted((m.config, m.phase) for m in again) == sorted((m.config, m.phase) for m in busy)
        assert second.reused == n - len(busy) and second.measured == len(db.measurements()) - before
        runs = db.runs()
        assert [r.status for r in runs] == ["finished", "finished"]
        rows = db.measurements(run_id=runs[0].id)
        assert all(r.status == "ok" and r.median_s > 0 and r.chip == LOCAL.id for r in rows)


def test_other_chips_are_refused():
    result = run_cli("tune", "--chip", "apple-m3-max", "--workload", "tiny")
    assert result.returncode == 2
    assert "can only be timed on itself" in result.stderr


def test_a_gpu_backend_this_machine_lacks_is_refused():
    if mx.cuda.is_available() or mx.metal.is_available():
        missing = "metal" if mx.cuda.is_available() else "cuda"
    else:
        missing = "cuda"
    result = run_cli("tune", "--backend", missing, "--workload", "tiny")
    assert result.returncode == 2
    assert f"cannot time {missing} kernels here" in result.stderr
    unknown = run_cli("tune", "--backend", "vulkan", "--workload", "tiny")
    assert unknown.returncode == 2 and "unknown backend 'vulkan'" in unknown.stderr


def test_presets_are_real_layer_shapes():
    qwen = PRESETS["qwen3-0.6b"]
    shapes = {(s.M, s.N, s.K) for s in qwen.for_op("matmul")}
    assert (1, 2048, 1024) in shapes and (128, 1024, 3072) in shapes  # q_proj, down_proj
    assert all(s.transpose_b for s in qwen.for_op("matmul"))
    attention = qwen.for_op("attention")
    assert {(a.heads, a.kv_heads, a.head_dim) for a in attention} == {(16, 8, 128)}
    assert {a.q_len for a in attention} == {1, 256, 1024} and {a.mask for a in attention if a.q_len > 1} == {"causal"}


def test_verification_skips_an_odd_neighbour_the_configuration_cannot_serve(monkeypatch):
    """gemv holds at most 64 rows: verified at M=64, its M=65 neighbour is not a failure,
    but a wrong result at the shape itself still is."""
    from dataclasses import replace

    from kernelevo.tune.adapters import ADAPTERS
    from kernelevo.tune.worker import Worker

    monkeypatch.setattr(ADAPTERS["matmul"], "variants", lambda s: [s, replace(s, M=65)])
    shape = MatmulShape(64, 96, 80, "f32", transpose_b=False)
    config = f"gemv nb=128 kb=256 threads={LOCAL.cores} epilogue=fused"
    ok, error, reason = Worker().verify(shape, config, "cpu", seed=3)
    assert ok and error < 1e-5, reason
    monkeypatch.setattr(ADAPTERS["matmul"], "reference", lambda s, inputs: 2 * (to_f64_pair(inputs)))
    ok, _, reason = Worker().verify(shape, config, "cpu", seed=3)
    assert not ok and "wrong result at" in reason


def to_f64_pair(inputs):
    from kernelevo.tune.correctness import to_f64

    a, b = (to_f64(x) for x in inputs)
    return a @ b
