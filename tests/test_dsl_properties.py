"""Property tests of the .kevo language: random programs survive format -> parse, and
random damage to valid files only ever raises DSLError — never another exception or a hang."""

import keyword

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelevo import chips
from kernelevo.dsl import DSLError, ast, check, format_program, parse
from kernelevo.dsl.select import CompiledProgram
from kernelevo.features import attention_features, matmul_features
from kernelevo.paths import shipped_heuristics_dir

RESERVED = {"when", "else", "let", "kevo", "target", "chips", "if", "and", "or", "not", "in",
            "yes", "no", "true", "false", "matmul", "attention"}

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in RESERVED and not keyword.iskeyword(n))
numbers = st.one_of(st.integers(min_value=0, max_value=10**12),
                    st.floats(min_value=0, max_value=1e30, allow_nan=False, allow_infinity=False))

leaves = st.one_of(
    numbers.map(ast.Num),
    st.booleans().map(ast.Bool),
    names.map(ast.Name),
    names.map(lambda n: ast.Attr("chip", n)),
)


def _extend(children, functions=None):
    """Expression nodes over `children`; calls name `functions` (default: any name) with 1-3
    arguments (0-3 for any name)."""
    call = (st.tuples(names, st.lists(children, max_size=3).map(tuple)) if functions is None else
            st.tuples(functions, st.lists(children, min_size=1, max_size=3).map(tuple)))
    return st.one_of(
        st.tuples(st.sampled_from(["-", "not"]), children).map(lambda t: ast.Unary(*t)),
        st.tuples(st.sampled_from(["+", "-", "*", "/", "//", "%", "<<", ">>", "and", "or"]),
                  children, children).map(lambda t: ast.Binary(*t)),
        st.tuples(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), children, children)
        .map(lambda t: ast.Compare(*t)),
        st.tuples(children, st.lists(children, min_size=1, max_size=3).map(tuple), st.booleans())
        .map(lambda t: ast.InSet(*t)),
        call.map(lambda t: ast.Call(*t)),
        st.tuples(children, children, children).map(lambda t: ast.Cond(*t)),
    )


exprs = st.recursive(leaves, _extend, max_leaves=12)
comments = st.lists(st.from_regex(r"# [ -~]{0,20}", fullmatch=True).map(str.rstrip), max_size=2)


@st.composite
def comment_block(draw):
    return ast.Comments(tuple(draw(comments)),
                        draw(st.one_of(st.none(), st.from_regex(r"# [a-z ]{0,10}", fullmatch=True)
                                       .map(str.rstrip))))


configs = st.builds(lambda family, params: ast.ConfigSpec(family, tuple(ast.Param(n, v) for n, v in params)),
                    names, st.lists(st.tuples(names, exprs), max_size=4))
lets = st.builds(ast.Let, names, exprs, comment_block())
rules = st.builds(ast.Rule, st.one_of(st.none(), exprs), configs, comment_block())
sections = st.builds(
    lambda op, items, c, trailing: ast.Section(op, tuple(items), c, tuple(trailing)),
    st.sampled_from(["matmul", "attention"]), st.lists(st.one_of(lets, rules), max_size=5),
    comment_block(), comments)
chip_patterns = st.from_regex(r"[a-z][a-z0-9*?-]{0,12}", fullmatch=True).filter(
    lambda c: c not in RESERVED)
programs = st.builds(
    lambda v, target, chips_, secs, c, trailing: ast.Program(v, target, tuple(chips_), tuple(secs),
                                                              ast.Comments(tuple(c.before)), tuple(trailing)),
    st.integers(min_value=0, max_value=99), st.one_of(st.none(), names),
    st.lists(chip_patterns, max_size=3), st.lists(sections, max_size=2), comment_block(), comments)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_format_then_parse_is_the_identity(program):
    text = format_program(program)
    reparsed = parse(text)
    assert reparsed == program
    assert format_program(reparsed) == text  # idempotent


# -- damage -------------------------------------------------------------------------------

SOURCES = [p.read_text() for p in sorted(shipped_heuristics_dir().glob("*.kevo"))]
CPU = chips.detect("cpu")
METAL = chips.apple_from_device_info("applegpu_g15s", "Apple M3 Pro")
CUDA = chips.nvidia_from_device_info("NVIDIA H200", "sm_90")
CALLS = {"matmul": [matmul_features(1, 4096, 4096, dtype="bf16", transpose_b=True),
                    matmul_features(37, 129, 8191), matmul_features(2048, 2048, 2048, dtype="f16")],
         "attention": [attention_features(batch=1, heads=32, kv_heads=8, q_len=1, kv_len=8192,
                                          head_dim=128),
                       attention_features(batch=2, heads=16, kv_heads=16, q_len=999, kv_len=999,
                                          head_dim=64, mask="causal")]}


def exercise(text: str) -> None:
    """Everything a user's file goes through: parse, check, compile, select, format."""
    try:
        program = parse(text, "damaged.kevo")
        check(program, text, "damaged.kevo")
        format_program(program)
        chip = {"cpu": CPU, "metal": METAL, "cuda": CUDA}.get(program.target)
        if chip is None:
            return
        compiled = CompiledProgram(program, text, "damaged.kevo", chip)
        for section in program.sections:
            for features in CALLS[section.op]:
                compiled.select(section.op, features)
    except DSLError:
        pass


printable = st.characters(min_codepoint=9, max_codepoint=0x2FF)


@st.composite
def damaged(draw):
    text = draw(st.sampled_from(SOURCES))
    kind = draw(st.sampled_from(["flip", "truncate", "swap", "delete", "duplicate", "insert"]))
    if not text:
        return text
    i = draw(st.integers(0, len(text) - 1))
    if kind == "flip":
        return text[:i] + draw(printable) + text[i + 1:]
    if kind == "truncate":
        return text[:i]
    if kind == "delete":
        j = draw(st.integers(i, min(len(text), i + 40)))
        return text[:i] + text[j:]
    if kind == "duplicate":
        j = draw(st.integers(i, min(len(text), i + 40)))
        return text[:j] + text[i:j] + text[j:]
    if kind == "insert":
        return text[:i] + draw(st.sampled_from(["(", ")", "{", "}", "=", " if ", " else ", "not ",
                                                 "1 << 62 * ", "-", "//0", "when", "\n", "#",
                                                 "((((((((((", "chip.", "yes", "1e309"])) + text[i:]
    tokens = text.split(" ")
    a = draw(st.integers(0, len(tokens) - 1))
    b = draw(st.integers(0, len(tokens) - 1))
    tokens[a], tokens[b] = tokens[b], tokens[a]
    return " ".join(tokens)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_files_only_raise_dsl_errors(text):
    exercise(text)


@settings(max_examples=150, deadline=2000)
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_dsl_errors(text):
    exercise(text)


def _with_condition(condition: str) -> str:
    return ("kevo 1\ntarget cpu\nmatmul {\n  when " + condition + " > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n"
            "  else { gemv nb=16 threads=1 kb=256 epilogue=fused }\n}\n")


def test_deep_nesting_is_an_error_not_a_crash():
    import pytest

    with pytest.raises(DSLError, match="nested too deeply"):
        parse(_with_condition("-" * 5000 + "M"))
    with pytest.raises(DSLError, match="nested too deeply"):
        parse(_with_condition("min(" * 3000 + "M" + ", 1)" * 3000))
    # parentheses alone add no depth
    assert parse(_with_condition("(" * 5000 + "M" + ")" * 5000)).sections[0].rules[0].condition.left == ast.Name("M")


def test_every_shipped_file_survives_its_own_formatting():
    for text in SOURCES:
        assert format_program(parse(text)) == text
