"""Inputs that mean nothing are refused with one line naming the file, entry and field: shapes
files, model config.json files and the numbers of the command line. Fuzzed: random shapes
files, random config.json files and random argument combinations of tune, score, report
and explain never give a traceback; an error is one line with a non-zero exit status.

Nothing here tunes: `kernelevo tune` runs in-process with the Tuner replaced by a stub that
stops the command where measuring would begin, so an input that passes validation is seen
to reach it, and one that does not is seen to fail before it."""

import json
import math
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kernelevo import chips
from kernelevo.cli import app
from kernelevo.paths import database_path
from kernelevo.tune import runner as runner_mod
from kernelevo.tune import workloads as wl
from kernelevo.tune.db import Database

LOCAL = chips.detect("cpu")
RUNNER = CliRunner()


class Reached(Exception):
    """The stub Tuner was constructed: validation passed and measuring would begin."""


class StubTuner:
    def __init__(self, *args, **kwargs):
        raise Reached()


@pytest.fixture
def no_tuning(monkeypatch):
    monkeypatch.setattr(runner_mod, "Tuner", StubTuner)


def invoke(args):
    return RUNNER.invoke(app, [str(a) for a in args])


def assert_clean(result, args):
    """No traceback; a failure is one `error:` line on stderr (or click's usage line, made one
    line) with a non-zero status."""
    exc = result.exception
    assert exc is None or isinstance(exc, (SystemExit, Reached)), (args, repr(exc), result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if isinstance(exc, Reached):
        return "reached"
    if result.exit_code != 0:
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        if lines and re.match(r"\S+:\d+:\d+: error: ", lines[0]):
            return "error"  # a .kevo program's diagnostics, as `check` prints them (with a caret)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        return "error"
    return "ok"


def write(tmp_path, name, value) -> str:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


# -- shapes files: each case names the file, the entry and the field ----------------------

GOOD = {"op": "matmul", "M": 16, "N": 256, "K": 128, "dtype": "f32"}
ATTN = {"op": "attention", "heads": 8, "kv_heads": 2, "q_len": 1, "kv_len": 256, "head_dim": 64,
        "dtype": "f32"}

BAD_SHAPES = [
    ({**GOOD, "M": -1}, "M must be a positive integer, got -1"),
    ({**GOOD, "M": 0}, "M must be a positive integer, got 0"),
    ({**GOOD, "M": 16.5}, "M must be a positive integer, got 16.5"),
    ({**GOOD, "N": "256"}, 'N must be a positive integer, got "256" (a string)'),
    ({**GOOD, "K": True}, "K must be a positive integer, got true"),
    ({**GOOD, "batch": -3}, "batch must be a positive integer, got -3"),
    ({**GOOD, "M": 10**9}, "M must be at most 1048576 (2^20"),
    ({**GOOD, "M": 1 << 20, "N": 1 << 20, "K": 1 << 20}, "would hold 1099511627776 elements, more than 2^31"),
    ({"op": "conv2d", "M": 16, "N": 16, "K": 16}, 'op must be "matmul" or "attention", got "conv2d"'),
    ([16, 256, 128], "must be a JSON object such as"),
    ("16x256x128", "must be a JSON object such as"),
    ({**GOOD, "transpose_b": "yes"}, "transpose_b must be true or false"),
    ({**GOOD, "dtype": "f64"}, "unsupported dtype 'f64'"),
    ({**GOOD, "colour": 3}, 'unknown field "colour" for matmul'),
    ({"op": "matmul", "M": 16, "N": 256}, "matmul entries need K"),
    ({**GOOD, "split": "test"}, 'split must be "train" or "held-out", got "test"'),
    ({**ATTN, "heads": 0}, "heads must be a positive integer, got 0"),
    ({**ATTN, "kv_heads": 3}, "heads (8) must be a multiple of kv_heads (3)"),
    ({**ATTN, "mask": "bool"}, 'mask must be "none" or "causal"'),
    ({**ATTN, "softcap": -1}, "softcap must be a finite number >= 0"),
    ({**ATTN, "window": -4}, "window must be a non-negative integer, got -4"),
    ({**ATTN, "q_len": 1 << 20, "kv_len": 1 << 20}, "the scores (batch x heads x q_len x kv_len) would hold"),
]


@pytest.mark.parametrize("entry, message", BAD_SHAPES, ids=[m[:40] for _, m in BAD_SHAPES])
def test_a_shapes_entry_that_means_nothing_is_refused_naming_file_entry_and_field(tmp_path, entry, message):
    path = write(tmp_path, "shapes.json", [GOOD, GOOD, entry])
    with pytest.raises(ValueError) as error:
        wl.from_shapes_file(path)
    text = str(error.value)
    assert text.startswith(f"{path} entry 3: ") and message in text, text
    assert "\n" not in text


def test_a_shapes_file_that_is_no_list_of_shapes_is_refused(tmp_path):
    for content, message in (('{"M": 1}', "must hold a non-empty JSON list of shapes"),
                             ("[]", "must hold a non-empty JSON list"), ("[{", "is not JSON"),
                             ("[" * 100000, "is not JSON")):
        path = write(tmp_path, "shapes.json", content)
        with pytest.raises(ValueError, match=message):
            wl.from_shapes_file(path)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(ValueError, match="not UTF-8"):
        wl.from_shapes_file(tmp_path / "binary.json")


def test_a_valid_shapes_file_still_reads_with_its_defaults(tmp_path):
    path = write(tmp_path, "shapes.json", [{"M": 16, "N": 256, "K": 128},
                                           {**ATTN, "split": "held-out", "label": "decode"}])
    w = wl.from_shapes_file(path)
    assert w.shapes == (wl.MatmulShape(16, 256, 128, "bf16", 1, True),)  # transpose_b: true by default
    assert w.held_out[0].label == "decode" and w.held_out[0].batch == 1


# -- config.json -------------------------------------------------------------------------

QWEN = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}

BAD_CONFIGS = [
    ([QWEN], "must be a JSON object (a model's config.json), got a list"),
    ({"text_config": 7}, "text_config must be a JSON object, got the number 7"),
    ({**QWEN, "num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({**QWEN, "num_key_value_heads": 0, "head_dim": None}, "num_key_value_heads must be a positive integer"),
    ({"text_config": {**QWEN, "hidden_size": -5}}, "text_config.hidden_size must be a positive integer, got -5"),
    ({**QWEN, "hidden_size": "1024"}, 'hidden_size must be a positive integer, got "1024" (a string)'),
    ({**QWEN, "intermediate_size": 1.5}, "intermediate_size must be a positive integer, got 1.5"),
    ({**QWEN, "head_dim": None, "hidden_size": 1000, "num_attention_heads": 16}, "not a multiple of"),
    ({**QWEN, "hidden_size": 1 << 20, "intermediate_size": 1 << 20}, "elements, more than 2^31"),
    ({**QWEN, "sliding_window": -1}, "sliding_window must be a non-negative integer"),
    ({**QWEN, "attn_logit_softcapping": "high"}, "attn_logit_softcapping must be a finite number"),
    ({**QWEN, "num_key_value_heads": 5}, "is not a multiple of num_key_value_heads 5"),
    ({"hidden_size": 64}, "the config has none of num_attention_heads"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_a_config_json_that_is_no_transformer_is_refused_naming_the_key(tmp_path, config, message):
    path = write(tmp_path, "config.json", config)
    with pytest.raises(ValueError) as error:
        wl.from_config(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text, text


def test_a_real_config_still_reads(tmp_path):
    w = wl.from_config(write(tmp_path, "config.json", {"text_config": QWEN}))
    assert wl.MatmulShape(16, 2048, 1024, "bf16") in w.shapes


# -- the command line's numbers ----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--candidates", "-5"], "Invalid value for '--candidates'"),
    (["--candidates", "0"], "Invalid value for '--candidates'"),
    (["--reps", "0"], "Invalid value for '--reps'"),
    (["--time-budget", "-1"], "Invalid value for '--time-budget'"),
    (["--time-budget", "0"], "Invalid value for '--time-budget'"),
    (["--time-budget", "nan"], "Invalid value for '--time-budget'"),
])
def test_tune_numbers_that_mean_nothing_fail_before_any_measurement(no_tuning, args, message):
    result = invoke(["tune", "--workload", "tiny", *args])
    assert assert_clean(result, args) == "error" and result.exit_code == 2
    assert message in result.stderr


def test_tune_with_valid_numbers_reaches_the_tuner(no_tuning):
    result = invoke(["tune", "--workload", "tiny", "--candidates", "1", "--reps", "1", "--time-budget", "0.5"])
    assert assert_clean(result, "valid") == "reached"


def test_tune_with_a_bad_shapes_file_fails_before_any_measurement(no_tuning, tmp_path):
    path = write(tmp_path, "shapes.json", [GOOD, {**GOOD, "M": 16.5}])
    result = invoke(["tune", "--shapes", path])
    assert assert_clean(result, "bad shapes") == "error" and result.exit_code == 2
    assert f"{path} entry 2: M must be a positive integer, got 16.5" in result.stderr


def test_explain_and_report_refuse_sizes_and_runs_that_mean_nothing():
    for args in (["explain", "matmul", "--shape", "0x16x16"], ["explain", "matmul", "--shape", "4x4x4", "--batch", "-3"],
                 ["explain", "attention", "--q-len", "0", "--kv-len", "16"],
                 ["explain", "attention", "--q-len", "1", "--kv-len", "16", "--heads", "0"],
                 ["report", "--run", "-1"]):
        result = invoke(args)
        assert assert_clean(result, args) == "error", (args, result.output)


# -- fuzz: shapes files ------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70000),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                         st.sampled_from(["f32", "bf16", "f16", "f64", "matmul", "attention", "none",
                                          "causal", "held-out", "train"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
FIELDS = ["op", "M", "N", "K", "dtype", "batch", "transpose_b", "heads", "kv_heads", "q_len", "kv_len",
          "head_dim", "mask", "softcap", "window", "split", "label"]
entry = st.dictionaries(st.sampled_from(FIELDS), st.one_of(json_scalars, json_values), max_size=10)
shapes_files = st.one_of(json_values, st.lists(st.one_of(entry, json_values), min_size=1, max_size=4),
                         st.lists(entry, min_size=1, max_size=3))


def _read(loader, text, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(text)
    try:
        return loader(path)
    except ValueError as error:  # the only way to refuse, in one line naming the file
        message = str(error)
        assert "\n" not in message and str(path) in message and len(message) < 600, message
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=shapes_files)
def test_fuzz_shapes_files_are_read_or_refused_in_one_line(tmp_path, value):
    workload = _read(wl.from_shapes_file, json.dumps(value, allow_nan=True), tmp_path)
    if workload is not None:  # what is accepted can be tuned: every shape is sane
        for shape in workload.shapes + workload.held_out:
            wl.check_shape(shape)
            shape.features()
            assert 1 <= shape.flops < 2.0**63 and shape.key


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=string.printable, max_size=40))
def test_fuzz_shapes_files_of_any_text(tmp_path, text):
    _read(wl.from_shapes_file, text, tmp_path)


# -- fuzz: config.json -------------------------------------------------------------------

CONFIG_KEYS = ["hidden_size", "d_model", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "attn_logit_softcapping", "sliding_window", "use_sliding_window", "model_type",
               "n_heads", "ffn_dim"]
config_value = st.one_of(st.integers(-5, 5000), st.sampled_from([0, 1, 64, 128, 1024, 4096, 1 << 20, 10**9]),
                         json_scalars, json_values)


@st.composite
def configs(draw):
    cfg = dict(QWEN) if draw(st.booleans()) else {}
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4)):
        cfg[key] = draw(config_value)
    kind = draw(st.sampled_from(["flat", "nested", "text_config_odd", "other"]))
    if kind == "nested":
        return {"text_config": cfg, "model_type": "outer"}
    if kind == "text_config_odd":
        return {**cfg, "text_config": draw(json_scalars)}
    if kind == "other":
        return draw(json_values)
    return cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs())
def test_fuzz_config_files_are_read_or_refused_in_one_line(tmp_path, config):
    workload = _read(wl.from_config, json.dumps(config, allow_nan=True), tmp_path)
    if workload is not None:
        for shape in workload.shapes + workload.held_out:
            wl.check_shape(shape)


# -- fuzz: the command line --------------------------------------------------------------

numbers = st.sampled_from(["1", "2", "0", "-5", "16.5", "abc", "", "1e9", "nan", "inf", "-0", "99999999999999999999"])


def _files(tmp_path):
    good = write(tmp_path, "good.json", [GOOD])
    return {"good": good, "bad": write(tmp_path, "bad.json", [{**GOOD, "M": 0}]),
            "list": write(tmp_path, "cfg.json", [1, 2]), "config": write(tmp_path, "config.json", QWEN),
            "missing": str(tmp_path / "missing.json"), "text": write(tmp_path, "t.json", "not json")}


@st.composite
def tune_args(draw):
    args = []
    options = {
        "--workload": st.sampled_from(["tiny", "qwen3-0.6b", "nope", ""]),
        "--shapes": st.sampled_from(["good", "bad", "list", "missing", "text"]),
        "--model": st.sampled_from(["config", "list", "missing", "text", "good"]),
        "--candidates": numbers, "--reps": numbers, "--time-budget": numbers, "--seed": numbers,
        "--strategy": st.sampled_from(["evolve", "random", "exhaustive", "annealing"]),
        "--chip": st.sampled_from(["auto", LOCAL.id, "apple-m3-max", "x"]),
        "--backend": st.sampled_from(["cpu", "vulkan"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True)):
        args += [name, draw(options[name])]
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(st.sampled_from(["--bogus", "extra", "--reps"])))
    return args


def _resolve(args, files):
    out, take = [], False
    for a in args:
        out.append(files.get(a, a) if take else a)
        take = a in ("--shapes", "--model")
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=tune_args())
def test_fuzz_tune_arguments_fail_in_one_line_or_reach_the_tuner(no_tuning, tmp_path, args):
    args = _resolve(args, _files(tmp_path))
    outcome = assert_clean(invoke(["tune", *args]), args)
    assert outcome in ("reached", "error"), (args, outcome)  # tune never finishes without measuring
    if outcome == "reached":  # then every number it was given means something
        for name in ("--candidates", "--reps"):
            if name in args:
                assert int(args[args.index(name) + 1]) >= 1
        if "--time-budget" in args:
            budget = float(args[args.index("--time-budget") + 1])
            assert math.isfinite(budget) and budget > 0
        assert sum(n in args for n in ("--workload", "--shapes", "--model")) <= 1


@st.composite
def score_args(draw):
    args = [draw(st.sampled_from(["program", "missing", "garbage", "good"]))]
    options = {"--workload": st.sampled_from(["tiny", "nope"]), "--shapes": st.sampled_from(["good", "bad", "text"]),
               "--split": st.sampled_from(["train", "held-out", "all", "test"]), "--reps": numbers,
               "--backend": st.sampled_from(["cpu", "vulkan"])}
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        args += [name, draw(options[name])]
    return args + ["--replay"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=score_args())
def test_fuzz_score_arguments(tmp_path, args):
    files = _files(tmp_path)
    from kernelevo.heuristics import find_source

    files["program"] = str(find_source("cpu", LOCAL, include_tuned=False).path)
    files["garbage"] = write(tmp_path, "garbage.kevo", "kevo 1\ntarget cpu\nmatmul { when }")
    args = [files.get(args[0], args[0])] + _resolve(args[1:], files)
    assert_clean(invoke(["score", *args, "--db", str(tmp_path / "score.sqlite")]), args)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=st.one_of(st.none(), numbers, st.integers(-3, 5).map(str)), runs=st.integers(0, 3),
       plot=st.sampled_from([None, "dir", "plot.png"]))
def test_fuzz_report_arguments(tmp_path, run, runs, plot):
    db_path = tmp_path / f"report-{runs}.sqlite"
    if not db_path.exists():
        with Database(db_path) as db:
            for _ in range(runs):
                db.finish_run(db.start_run(LOCAL.id, "cpu", "tiny", {}), "finished", None)
    args = ["report", "--db", str(db_path)] + (["--run", run] if run is not None else [])
    if plot is not None:
        args += ["--plot", str(tmp_path if plot == "dir" else tmp_path / plot)]
    outcome = assert_clean(invoke(args), args)
    if run is not None and run.isdigit() and int(run) > runs:
        assert outcome == "error"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["matmul", "attention", "conv2d"]),
       shape=st.sampled_from(["16x4096x4096", "1x1x1", "0x5x5", "16x4096", "ax1x1", "99999999x99999999x99999999"]),
       extra=st.lists(st.tuples(st.sampled_from(["--dtype", "--batch", "--q-len", "--kv-len", "--heads",
                                                  "--kv-heads", "--head-dim", "--mask", "--softcap",
                                                  "--window", "--backend", "--chip"]),
                                st.one_of(numbers, st.sampled_from(["f32", "bf16", "f8", "causal", "bool",
                                                                    "cpu", "metal", "apple-m3-max",
                                                                    "nvidia-h100", "apple-m9"]))),
                      max_size=4, unique_by=lambda t: t[0]),
       flags=st.lists(st.sampled_from(["--transpose-a", "--transpose-b"]), max_size=2, unique=True))
def test_fuzz_explain_arguments(op, shape, extra, flags):
    args = ["explain", op, "--shape", shape, *flags] + [x for pair in extra for x in pair]
    if op == "attention" and not any(n == "--q-len" for n, _ in extra):
        args += ["--q-len", "1", "--kv-len", "64"]
    assert_clean(invoke(args), args)
