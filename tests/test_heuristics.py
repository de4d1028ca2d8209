"""Which .kevo file is in force: tuned, then shipped, then generic (with a warning)."""

import dataclasses

import pytest

import kernelevo as ke
from kernelevo import chips, heuristics
from kernelevo.dsl import check, parse
from kernelevo.features import matmul_features
from kernelevo.paths import shipped_heuristics_dir, tuned_heuristics_path

LOCAL = chips.detect("cpu")


@pytest.mark.parametrize("path", sorted(shipped_heuristics_dir().glob("*.kevo")), ids=lambda p: p.name)
def test_shipped_files_check_clean_and_are_canonical(path):
    from kernelevo.dsl import format_program

    text = path.read_text()
    program = parse(text, str(path))
    assert check(program, text, str(path)) == []
    assert format_program(program) == text


def test_shipped_file_is_chosen_for_this_machine():
    source = heuristics.find_source("cpu", LOCAL)
    assert source.origin == "shipped" and source.path.name == "cpu.kevo"


def test_unknown_chip_gets_generic_heuristics_with_a_warning():
    odd = dataclasses.replace(LOCAL, id="cpu-sse-weird-2c", simd_width=128, vector_registers=16)
    with pytest.warns(UserWarning, match="generic"):
        active = heuristics.active("cpu", odd)
    assert active.source.origin == "generic"
    selection = active.program.select("matmul", matmul_features(64, 64, 64))
    assert selection.config.get("nr") == 16  # fits 16 narrow registers


def test_tuned_file_takes_precedence(tmp_path):
    path = tuned_heuristics_path(LOCAL.id)
    path.parent.mkdir(parents=True)
    nr = 32 if LOCAL.vector_registers >= 32 else 16  # a register tile this CPU holds
    path.write_text(f"kevo 1\ntarget cpu\nchips {LOCAL.id}\n\nmatmul {{\n"
                    f"  else {{ gemm mc=12 nc=96 kc=40 mr=4 nr={nr} threads=1 split=n engine=fma pack_a=yes epilogue=fused }}\n}}\n")
    ke.forget_selections()
    explanation = ke.explain_matmul(matmul_features(20, 30, 40))
    assert explanation.source.origin == "tuned" and explanation.source.path == path
    import mlx.core as mx

    out = ke.matmul(mx.ones((20, 40)), mx.ones((40, 30)))
    family, params = ke.ops._ext.config_of(out)
    assert (family, params["mc"], params["kc"]) == ("gemm", 12, 40)


def test_broken_tuned_file_falls_back_with_a_warning():
    path = tuned_heuristics_path(LOCAL.id)
    path.parent.mkdir(parents=True)
    path.write_text("kevo 1\ntarget cpu\nmatmul { when }\n")
    with pytest.warns(UserWarning, match="ignoring tuned heuristics"):
        active = heuristics.active("cpu", LOCAL)
    assert active.source.origin == "shipped"
