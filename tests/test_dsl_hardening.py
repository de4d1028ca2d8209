"""Hardening of the .kevo tools: a checked program never fails with a type error when it
runs; parse/check/format/selection scale linearly with the program; the CLI answers a bad
or missing file with one line, not a traceback."""

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelevo import chips
from kernelevo.dsl import DSLError, ast, check, format_expr, parse
from kernelevo.dsl.select import CompiledProgram
from kernelevo.features import attention_features, matmul_features

CPU = chips.detect("cpu")
GEMV = "gemv nb=64 kb=256 threads=1 epilogue=fused"


def _program(condition: str, lets: tuple[str, ...] = (), op: str = "matmul") -> str:
    config = GEMV if op == "matmul" else "decode bk=64 threads=1 pack_gqa=yes"
    body = "".join(f"  let {let}\n" for let in lets)
    return (f"kevo 1\ntarget cpu\n\n{op} {{\n{body}  when {condition} {{ {config} }}\n"
            f"  else {{ {config} }}\n}}\n")


def _errors(text: str):
    return [d for d in check(parse(text), text, "t.kevo") if d.severity == "error"]


# -- 1. static types -----------------------------------------------------------------------

@pytest.mark.parametrize("condition, column, words", [
    ("dtype == 16", 8, "dtype is a symbol (f32, f16, bf16); 16 is an integer"),
    ("dtype in {bf16, 3}", 24, "dtype is a symbol (f32, f16, bf16); 3 is an integer"),
    ("16 != dtype", 8, "16 is an integer; dtype is a symbol (f32, f16, bf16)"),
    ("dtype == transpose_b", 8, "transpose_b is true/false"),
    ("epilogue not in {none, 2.5}", 31, "2.5 is a number"),
    ("cdiv(M, 2.5) > 1", 16, "cdiv needs integers; 2.5 is a number"),
])
def test_mistyped_comparisons_are_errors_with_line_and_column(condition, column, words):
    found = _errors(_program(condition))
    assert len(found) == 1, [d.render() for d in found]
    assert (found[0].line, found[0].column) == (5, column) and words in found[0].message


def test_mistyped_let_compared_later_is_an_error():
    found = _errors(_program("d == 16", ("d = dtype",)))
    assert len(found) == 1 and "d is a symbol (f32, f16, bf16); 16 is an integer" in found[0].message


def test_a_symbol_let_against_a_boolean_feature_is_an_error_not_a_runtime_failure():
    # `d == causal` with d a let reads the boolean feature causal (only a symbol feature
    # itself turns the name into its symbol), which fails on every call: the checker says so.
    found = _errors(_program("d == causal", ("d = mask",), op="attention"))
    assert len(found) == 1 and "cannot compare a symbol with true/false" in found[0].message
    assert _errors(_program("mask == causal and causal", op="attention")) == []


def test_the_selection_error_of_a_mistyped_comparison_is_caught_before_running():
    text = _program("dtype == 16")
    with pytest.raises(DSLError, match="dtype is a symbol"):
        CompiledProgram(parse(text), text, "t.kevo", CPU)


# Random expressions over matmul's features, of every type, mostly well typed.
SYMBOLS = ["f32", "f16", "bf16", "none", "bias", "residual", "causal", "x"]
leaves = st.one_of(
    st.sampled_from(["M", "N", "K", "batch", "dtype", "transpose_a", "transpose_b", "epilogue",
                     "chip.cores", "chip.simd_width", "chip.memory_gb", "chip.amx", "lt", "lf"])
    .map(lambda n: ast.Attr("chip", n[5:]) if n.startswith("chip.") else ast.Name(n)),
    st.sampled_from(SYMBOLS).map(ast.Name),
    st.one_of(st.integers(0, 70), st.sampled_from([0.5, 2.0, 1e3])).map(ast.Num),
    st.booleans().map(ast.Bool),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(["-", "not"]), children).map(lambda t: ast.Unary(*t)),
        st.tuples(st.sampled_from(["+", "-", "*", "/", "//", "%", "<<", ">>", "and", "or"]),
                  children, children).map(lambda t: ast.Binary(*t)),
        st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), children, children)
        .map(lambda t: ast.Compare(*t)),
        st.tuples(children, st.lists(children, min_size=1, max_size=3).map(tuple), st.booleans())
        .map(lambda t: ast.InSet(*t)),
        st.tuples(st.sampled_from(["min", "max", "clamp", "cdiv", "pow2ceil", "pow2floor", "log2"]),
                  st.lists(children, min_size=1, max_size=3).map(tuple)).map(lambda t: ast.Call(*t)),
        st.tuples(children, children, children).map(lambda t: ast.Cond(*t)),
    )


exprs = st.recursive(leaves, _extend, max_leaves=8)
calls = st.builds(lambda m, n, k, b, dt, ta, tb, ep: matmul_features(
    m, n, k, batch=b, dtype=dt, transpose_a=ta, transpose_b=tb, epilogue=ep),
    st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 8),
    st.sampled_from(["f32", "f16", "bf16"]), st.booleans(), st.booleans(),
    st.sampled_from(["none", "bias", "activation", "residual", "scale", "mixed"]))
TYPE_ERROR = re.compile(r"needs (numbers|true/false|integers)|cannot compare|must be true/false")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(exprs, exprs, exprs, st.lists(calls, min_size=1, max_size=4))
def test_a_checked_program_never_fails_with_a_type_error(condition, let_t, let_f, features):
    text = _program(format_expr(condition), (f"lt = {format_expr(let_t)}", f"lf = {format_expr(let_f)}"))
    program = parse(text)
    if _errors(text):
        return
    compiled = CompiledProgram(program, text, "t.kevo", CPU)
    for call in features:
        try:
            compiled.select("matmul", call)
        except DSLError as error:  # value errors (division by zero, log2 of 0) may remain
            assert not TYPE_ERROR.search(str(error)), (text, call, str(error))


def test_the_property_generator_reaches_accepted_programs():
    """Guards the property above against testing nothing: well-typed programs of each kind."""
    for condition in ["lt > 1 and lf", "dtype in {f16, bf16} or epilogue != none",
                      "cdiv(M, 16) * min(N, 2) >= 3 if transpose_b else K > 0.5"]:
        text = _program(condition, ("lt = M // 2", "lf = not transpose_a"))
        assert _errors(text) == [], condition
        CompiledProgram(parse(text), text, "t.kevo", CPU).select("matmul", matmul_features(5, 6, 7))


# -- 3. the CLI on files it cannot read -------------------------------------------------------

def _cli(*args, cwd=None):
    import subprocess
    import sys

    from pathlib import Path

    script = Path(sys.executable).parent / "kernelevo"  # the installed console script
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def _one_clear_line(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_a_file_that_is_not_utf8_is_one_line_not_a_traceback(tmp_path, command):
    bad = tmp_path / "latin1.kevo"
    bad.write_bytes("kevo 1\n# café\n".encode("latin-1"))
    _one_clear_line(_cli(command, str(bad)), str(bad), "not UTF-8", "0xe9")


def test_fmt_of_a_missing_file_is_one_line(tmp_path):
    _one_clear_line(_cli("fmt", str(tmp_path / "nope.kevo")), "nope.kevo", "no such file")


def test_check_of_a_missing_file_names_the_shipped_file_for_this_chip(tmp_path):
    from kernelevo.heuristics import find_source

    backend = chips.default_backend()
    shipped = find_source(backend, chips.detect(backend), include_tuned=False).path
    line = _one_clear_line(_cli("check", str(tmp_path / "my.kevo")), "my.kevo", "no such file",
                           str(shipped))
    assert "cp " in line
