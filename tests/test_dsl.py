"""The .kevo language: parsing, precise errors, the checker's diagnostics, formatting,
and selection."""

import pytest

from kernelevo.chips import Chip
from kernelevo.dsl import DSLError, check, format_program, parse, parse_config
from kernelevo.dsl.select import CompiledProgram
from kernelevo.features import matmul_features

AVX512 = Chip(id="cpu-avx512-test-2c", backend="cpu", name="test CPU", vendor="test", cores=2,
              simd_width=512, vector_registers=32)

GOOD = """\
# header comment
kevo 1
target cpu
chips cpu-avx512-*

matmul {  # opening
  let big = M * N >= 1 << 20
  # decode
  when M <= 8 and dtype in {f16, bf16} { gemv nb=64 kb=256 threads=chip.cores epilogue=fused }  # trailing
  when big { gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 if M > 512 else 1 split=n engine=fma pack_a=yes epilogue=fused }
  else { gemm mc=48 nc=512 kc=2 * 128 mr=6 nr=32 threads=chip.cores split=m engine=fma pack_a=yes epilogue=fused }
  # closing
}
"""


def diagnostics(text, chip=AVX512):
    try:
        program = parse(text, "t.kevo")
    except DSLError as err:
        return err.diagnostics
    return check(program, text, "t.kevo", chip)


def only(text, chip=AVX512):
    found = diagnostics(text, chip)
    assert len(found) == 1, [d.render() for d in found]
    return found[0]


def program(body, header="kevo 1\ntarget cpu\n"):
    return header + "matmul {\n" + body + "\n}\n"


ELSE = "  else { gemm mc=48 nc=512 kc=256 mr=6 nr=32 threads=1 split=m engine=fma pack_a=yes epilogue=fused }"


def test_good_program_checks_clean_and_round_trips():
    p = parse(GOOD, "t.kevo")
    assert check(p, GOOD, "t.kevo", AVX512) == []
    text = format_program(p)
    assert parse(text) == p
    assert format_program(parse(text)) == text
    assert "# trailing" in text and "# closing" in text and "# opening" in text


def test_selection_follows_rule_order():
    compiled = CompiledProgram(parse(GOOD), GOOD, "t.kevo", AVX512)
    s = compiled.select("matmul", matmul_features(4, 4096, 4096, dtype="bf16"))
    assert (s.rule_number, s.config.to_dsl()) == (1, "gemv nb=64 kb=256 threads=2 epilogue=fused")
    s = compiled.select("matmul", matmul_features(256, 4096, 4096, dtype="f32"))
    assert s.rule_number == 2 and s.config.get("threads") == 1  # M > 512 is false
    s = compiled.select("matmul", matmul_features(1024, 4096, 4096))
    assert s.config.get("threads") == 2
    s = compiled.select("matmul", matmul_features(16, 16, 16))
    assert s.rule_text == "else" and s.config.get("kc") == 256


def test_syntax_error_names_line_column_and_expectation():
    d = only("kevo 1\ntarget cpu\nmatmul {\n  when M > { gemm }\n}\n")
    assert (d.line, d.column) == (4, 12)
    assert "unexpected '{'" in d.message and "expected an expression" in d.message
    assert d.render().splitlines()[2].index("^") == 4 + 11


def test_unexpected_character():
    d = only("kevo 1\ntarget cpu\nmatmul { when M $ 3 { gemm } }\n")
    assert (d.line, d.column) == (3, 17) and "unexpected character '$'" in d.message


def test_chained_comparison_hint():
    d = only("kevo 1\ntarget cpu\nmatmul {\n  when 1 < M < 9 { gemm }\n}\n")
    assert d.line == 4 and "cannot be chained" in d.message


def test_missing_equals_hint():
    d = only("kevo 1\ntarget cpu\nmatmul {\n  else { gemm mc 96 }\n}\n")
    assert d.line == 4 and "name=value" in d.message


def test_end_of_file():
    d = only("kevo 1\ntarget cpu\nmatmul {\n  else { gemm mc=1")
    assert d.line == 4 and "end of file" in d.message


def test_missing_else():
    d = only(program("  when M > 1 { gemm mc=48 nc=512 kc=256 mr=6 nr=32 threads=1 split=m engine=fma pack_a=yes epilogue=fused }"))
    assert "needs a final `else" in d.message and d.line == 5  # at the closing brace


def test_rule_after_else_is_unreachable():
    d = only(program(ELSE + "\n  when M > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }"))
    assert d.line == 5 and "never reached" in d.message and "else rule at line 4" in d.message


def test_unknown_target_and_version():
    found = diagnostics("kevo 2\ntarget gpu\nmatmul {\n" + ELSE + "\n}\n")
    messages = [d.message for d in found]
    assert any("version 2" in m for m in messages)
    assert any("unknown target 'gpu'" in m for m in messages)


def test_unknown_name_with_suggestion():
    d = only(program("  when Mm > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 8) and "unknown name 'Mm'" in d.message and "'M'" in d.message


def test_unknown_symbol_value():
    d = only(program("  when dtype == f64 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 17) and "'f64' is not a value of dtype" in d.message


def test_type_errors():
    d = only(program("  when M + 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert "must be true/false" in d.message and d.column == 8
    d = only(program("  when M and K > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert "'and' needs true/false" in d.message
    d = only(program("  when transpose_b > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert "'>' needs numbers" in d.message


def test_unknown_family_and_parameter():
    found = diagnostics(program("  when M > 1 { gemmm mc=1 }\n  else { gemm mc=48 nc=512 kc=256 mr=6 "
                                "nr=32 threads=1 split=m engine=fma pack_a=yes epilogue=fused bk=16 }"))
    assert len(found) == 2
    assert "unknown matmul family 'gemmm'" in found[0].message and "'gemm'" in found[0].message
    assert (found[1].line, "no parameter 'bk'") == (5, "no parameter 'bk'") and "no parameter 'bk'" in found[1].message


def test_value_outside_domain_and_missing_parameter():
    found = diagnostics(program("  when M > 1 { gemm mc=48 nc=512 kc=256 mr=7 nr=32 threads=1 split=x }\n"
                                "  else { gemm mc=48 }"))
    messages = [d.message for d in found]
    assert any("mr=7 is not one of 1, 2, 3" in m for m in messages)
    assert any("'x' is not a value of split" in m for m in messages)
    assert any("gemm needs nc=..., kc=..." in m for m in messages)


def test_constraint_violations_use_the_chip():
    text = program("  else { gemm mc=50 nc=512 kc=256 mr=16 nr=64 threads=4 split=m engine=fma pack_a=yes epilogue=fused }")
    messages = [d.message for d in diagnostics(text)]
    assert any("mc % mr == 0" in m for m in messages)
    assert any("vector registers" in m for m in messages)  # 16x64 needs 69 registers
    assert any("threads <= chip.cores" in m for m in messages)


def test_unreachable_and_never_matching_rules():
    found = diagnostics(program("  when M > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n"
                                "  when M > 1 { gemv nb=32 kb=256 threads=1 epilogue=fused }\n"
                                "  when 1 > 2 { gemv nb=32 kb=256 threads=1 epilogue=fused }\n"
                                "  when yes { gemv nb=16 kb=256 threads=1 epilogue=fused }\n"
                                "  when K > 1 { gemv nb=16 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    messages = {d.line: d.message for d in found}
    assert "same condition" in messages[5]
    assert "always false" in messages[6]
    assert "always matches" in messages[8] and "always matches" in messages[9]


def test_several_diagnostics_at_once_in_order():
    found = diagnostics(program("  when Q > 1 { gemn }\n  when dtype == f8 { gemv nb=3 kb=256 threads=1 epilogue=fused }"))
    assert len(found) >= 4
    assert [(d.line, d.column) for d in found] == sorted((d.line, d.column) for d in found)


def test_let_rules():
    found = diagnostics(program("  let M = 3\n  let x = 1\n  let x = 2\n" + ELSE + "\n  let y = 3"))
    messages = [d.message for d in found]
    assert any("would hide the feature" in m for m in messages)
    assert any("bound twice" in m for m in messages)
    assert any("come before the rules" in m for m in messages)


def test_selection_errors_point_at_the_rule():
    text = program("  when M < 100 { gemm mc=M nc=512 kc=256 mr=6 nr=32 threads=1 split=m engine=fma pack_a=yes epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    assert compiled.select("matmul", matmul_features(12, 8, 8)).config.get("mc") == 12
    with pytest.raises(DSLError) as info:
        compiled.select("matmul", matmul_features(13, 8, 8))
    d = info.value.first
    assert d.line == 4 and "mc % mr == 0" in d.message
    text = program("  when M < 100 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    text2 = program("  when M < 1000 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE)
    compiled2 = CompiledProgram(parse(text2), text2, "t.kevo", AVX512)
    with pytest.raises(DSLError, match="M <= 64"):
        compiled2.select("matmul", matmul_features(100, 8, 8))


def test_evaluation_errors_are_dsl_errors():
    text = program("  when M // (K - K) > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    with pytest.raises(DSLError, match="division by zero"):
        compiled.select("matmul", matmul_features(12, 8, 8))
    text = program("  when (1 << 61) * M > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    with pytest.raises(DSLError, match="out of range"):
        compiled.select("matmul", matmul_features(12, 8, 8))


def test_functions():
    text = program("  when pow2ceil(M) == 16 and pow2floor(N) == 8 and log2(K) == 3 and cdiv(K, 3) == 3 "
                   "and clamp(M, 1, 4) == 4 and min(M, N, K) == 9 and max(M, 2) == 12 "
                   "{ gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    assert compiled.select("matmul", matmul_features(12, 9, 9)).rule_number == 1
    assert compiled.select("matmul", matmul_features(17, 9, 9)).rule_number == 2
    d = only(program("  when powceil(M) > 1 { gemv nb=64 kb=256 threads=1 epilogue=fused }\n" + ELSE))
    assert "unknown function 'powceil'" in d.message and "pow2ceil" in d.message


def test_parse_config():
    assert parse_config("gemm mc=96 nc=2*512 split=m flag=yes") == \
        ("gemm", {"mc": 96, "nc": 1024, "split": "m", "flag": True})
    with pytest.raises(DSLError, match="given twice"):
        parse_config("gemm mc=1 mc=2")


# -- every remaining diagnostic kind, with its position ------------------------------------

def test_duplicate_section():
    found = diagnostics(program(ELSE) + "matmul {\n" + ELSE + "\n}\n")
    assert [(d.line, d.column) for d in found] == [(6, 1)] and "second 'matmul' section" in found[0].message


def test_missing_target():
    d = only("kevo 1\nmatmul {\n" + ELSE + "\n}\n")
    assert (d.line, d.column) == (1, 1) and "missing `target" in d.message


def test_parameter_given_twice():
    d = only(program("  else { gemv nb=16 nb=32 kb=256 threads=1 epilogue=fused }"))
    assert (d.line, d.column) == (4, 21) and "'nb' is given twice" in d.message


def test_parameter_types():
    d = only(program("  when M > 1 { gemv nb=yes threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 24) and "nb takes an integer; this is true/false" in d.message
    d = only(program("  when M > 1 { gemv nb=16 threads=dtype kb=256 epilogue=fused }\n" + ELSE))
    assert "threads takes an integer; this is a symbol" in d.message
    d = only(program("  else { gemm mc=48 nc=512 kc=256 mr=6 nr=32 threads=1 split=3 engine=fma pack_a=yes epilogue=fused }"))
    assert (d.line, d.column) == (4, 62) and "split takes one of m, n; this is an integer" in d.message


def test_unknown_chip_fact_and_object():
    d = only(program("  when chip.corez > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 8) and "unknown chip fact 'corez'" in d.message and "'cores'" in d.message
    d = only(program("  when host.cores > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert "unknown object 'host'" in d.message


def test_function_arity():
    d = only(program("  when clamp(M, 1) > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 8) and "clamp takes 3 arguments, got 2" in d.message


def test_shift_needs_integers_and_if_branches_agree():
    d = only(program("  when M << 1.5 > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert "'<<' needs integers" in d.message
    d = only(program("  when (1 if M > 2 else yes) { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert "both branches of 'if' must have one type" in d.message


def test_cannot_compare_different_kinds():
    d = only(program("  when transpose_b == 3 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    assert (d.line, d.column) == (4, 8) and "cannot compare true/false with an integer" in d.message


def test_structural_hints():
    d = only("kevo 1\ntarget cpu\nwhen M > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n")
    assert d.line == 3 and "inside a section" in d.message
    d = only("target cpu\nmatmul {\n" + ELSE + "\n}\n")
    assert d.line == 1 and "kevo 1" in d.message
    d = only("kevo 1\ntarget cpu\nmatmul {\n  when M > 1 gemv nb=16 threads=1 kb=256 epilogue=fused }\n}\n")
    assert d.line == 4 and "when <condition> {" in d.message


def test_shift_out_of_range_at_selection():
    text = program("  when M << K > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE)
    compiled = CompiledProgram(parse(text), text, "t.kevo", AVX512)
    with pytest.raises(DSLError, match="shift by 70 is out of range") as info:
        compiled.select("matmul", matmul_features(1, 8, 70))
    assert info.value.first.line == 4


def test_rendered_diagnostic_format():
    d = only(program("  when Mm > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }\n" + ELSE))
    lines = d.render().splitlines()
    assert lines[0].startswith("t.kevo:4:8: error: unknown name 'Mm'")
    assert lines[1] == "      when Mm > 1 { gemv nb=16 threads=1 kb=256 epilogue=fused }"
    assert lines[2] == "    " + " " * 7 + "^^"


def test_reference_docs_are_generated_from_the_schema():
    from pathlib import Path

    from kernelevo.dsl.reference import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "dsl.md"
    text = doc.read_text()
    assert render(text) == text, "docs/dsl.md is stale: python -m kernelevo.dsl.reference docs/dsl.md"


def test_documented_examples_are_valid():
    """The complete programs in docs/dsl.md and README.md check clean; each fragment in the
    worked examples checks clean inside a section of its own."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for doc in (root / "docs" / "dsl.md", root / "README.md"):
        blocks = re.findall(r"```\n(.*?)```", doc.read_text(), flags=re.S)
        for block in blocks:
            if block.startswith("# ") or block.startswith("kevo"):
                assert check(parse(block), block, str(doc)) == [], block
    fragments = [b for b in re.findall(r"```\n(.*?)```", (root / "docs" / "dsl.md").read_text(), flags=re.S)
                 if b.lstrip().startswith("when")]
    chip = Chip(id="apple-m3-max", backend="metal", name="M3 Max", vendor="apple", cores=40,
                simd_width=32, threadgroup_memory=32768, max_threads=1024, generation=3)
    for fragment in fragments:
        op = "attention" if "decode" in fragment or "flash" in fragment else "matmul"
        backend = "cpu" if "gemm mc=" in fragment else "metal"
        else_rule = ("  else { gemv nb=16 threads=1 kb=256 epilogue=fused }" if backend == "cpu" else
                     "  else { mlx }")
        chips_line = "chips cpu-avx512-*\n" if backend == "cpu" else ""
        text = f"kevo 1\ntarget {backend}\n{chips_line}\n{op} {{\n{fragment}{else_rule}\n}}\n"
        found = check(parse(text), text, "fragment", None if backend == "cpu" else chip)
        assert found == [], [d.render() for d in found]


def test_a_symbol_compared_with_a_symbol_feature_is_the_symbol_not_a_feature_of_that_name():
    """`mask == causal`: the checker reads `causal` as the mask kind, and so must selection
    (a boolean feature is also called causal)."""
    from kernelevo.dsl.select import CompiledProgram
    from kernelevo.features import attention_features

    text = ("kevo 1\ntarget cpu\n\nattention {\n"
            "  when mask == causal and causal { decode bk=64 threads=1 pack_gqa=yes }\n"
            "  when mask in {bool, causal} { decode bk=32 threads=1 pack_gqa=yes }\n"
            "  else { decode bk=16 threads=1 pack_gqa=yes }\n}\n")
    from kernelevo import chips

    program = CompiledProgram(parse(text), text, "t.kevo", chips.detect("cpu"))
    pick = lambda mask: program.select("attention", attention_features(  # noqa: E731
        batch=1, heads=8, kv_heads=8, q_len=1, kv_len=64, head_dim=64, mask=mask)).config.get("bk")
    assert (pick("causal"), pick("bool"), pick("none")) == (64, 32, 16)
