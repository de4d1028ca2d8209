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

from test_dsl_properties import _extend  # the shared expression generator

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


def test_an_integer_parameter_given_a_computed_number_is_an_error():
    # kb = K / 2 is 4095.5 for K = 8191: selection would fail with "invalid configuration"
    text = ("kevo 1\ntarget cpu\n\nmatmul {\n  when M > 1 { gemv nb=64 kb=K / 2 threads=1 epilogue=fused }\n"
            f"  else {{ {GEMV} }}\n}}\n")
    found = _errors(text)
    assert len(found) == 1 and (found[0].line, found[0].column) == (5, 30)
    assert "kb takes an integer; this is a number for some calls" in found[0].message
    assert _errors(text.replace("K / 2", "K // 2")) == []
    assert _errors(text.replace("K / 2", "256.0")) == []  # a constant: its value is checked


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


FUNCTIONS = st.sampled_from(["min", "max", "clamp", "cdiv", "pow2ceil", "pow2floor", "log2"])


exprs = st.recursive(leaves, lambda children: _extend(children, FUNCTIONS), max_leaves=8)
# Comparisons of two leaves, often joined with a well-typed test: most mistakes are here.
simple = st.one_of(
    st.tuples(st.sampled_from(["==", "!=", "<", ">="]), leaves, leaves).map(lambda t: ast.Compare(*t)),
    st.tuples(leaves, st.lists(leaves, min_size=1, max_size=3).map(tuple), st.booleans())
    .map(lambda t: ast.InSet(*t)),
)
conditions = st.one_of(simple, exprs, st.tuples(st.sampled_from(["and", "or"]), simple, simple)
                       .map(lambda t: ast.Binary(*t)))
calls = st.builds(lambda m, n, k, b, dt, ta, tb, ep: matmul_features(
    m, n, k, batch=b, dtype=dt, transpose_a=ta, transpose_b=tb, epilogue=ep),
    st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 8),
    st.sampled_from(["f32", "f16", "bf16"]), st.booleans(), st.booleans(),
    st.sampled_from(["none", "bias", "activation", "residual", "scale", "mixed"]))
TYPE_ERROR = re.compile(r"needs (numbers|true/false|integers)|cannot compare|must be true/false")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(conditions, st.one_of(simple, exprs), exprs, st.lists(calls, min_size=1, max_size=4))
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


# -- 2. scale: linear in the program's size -------------------------------------------------

CONFIG = ("gemm mc=96 nc=512 kc=256 mr=6 nr=16 threads=chip.cores split=m engine=fma "
          "pack_a=yes epilogue=fused")


def tuned_like(rules: int) -> str:
    """A program shaped like a large tuned file: one rule per measured shape."""
    out = ["# tuned for cpu-avx2 by a test", "kevo 1", "target cpu", "chips cpu-avx2-* cpu-avx512-*",
           "", "matmul {"]
    dtypes = ("f32", "f16", "bf16")
    for i in range(rules):
        m, n, k = 1 + (i * 7) % 4096, 64 * (1 + i % 97), 32 * (1 + (i // 3) % 211)
        out.append(f"  when M <= {m} and N == {n} and K >= {k} and dtype == {dtypes[i % 3]} "
                   f"{{ {CONFIG} }}")
    out += [f"  else {{ {CONFIG} }}", "}"]
    return "\n".join(out) + "\n"


def _phases(text: str) -> dict[str, float]:
    from kernelevo.dsl import format_program

    times = {}
    t = time.perf_counter()
    program = parse(text, "tuned.kevo")
    times["parse"] = time.perf_counter() - t
    t = time.perf_counter()
    assert [d for d in check(program, text, "tuned.kevo") if d.severity == "error"] == []
    times["check"] = time.perf_counter() - t
    t = time.perf_counter()
    assert format_program(program).count("when ") == text.count("when ")
    times["fmt"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = CompiledProgram(program, text, "tuned.kevo", CPU)
    # a call no rule matches: the first selection passes every rule
    selection = compiled.select("matmul", matmul_features(5000, 4096, 4096))
    times["load+first selection"] = time.perf_counter() - t
    assert selection.rule_text == "else"
    return times


def test_parse_check_format_and_first_selection_grow_linearly():
    small, big = 500, 4000  # 8x the rules
    small_text, big_text = tuned_like(small), tuned_like(big)
    t_small = {}
    for _ in range(3):  # the fastest of three: a loaded machine only ever adds time
        for phase, seconds in _phases(small_text).items():
            t_small[phase] = min(t_small.get(phase, seconds), seconds)
    t_big = _phases(big_text)
    for phase, seconds in t_big.items():
        # linear is 8x; quadratic 64x. Allow 3x the size ratio for noise and caches.
        bound = 3 * (big / small) * max(t_small[phase], 0.02)
        assert seconds < bound, (phase, seconds, t_small[phase], t_big, t_small)


def test_the_duplicate_condition_check_does_not_compare_rule_pairs():
    """Counts equality tests between conditions: a pass over earlier rules made n²/2."""
    text = tuned_like(300)
    program = parse(text)
    calls = 0
    original = ast.Binary.__eq__

    def counting(self, other):
        nonlocal calls
        calls += 1
        return original(self, other)

    ast.Binary.__eq__ = counting
    try:
        check(program, text, "tuned.kevo")
    finally:
        ast.Binary.__eq__ = original
    assert calls < 5 * 300, calls  # was 300 * 299 / 2 = 44850


# -- the fast parser agrees with Lark's, positions included -----------------------------------

def _fields(node, out, where="program"):
    import dataclasses

    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _fields(getattr(node, f.name), out, f"{where}.{f.name}")
    elif isinstance(node, tuple):
        for i, child in enumerate(node):
            _fields(child, out, f"{where}[{i}]")
    else:
        out.append((where, node))
    return out


def _agree(text: str) -> bool:
    """True when the fast parser takes the text and builds exactly Lark's AST; False when
    it leaves the text to Lark."""
    from kernelevo.dsl import fastparse, parser

    try:
        fast = fastparse.parse_program(text)
    except fastparse.Fallback:
        return False
    lark = parser._build(parser._parse_tree(text, "t", "start"), text, "t")
    assert _fields(fast, []) == _fields(lark, []), text
    return True


EDGE_CASES = [
    "kevo 1\n",
    "kevo 0x1\ntarget metal  # c\nchips apple-m3* apple-m[34]-pro # c\n\n  # c\nmatmul { else { g } }",
    "kevo 1 target cpu chips a b matmul { when (M) == ((N)) { g a=(1) } else { g } }",
    "kevo 1\nmatmul {\n  let x = -(-M)\n  when not not (x > 1 if yes else no) and M not in {1, (2)} {\n"
    "    g a = min((M), chip.cores) b=f() c=1.5e3\n  }\n  else { g }\n}\n",
    "kevo 1\nattention { when mask == causal or q_len // 2 << 1 >= kv_len % 3 { d } else { d } }",
    "kevo 1\nmatmul-x { else { g } }",        # not a section name: Lark decides
    "kevo 1\nmatmul { when if > 1 { g } else { g } }",  # a keyword as a name: Lark decides
    "kevo 1\nmatmul { when 1 < 2 < 3 { g } else { g } }",  # a syntax error: Lark reports it
    "kevo 1\nmatmul { when " + "-" * 300 + "M > 1 { g } else { g } }",  # deep: Lark decides
    "kevo 1\nmatmul { when " + " + ".join(["M"] * 150) + " > 1 { g } else { g } }",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_the_fast_parser_agrees_with_lark_on_edge_cases(text):
    from kernelevo.dsl import parser

    _agree(text)
    try:
        expected = parser._build(parser._parse_tree(text, "t", "start"), text, "t")
    except DSLError as error:
        with pytest.raises(DSLError) as raised:
            parse(text, "t")
        assert str(raised.value) == str(error)  # the same message, from Lark
    else:
        assert _fields(parse(text, "t"), []) == _fields(parser._attach_comments(
            expected, parser._comments(text), text), [])


def test_the_fast_parser_takes_every_shipped_file_and_a_tuned_one():
    from kernelevo.paths import shipped_heuristics_dir

    for path in sorted(shipped_heuristics_dir().glob("*.kevo")):
        assert _agree(path.read_text()), path
    assert _agree(tuned_like(50))


from test_dsl_properties import damaged, programs  # noqa: E402 — the existing generators


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs, damaged())
def test_the_fast_parser_agrees_with_lark_on_random_and_damaged_programs(program, broken):
    from kernelevo.dsl import format_program

    _agree(format_program(program))
    _agree(broken)
