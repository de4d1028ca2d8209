"""Lowering KernelConfigs to Metal kernels (no emulator needed): every parameter of every
Metal family changes what is generated, names carry every template argument, and the
limits of Apple GPUs are enforced by the schema before lowering and asserted by it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from kernelevo.config import ConfigError, KernelConfig
from kernelevo.dsl import check, parse
from kernelevo.families import families_for
from kernelevo.features import attention_features, matmul_features
from kernelevo.lowering import metal as lowering
from kernelevo.lowering import template_dir
from kernelevo.features import Epilogue
from metal_emulated import CHIPS

M1 = CHIPS["m1"]

# A configuration of each family and a call it applies to.
BASES = {
    "gemm": ("gemm bm=32 bn=32 bk=16 wm=2 wn=2 swizzle=1 epilogue=fused",
             matmul_features(100, 100, 64, dtype="f16", transpose_b=True, epilogue="bias")),
    "splitk": ("splitk bm=32 bn=32 bk=16 wm=2 wn=2 parts=4", matmul_features(40, 40, 1000, dtype="f16")),
    "gemv": ("gemv bm=2 bn=2 sm=8 sn=4 tm=4 tn=4", matmul_features(1, 100, 64, dtype="f16", transpose_b=True)),
    "gemv_wide": ("gemv_wide vecs=3 lanes=16 split_passes=yes",
                  matmul_features(7, 100, 64, dtype="f16", transpose_b=True)),
    "flash": ("flash bq=32 bk=16 wm=2 wn=1 skip_masked_blocks=yes scale_at=q",
              attention_features(batch=1, heads=4, kv_heads=2, q_len=64, kv_len=64, head_dim=64, mask="causal")),
    "decode": ("decode simdgroups=4 pack_gqa=yes scale_at=q",
               attention_features(batch=1, heads=4, kv_heads=2, q_len=1, kv_len=64, head_dim=64)),
    "decode_split": ("decode_split blocks=32 pack_gqa=yes scale_at=q",
                     attention_features(batch=1, heads=4, kv_heads=2, q_len=1, kv_len=640, head_dim=64)),
}


def _lower(config: KernelConfig, features: dict):
    if config.op == "matmul":
        return lowering.lower_matmul(config, features, epilogue=Epilogue(bias=features["epilogue"] == "bias"))
    return lowering.lower_attention(config, features, scale=0.125)


def _what_runs(plan):
    """Everything of a plan except kernel names: what would differ on the GPU."""
    return ([dataclasses.replace(k, name="") for k in plan.kernels], plan.pending)


def test_every_metal_family_has_a_base_case():
    names = {f.name for op in ("matmul", "attention") for f in families_for(op, "metal")} - {"mlx"}
    assert names == set(BASES)


def _alternatives(base: KernelConfig, param, features):
    """Valid configurations that differ from base in `param` — alone where the schema
    allows, else together with one other parameter (sm * sn == 32 ties sm to sn)."""
    def values(p):
        if p.kind == "int" and not p.allowed and (p.hi - p.lo) // p.multiple_of <= 64:
            domain = range(p.lo, p.hi + 1, p.multiple_of)
        else:
            domain = p.allowed if p.kind == "int" and p.allowed else p.search_values(M1)
        return [v for v in domain if v != base.get(p.name)]

    def valid(params):
        return not base.schema.violations(params, M1, features)

    for value in values(param):
        params = {**base.as_dict(), param.name: value}
        if valid(params):
            yield KernelConfig.make(base.op, "metal", base.family, params)
            return
    for other in base.schema.params:
        for value in values(param):
            for second in values(other) if other is not param else []:
                params = {**base.as_dict(), param.name: value, other.name: second}
                if valid(params):
                    yield KernelConfig.make(base.op, "metal", base.family, params)
                    return


@pytest.mark.parametrize("family", sorted(BASES))
def test_every_parameter_changes_the_generated_kernels(family):
    """The kernel reads each parameter: another valid value of any one of them gives
    different kernels (template arguments, grid, threadgroup, body or outputs), not only a
    different name, and a kernel name of its own (names are the compiled kernels' keys)."""
    text, features = BASES[family]
    base = KernelConfig.parse(text, "matmul" if "M" in features else "attention", "metal")
    base.check(M1, features)
    plan = _lower(base, features)
    names = {k.name for k in plan.kernels if k.name.startswith(base.name)}
    assert names, "a configuration's kernels carry its name"
    for param in base.schema.params:
        other = next(_alternatives(base, param, features), None)
        assert other is not None, f"no other valid value of {param.name} to try"
        changed = _lower(other, features)
        assert _what_runs(changed) != _what_runs(plan), f"{other.to_dsl()} changes nothing"
        assert not names & {k.name for k in changed.kernels if k.name.startswith(other.name)}, \
            f"{other.to_dsl()} reuses a kernel name"


def test_limits_are_the_schemas_and_lowering_asserts_them():
    """32 KiB of threadgroup memory and 1024 threads: a configuration beyond them is
    rejected by the schema (at check time in a .kevo file, at selection for a call), and
    lowering asserts them on what it generates."""
    big = KernelConfig.parse("gemm bm=128 bn=128 bk=64 wm=2 wn=2 swizzle=0 epilogue=fused", "matmul", "metal")
    f32 = matmul_features(256, 256, 256, dtype="f32")
    with pytest.raises(ConfigError, match="threadgroup_memory"):
        big.check(M1, f32)
    with pytest.raises(AssertionError, match="threadgroup memory"):
        lowering.lower_matmul(big, f32)
    text = ("kevo 1\ntarget metal\nmatmul {\n  when M == 1 { gemv bm=8 bn=16 sm=1 sn=32 tm=4 tn=4 }\n"
            "  else { gemm bm=128 bn=128 bk=64 wm=4 wn=4 swizzle=0 epilogue=fused }\n}\n")
    messages = [d.message for d in check(parse(text), text, chip=M1)]
    assert any("threadgroup_memory" in m for m in messages) and any("max_threads" in m for m in messages)


def _code(text: str) -> str:
    """Metal source without its comments."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.DOTALL)


def test_templates_keep_the_rules_only_apples_compiler_would_enforce():
    """What the emulator cannot see (it erases address spaces and accepts C++ that MSL
    rejects), held by reading the templates: kernel data never has a spelled-out
    `device`/`constant` pointer type — MLX binds inputs of fewer than 8 elements as
    `constant` and larger ones as `device`, so the templates take them as template pointer
    types; threadgroup storage is declared only in kernel bodies; no erf, no nullptr, no
    double."""

    for path in sorted(template_dir("metal").glob("*.h")):
        code = _code(path.read_text())
        assert not re.search(r"\bdevice\b", code), f"{path.name} names the device address space"
        assert not re.search(r"\bconstant\b(?!\s+constexpr)", code.replace("static constant constexpr", "")), \
            f"{path.name} names the constant address space"
        assert not re.search(r"\bthreadgroup\s+\w+\s+\w+\s*\[", code), \
            f"{path.name} declares threadgroup storage outside a kernel body"
        for word in ("erf", "nullptr", "double"):
            assert not re.search(rf"\b{word}\s*\(|\b{word}\b(?!_)", code), f"{path.name} uses {word}"
