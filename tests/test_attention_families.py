"""families/cpu_attention.py is the one definition of the attention families: the
extension takes exactly their parameters, every configuration the tuner may try is
correct, and the DSL enforces their constraints."""

import random

import pytest

import kernelevo as ke
from kernelevo import DSLError, KernelConfig, chips
from kernelevo.dsl import parse
from kernelevo.dsl.select import CompiledProgram
from kernelevo.families import families_for
from kernelevo.families.cpu_attention import CPU_ATTENTION_FAMILIES, DECODE_MAX_QUERIES
from kernelevo.features import attention_features

from helpers import TOL, relative_error
from test_attention import inputs, reference

EXT = ke.ops._ext
CHIP = chips.detect("cpu")


def call(heads, kv_heads, q_len, kv_len, head_dim, batch=1, **more):
    return attention_features(batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len,
                              kv_len=kv_len, head_dim=head_dim, **more)


DECODE_CALL = call(8, 2, 1, 300, 64, dtype="bf16")


def test_the_cpu_backend_has_the_three_families():
    assert [f.name for f in families_for("attention", "cpu")] == ["flash", "decode", "decode_split"]


@pytest.mark.parametrize("family", CPU_ATTENTION_FAMILIES, ids=lambda f: f.name)
def test_extension_takes_exactly_the_schema_parameters(family):
    space = list(family.search_space(CHIP, DECODE_CALL))
    assert space, "the search space must not be empty on this machine"
    for params in random.Random(0).sample(space, min(20, len(space))):
        config = KernelConfig.make(family.op, family.backend, family.name, params)
        EXT.validate_attention_config(config.family, config.ext_params())  # reads every one
        for missing in family.param_names:
            partial = {k: v for k, v in config.ext_params().items() if k != missing}
            with pytest.raises(ValueError, match=f"needs parameter '{missing}'"):
                EXT.validate_attention_config(config.family, partial)
        with pytest.raises(ValueError, match="does not take parameter 'unread'"):
            EXT.validate_attention_config(config.family, {**config.ext_params(), "unread": 1})


@pytest.mark.parametrize("family", CPU_ATTENTION_FAMILIES, ids=lambda f: f.name)
def test_sampled_search_space_is_correct(rng, family):
    """Random configurations the tuner may try, on odd sizes, with a causal mask."""
    Lq = 3 if family.name != "flash" else 45
    q, k, v = inputs(rng, "bf16", 1, 6, 2, Lq, 71, 48)
    expected = reference(q, k, v, 0.15, "causal")
    space = list(family.search_space(CHIP, call(6, 2, Lq, 71, 48, dtype="bf16")))
    for params in random.Random(3).sample(space, min(12, len(space))):
        config = KernelConfig.make("attention", "cpu", family.name, params)
        out = ke.attention(q, k, v, scale=0.15, mask="causal", config=config)
        assert relative_error(out, expected) < TOL["bf16"], config.to_dsl()


def test_decode_query_limit_agrees_with_the_extension():
    assert EXT.decode_max_queries == DECODE_MAX_QUERIES


def test_domains():
    flash = CPU_ATTENTION_FAMILIES[0]
    assert flash.param("bq").contains(48) and not flash.param("bq").contains(40)
    assert flash.param("scale_at").contains("q") and not flash.param("scale_at").contains("k")
    assert flash.param("pack_gqa").contains(True) and not flash.param("pack_gqa").contains(1)
    split = CPU_ATTENTION_FAMILIES[2]
    assert not split.param("blocks").contains(1)  # one block is the decode family


def _program(body: str) -> CompiledProgram:
    text = f"kevo 1\ntarget cpu\nchips *\n\nattention {{\n{body}\n}}\n"
    return CompiledProgram(parse(text, "t.kevo"), text, "t.kevo", CHIP)


def test_rules_select_attention_configurations():
    program = _program(
        "  when q_len <= 16 and kv_len >= 4096 { decode_split bk=64 blocks=clamp(kv_len // 2048, 2, 16) "
        "threads=chip.cores pack_gqa=yes }\n"
        "  when q_len <= 16 { decode bk=32 threads=1 pack_gqa=gqa > 1 }\n"
        "  else { flash bq=64 bk=96 threads=chip.cores pack_gqa=yes skip_masked_blocks=causal scale_at=q dot=fma }")
    long = program.select("attention", call(32, 8, 1, 32768, 128))
    assert long.config.to_dsl() == (f"decode_split bk=64 blocks=16 threads={CHIP.cores} pack_gqa=yes")
    short = program.select("attention", call(4, 4, 2, 100, 64))
    assert short.config.get("pack_gqa") is False
    prefill = program.select("attention", call(8, 8, 512, 512, 64, batch=2, mask="causal"))
    assert prefill.config.family == "flash" and prefill.config.get("skip_masked_blocks") is True


def test_a_rule_that_chooses_decode_for_many_queries_is_an_error():
    program = _program("  else { decode bk=32 threads=1 pack_gqa=yes }")
    program.select("attention", call(4, 4, 16, 100, 64))
    with pytest.raises(DSLError, match="q_len <= 16"):
        program.select("attention", call(4, 4, 17, 100, 64))


def test_checker_rejects_unknown_attention_parameters():
    with pytest.raises(DSLError, match="flash has no parameter 'wm'"):
        _program("  else { flash bq=64 bk=96 wm=4 threads=1 pack_gqa=yes "
                 "skip_masked_blocks=yes scale_at=q dot=fma }")
    with pytest.raises(DSLError, match="bq=40 is not"):
        _program("  else { flash bq=40 bk=96 threads=1 pack_gqa=yes skip_masked_blocks=yes scale_at=q dot=fma }")
