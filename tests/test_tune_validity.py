"""What makes the tuner's figures fit to evolve on: the A/A control is never a candidate,
noise and planted flukes write no rule, busy machines and two-state samples decide
nothing, held-out shapes can veto a rule, replayed scores equal live ones, distilled rules
never select what a call cannot run, and `verify` catches a claim that does not hold.

Most tests time through a scripted worker (tests/support/scripted_worker.py): real kernels
are verified, but the clock follows a script, so what the tuner decides can be asserted."""

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kernelevo as ke
from kernelevo import chips
from kernelevo.config import KernelConfig
from kernelevo.dsl import parse
from kernelevo.dsl.select import CompiledProgram
from kernelevo.families import ALL_FAMILIES
from kernelevo.dsl.evaluate import compile_on_features
from kernelevo.features import attention_features, matmul_features
from kernelevo.paths import database_path
from kernelevo.tune import distill, timing
from kernelevo.tune.db import Database
from kernelevo.tune.measure import Measurer
from kernelevo.tune.runner import Tuner, TuneSettings
from kernelevo.tune.score import Scorer
from kernelevo.tune.workloads import MatmulShape, Workload

LOCAL = chips.detect("cpu")
SCRIPTED = str(Path(__file__).parent / "support" / "scripted_worker.py")
# f32 layers: what the shipped rules choose is a threads=2 gemm; the script says what
# everything else costs relative to it
TRAIN = (MatmulShape(32, 256, 128, "f32", label="t1"), MatmulShape(64, 256, 128, "f32", label="t2"),
         MatmulShape(128, 512, 128, "f32", label="t3"))
HELD_OUT = (MatmulShape(48, 384, 128, "f32", label="h1"), MatmulShape(96, 256, 256, "f32", label="h2"))
WORKLOAD = Workload("scripted", "scripted timings", TRAIN, HELD_OUT)
SETTINGS = TuneSettings(strategy="exhaustive", candidates=24, reps=3, warmup=0, confirm=3)
FAST = "mr=4+nr=16"  # the script's planted configurations: every candidate with these


def tune(tmp_path, script: dict, workload=WORKLOAD, settings=SETTINGS):
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    with Database(database_path()) as db:
        result = Tuner("cpu", db, settings, worker_command=[sys.executable, SCRIPTED, str(path)]).run(
            workload, output=tmp_path / "tuned.kevo")
        rows = db.measurements()
    return result, rows, (tmp_path / "tuned.kevo").read_text()


def planted(config: str) -> bool:
    return all(f" {p} " in f" {config} " for p in FAST.split("+"))


def test_a_clear_winner_is_written_as_a_range_rule_that_reaches_unmeasured_shapes(tmp_path):
    result, rows, text = tune(tmp_path, {"speed": {FAST: 0.6}, "default": 1.3, "noise": 0.01})
    assert result.distilled.rules and all(planted(r.config.to_dsl()) for r in result.distilled.rules)
    program = CompiledProgram(parse(text), text, "tuned.kevo", LOCAL)
    # a layer nobody measured, between the measured ones, takes the rule
    unmeasured = MatmulShape(40, 320, 128, "f32")
    assert planted(program.select("matmul", unmeasured.features()).config.to_dsl())
    assert "claim: 1.6" in text and "held-out" in text  # the re-timed claim, on both splits
    assert all(o.speedup > 1.5 for o in result.outcomes)


def test_the_a_a_pair_is_never_a_candidate(tmp_path):
    # The shipped choice timed against itself "wins" 2x: a control, never a candidate.
    result, rows, text = tune(tmp_path, {"aa_ratio": 0.5, "default": 1.0, "noise": 0.01})
    controls = [r for r in rows if r.phase == "control"]
    assert len(controls) >= len(TRAIN) and all(abs(r.ratio - 0.5) < 1e-9 for r in controls)
    # nothing but the control pairs a configuration with itself
    assert all(r.config != r.baseline_config for r in rows if r.phase != "control")
    assert not result.distilled.rules and "claim:" not in text
    for s in result.shapes:
        assert s.shipped.to_dsl() not in s.confirmed


def test_an_injected_noisy_timer_yields_no_rule(tmp_path):
    # Every configuration costs the same; the clock is noisy (30% per sample).
    result, rows, text = tune(tmp_path, {"default": 1.0, "noise": 0.3, "seed": 4})
    assert not result.distilled.rules and "claim:" not in text
    assert all(s.band is not None and s.band > 0.1 for s in result.shapes)


def test_a_planted_fluke_of_the_search_is_never_written(tmp_path):
    # 2x faster in the search phase, 1.5x slower once confirmed: search figures decide nothing.
    result, rows, text = tune(tmp_path, {"search_speed": {FAST: 0.5}, "speed": {FAST: 1.5},
                                         "default": 1.3, "noise": 0.01})
    assert any(planted(r.config) and r.phase == "search" and r.ratio < 0.6 for r in rows)
    assert not any(planted(r.config.to_dsl()) for r in result.distilled.rules)
    assert not any(planted(r.config) and r.usable and r.ratio < 1 for r in rows if r.phase != "search")


def test_a_rule_the_held_out_shapes_contradict_is_not_written(tmp_path):
    slow_on_held_out = {f"shape:{h.key}+{FAST}": 1.4 for h in HELD_OUT}
    result, rows, text = tune(tmp_path, {"speed": {**slow_on_held_out, FAST: 0.6}, "default": 1.3,
                                         "noise": 0.01})
    assert not any(planted(r.config.to_dsl()) for r in result.distilled.rules)
    assert any("held-out" in reason for reason in result.dropped)


def test_a_two_state_configuration_is_not_written(tmp_path):
    result, rows, text = tune(tmp_path, {"speed": {FAST: 0.6}, "bimodal": [FAST], "default": 1.3,
                                         "noise": 0.01})
    assert any(planted(r.config) and r.bimodal for r in rows)
    assert not any(planted(r.config.to_dsl()) for r in result.distilled.rules)


def test_measurements_on_a_busy_machine_decide_nothing(tmp_path):
    result, rows, text = tune(tmp_path, {"speed": {FAST: 0.6}, "default": 1.3, "loaded": True})
    assert rows and all(r.loaded for r in rows if r.ok)
    assert not result.distilled.rules
    assert result.loaded == len([r for r in rows if r.ok])


def test_replayed_scores_equal_live_scores_on_stored_data(tmp_path):
    result, rows, text = tune(tmp_path, {"speed": {FAST: 0.6}, "default": 1.3, "noise": 0.01})
    program = CompiledProgram(parse(text), text, "tuned.kevo", LOCAL)
    shapes = WORKLOAD.labelled()
    with Database(database_path()) as db:
        script = tmp_path / "script.json"
        with Measurer("cpu", db, worker_command=[sys.executable, SCRIPTED, str(script)]) as m:
            live = Scorer(m).score(program, shapes)
        count = len(db.measurements())
        replayed = Scorer.replay("cpu", db).score(program, shapes)  # no worker: it cannot measure
        assert len(db.measurements()) == count
    assert [s.ratio for s in replayed.shapes] == [s.ratio for s in live.shapes]
    assert replayed.geomean("train") == live.geomean("train") > 1.5
    assert replayed.geomean("held-out") == live.geomean("held-out") > 1.5
    assert not replayed.unmeasured
    # a program choosing something never measured: replay says so instead of guessing
    other = text.replace("mr=4 nr=16", "mr=2 nr=16", 1)  # valid on every CPU, never a candidate
    assert "mr=2 nr=16" in other
    scored = Scorer.replay("cpu", Database(database_path())).score(
        CompiledProgram(parse(other), other, "other.kevo", LOCAL), shapes)
    assert scored.unmeasured and scored.geomean("train") is None


def test_score_and_explain_on_the_command_line_read_the_stored_figures(tmp_path):
    result, rows, text = tune(tmp_path, {"speed": {FAST: 0.6}, "default": 1.3, "noise": 0.01})
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"op": "matmul", "M": s.M, "N": s.N, "K": s.K, "dtype": s.dtype,
                                   **({"split": "held-out"} if s in HELD_OUT else {})}
                                  for s in TRAIN + HELD_OUT]))
    cli = [sys.executable, "-m", "kernelevo.cli"]
    env = {**os.environ, "COLUMNS": "250"}
    scored = subprocess.run(cli + ["score", str(tmp_path / "tuned.kevo"), "--shapes", str(shapes), "--replay"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert "train: 1.6" in scored.stdout and "held-out: 1.6" in scored.stdout
    assert "reproduce, run" in scored.stdout  # where each figure comes from
    explained = subprocess.run(cli + ["explain", "matmul", "--shape", "64x256x128", "--dtype", "f32",
                                      "--transpose-b"], capture_output=True, text=True, env=env, timeout=300)
    # (the tuned file was written elsewhere: explain shows the shipped rule and what is stored)
    assert explained.returncode == 0 and "evidence" in explained.stdout


# -- distilled rules and the constraints of every family ---------------------------------

CHIPS = {"cpu": LOCAL, "cuda": chips.from_id("nvidia-h100"), "metal": chips.from_id("apple-m3-max")}


class _Call:
    """A training 'shape' for distillation with any features (transposes, epilogues, masks)."""

    def __init__(self, op, features):
        self.op, self._features = op, features
        self.key = json.dumps(features, sort_keys=True)

    def features(self):
        return dict(self._features)


def _random_call(rng: random.Random, op: str, like: dict | None = None) -> dict:
    def size(lo, hi):
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    if op == "matmul":
        f = matmul_features(size(1, 20000), size(1, 20000), size(1, 20000), batch=rng.choice([1, 1, 2, 3]),
                            dtype=rng.choice(["f32", "f16", "bf16"]), transpose_a=rng.random() < 0.3,
                            transpose_b=rng.random() < 0.6,
                            epilogue=rng.choice(["none", "bias", "mixed"]))
    else:
        kv_heads = rng.choice([1, 2, 4, 8])
        q_len = size(1, 4096)
        mask = rng.choice(["none", "causal", "bool", "additive"])
        f = attention_features(batch=rng.choice([1, 2]), heads=kv_heads * rng.choice([1, 2, 4, 7]),
                               kv_heads=kv_heads, q_len=q_len, kv_len=max(q_len, size(1, 40000))
                               if rng.random() < 0.8 else size(1, 40000),
                               head_dim=rng.choice([64, 72, 80, 96, 100, 128, 192, 256]),
                               dtype=rng.choice(["f32", "f16", "bf16"]), mask=mask,
                               softcap=rng.choice([0.0, 0.0, 30.0]), window=rng.choice([0, 0, 512]))
    if like is not None and rng.random() < 0.7:  # mostly calls of the rule's own group
        for name in distill.GROUP_FEATURES[op] + distill.PINNED_FEATURES[op]:
            f[name] = like[name]
        if op == "attention":
            f["causal"] = f["mask"] == "causal"
        for name in distill.HULL_FEATURES[op]:
            if rng.random() < 0.7:
                f[name] = max(1, int(like[name] * rng.uniform(0.3, 3)))
        if op == "attention":
            f["gqa"] = f["heads"] // f["kv_heads"]
    return f


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**9), family=st.sampled_from([f for f in ALL_FAMILIES if f.params]))
def test_distilled_rules_never_select_what_a_call_cannot_run(seed, family):
    rng = random.Random(seed)
    chip = CHIPS[family.backend]
    configs = list(family.search_space(chip))
    rng.shuffle(configs)
    # evidence: a few calls of one group that a configuration can run
    config = first = None
    for params in configs[:20]:
        candidate = KernelConfig.make(family.op, family.backend, family.name, params)
        first = next((f for f in (_random_call(rng, family.op) for _ in range(200))
                      if not candidate.schema.violations(candidate.as_dict(), chip, f)), None)
        if first is not None:
            config = candidate
            break
    assume(first is not None)
    key = distill.group_key(family.op, first)
    same_group = [f for f in (_random_call(rng, family.op, first) for _ in range(50))
                  if distill.group_key(family.op, f) == key]
    members = [first] + [f for f in same_group if not config.schema.violations(config.as_dict(), chip, f)][:3]
    evidence = [distill.Evidence(_Call(family.op, f), 0.01, {config.to_dsl(): 0.5}) for f in members]
    leaf = distill.Leaf(evidence, config.to_dsl(), sum(math.log(0.5) for _ in evidence))
    rule = distill.rule_for(family.op, family.backend, chip, key,
                            distill.pinned_values(family.op, evidence), leaf)
    assert rule is not None  # the evidence calls run it
    holds = compile_on_features(rule.condition, family.op)
    for f in members:  # the rule serves the calls it was fitted on
        assert holds(f, chip)
    matched = 0
    for _ in range(300):
        call = _random_call(rng, family.op, first)
        if holds(call, chip):
            matched += 1
            assert not config.schema.violations(config.as_dict(), chip, call), (rule.condition, call)
    assert matched > 0


# -- timing as a model runs it -----------------------------------------------------------


def _plain_chain(f, x, n):
    y = x
    for _ in range(n):
        y = f(y)
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(y)
    return (time.perf_counter() - start) / n


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_the_tuners_figure_agrees_with_a_plain_dependent_chain_for_every_thread_count(dtype):
    """The tuner chains launches with mx.depends; a model feeds each layer's output to the
    next. For every thread count both figures agree within 10%."""
    from kernelevo.tune.adapters import ADAPTERS

    shape = MatmulShape(64, 512, 512, dtype)
    adapter = ADAPTERS["matmul"]
    a, b = adapter.inputs(shape, 7)
    b = b * (512 ** -0.5)  # keeps a chain of products bounded
    base = ke.explain_matmul(shape.features()).selection.config.as_dict()
    for threads in range(1, LOCAL.cores + 1):
        config = KernelConfig.make("matmul", "cpu", base_family(shape), {**base, "threads": threads})
        launch = adapter.launcher(shape, (a, b), config)
        chain = lambda y: ke.matmul(y, b, transpose_b=True, config=config)  # noqa: E731
        for attempt in range(3):  # a busy moment on a shared machine can spoil one try
            tuner, plain = [], []
            for _ in range(7):
                t = timing.time_one(launch, reps=3, warmup=1)
                tuner.append(t.median_s)
                plain.append(_plain_chain(chain, a, t.launches_per_sample))
            ratio = sorted(tuner)[3] / sorted(plain)[3]
            if abs(ratio - 1) <= 0.10:
                break
        assert abs(ratio - 1) <= 0.10, (threads, ratio)


@pytest.mark.parametrize("out_shape", [(16, 64), (16, 96), (16, 40)], ids=["same", "larger", "smaller"])
def test_a_gpu_chain_carries_the_previous_output_into_the_next_operand(out_shape):
    """On a GPU the next launch must read the buffer the last one wrote (MLX orders GPU
    kernels by buffers; mx.depends passes on the operand's own): the carried operand has
    the operand's shape and type and is made of the output, padded where it is smaller."""
    from kernelevo.tune.adapters import carried

    first = mx.arange(16 * 64, dtype=mx.float32).reshape(16, 64).astype(mx.bfloat16)
    after = (mx.arange(math.prod(out_shape), dtype=mx.float32) + 5000).reshape(out_shape).astype(mx.bfloat16)
    got = carried(after, first)
    assert got.shape == first.shape and got.dtype == first.dtype
    flat_after, flat_got, flat_first = (x.reshape(-1).astype(mx.float32) for x in (after, got, first))
    n = min(after.size, first.size)
    assert mx.array_equal(flat_got[:n], flat_after[:n])
    if after.size < first.size:
        assert mx.array_equal(flat_got[n:], flat_first[n:])


@pytest.mark.gpu
def test_on_a_gpu_the_tuners_figure_agrees_with_a_plain_dependent_chain():
    """On MLX's CUDA backend the chain also stops independent launches from overlapping."""
    if not mx.cuda.is_available():
        pytest.skip("needs MLX's CUDA back-end and a GPU")
    from kernelevo.tune.adapters import ADAPTERS
    from kernelevo.tune.worker import use_backend

    use_backend("cuda")
    adapter = ADAPTERS["matmul"]
    for shape in (MatmulShape(16, 4096, 4096, "bf16"), MatmulShape(512, 2048, 2048, "bf16")):
        a, b = adapter.inputs(shape, 7)
        b = b * (shape.K ** -0.5)
        config = ke.select_matmul(shape.features(), "cuda").config
        launch = adapter.launcher(shape, (a, b), config)
        chain = lambda y: ke.matmul(y, b, transpose_b=True, config=config)  # noqa: E731
        tuner, plain = [], []
        for _ in range(7):
            t = timing.time_one(launch, reps=3, warmup=1)
            tuner.append(t.median_s)
            plain.append(_plain_chain(chain, a, t.launches_per_sample))
        ratio = sorted(tuner)[3] / sorted(plain)[3]
        assert abs(ratio - 1) <= 0.10, (shape, config.to_dsl(), ratio)


def base_family(shape):
    return ke.explain_matmul(shape.features()).selection.config.family


def test_a_busy_machine_is_seen_and_the_pairs_are_marked():
    """Another process keeping a core busy: blocks are re-taken, then kept and marked."""
    if not timing.LoadProbe().available:
        pytest.skip("this machine does not report CPU time (/proc/stat)")
    from kernelevo.tune.adapters import ADAPTERS

    shape = MatmulShape(64, 512, 512, "f32")
    adapter = ADAPTERS["matmul"]
    inputs = adapter.inputs(shape, 3)
    config = ke.explain_matmul(shape.features()).selection.config
    a, b = adapter.launcher(shape, inputs, config), adapter.launcher(shape, inputs, config)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        t = timing.time_paired(a, b, reps=9, warmup=1, patience_s=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert t.load.watched and t.load.retakes > 0 and t.load.loaded
    assert t.load.median > 0.3  # one of two cores taken, as a share of the machine


# -- kernelevo verify --------------------------------------------------------------------


def another_block(shipped: KernelConfig) -> KernelConfig:
    """The shipped gemm with another row block: a real difference this CPU can run (mc must
    stay a multiple of the register tile's mr, which depends on the chip)."""
    mc = next(m for m in (64, 128, 48, 96, 192, 32) if m != shipped.get("mc") and m % shipped.get("mr") == 0)
    return KernelConfig.make("matmul", "cpu", shipped.family, dict(shipped.as_dict(), mc=mc))


def test_verify_flags_a_hand_planted_wrong_claim(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"op": "matmul", "M": 64, "N": 256, "K": 256, "dtype": "f32"}]))
    shipped = ke.explain_matmul(MatmulShape(64, 256, 256, "f32").features()).selection.config
    config = another_block(shipped).to_dsl()
    program = tmp_path / "claims.kevo"
    program.write_text(f"""kevo 1
target cpu

matmul {{
  # claim: 5.00x the shipped rules on 1 training shape (planted by hand)
  when M == 64 and N == 256 and K == 256 and dtype == f32 {{ {config} }}
  else {{ gemv nb=128 kb=256 threads=1 epilogue=fused }}
}}
""")
    result = subprocess.run([sys.executable, "-m", "kernelevo.cli", "verify", str(program), "--shapes",
                             str(shapes), "--rounds", "1", "--reps", "3"], capture_output=True, text=True,
                            env=dict(os.environ), timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    # On a quiet machine the re-timing shows the claim false; on a busy one (a test run
    # beside other work) the honest answer is that it cannot tell. Neither passes.
    assert ("DOES NOT REPRODUCE on train" in result.stdout and "claimed 5.00x" in result.stdout
            or "cannot tell: every round ran on a busy machine" in result.stdout), result.stdout


def test_verify_judges_claims_against_fresh_worker_re_timings(tmp_path):
    """The same check through the scripted clock: a true claim reproduces, a planted one
    does not, whatever the machine is doing."""
    from kernelevo.tune.reproduce import check_rules, reproduce

    script = tmp_path / "script.json"
    script.write_text(json.dumps({"speed": {FAST: 0.6}, "default": 1.3, "noise": 0.01}))
    shipped = ke.explain_matmul(TRAIN[0].features()).selection.config
    fast = next(c for c in (KernelConfig.make("matmul", "cpu", "gemm", dict(
        shipped.as_dict(), mc=m, mr=4, nr=16, nc=384)) for m in (32, 64)) if planted(c.to_dsl()))
    other = another_block(shipped)
    text = f"""kevo 1
target cpu

matmul {{
  # claim: 1.67x the shipped rules on 1 training shape (true: the script makes it 0.6x the time)
  when M == 32 and N == 256 {{ {fast.to_dsl()} }}
  # claim: 5.00x the shipped rules on 1 training shape (planted: the script makes it 1.3x the time)
  when M == 64 and N == 256 {{ {other.to_dsl()} }}
  else {{ gemv nb=128 kb=256 threads=1 epilogue=fused }}
}}
"""
    program = CompiledProgram(parse(text), text, "claims.kevo", LOCAL)
    with Database(database_path()) as db, Measurer("cpu", db, worker_command=[
            sys.executable, SCRIPTED, str(script)]) as m:
        checks = check_rules(program, reproduce(m, program, [("train", s) for s in TRAIN[:2]], rounds=2))
    assert [c.rule for c in checks] == [1, 2]
    assert checks[0].reproduces and "reproduces on train (1.6" in checks[0].verdict
    assert not checks[1].reproduces and "DOES NOT REPRODUCE on train: 0.77x, claimed 5.00x" in checks[1].verdict
