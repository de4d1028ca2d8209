"""families.py is the one definition of each family's parameters: the extension must take
exactly those parameters, and the compiled register tiles must be the ones declared."""

import random

import pytest

import kernelevo as ke
from kernelevo import KernelConfig, chips
from kernelevo.families import ALL_FAMILIES, CPU_ENGINES, register_tiles

EXT = ke.ops._ext
CHIP = chips.detect("cpu")


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f.backend == "cpu" and f.op == "matmul"],
                         ids=lambda f: f.name)
def test_extension_takes_exactly_the_schema_parameters(family):
    space = list(family.search_space(CHIP, {"M": 1, "dtype": "bf16"}))
    assert space, "the search space must not be empty on this machine"
    for params in random.Random(0).sample(space, min(20, len(space))):
        config = KernelConfig.make(family.op, family.backend, family.name, params)
        EXT.validate_matmul_config(config.family, config.ext_params())  # reads every one
        for missing in family.param_names:
            partial = {k: v for k, v in config.ext_params().items() if k != missing}
            with pytest.raises(ValueError, match=f"needs parameter '{missing}'"):
                EXT.validate_matmul_config(config.family, partial)


@pytest.mark.parametrize("engine", list(CPU_ENGINES))
def test_register_tiles_agree_with_the_compiled_kernel(engine):
    if engine not in EXT.cpu_engines():
        pytest.skip(f"this build or CPU has no {engine} engine")
    declared = register_tiles(engine)
    for mr in range(1, 50):
        for nr in range(1, 80):
            assert EXT.gemm_register_tile_supported(engine, mr, nr) == ((mr, nr) in declared), (mr, nr)


def test_config_names_carry_every_parameter():
    config = KernelConfig.parse("gemm mc=96 nc=1024 kc=256 mr=6 nr=64 threads=2 split=m engine=amx "
                                "pack_a=no epilogue=separate", "matmul", "cpu")
    assert config.name == ("gemm_mc96_nc1024_kc256_mr6_nr64_threads2_splitm_engineamx_pack_a0"
                           "_epilogueseparate")
    assert KernelConfig.parse(config.to_dsl(), "matmul", "cpu") == config


def test_domains():
    gemm = next(f for f in ALL_FAMILIES if f.name == "gemm")
    assert gemm.param("mr").contains(6) and not gemm.param("mr").contains(7)
    assert gemm.param("nc").contains(48) and not gemm.param("nc").contains(50)
    assert not gemm.param("mc").contains(True)  # booleans are not integers here
    assert gemm.param("split").contains("n") and not gemm.param("split").contains("k")
    assert gemm.param("engine").contains("amx") and not gemm.param("engine").contains("avx")
    assert gemm.param("mr").contains(32) and not gemm.param("mr").contains(24)


def test_unavailable_engines_are_invalid_on_the_chip():
    import dataclasses

    no_amx = dataclasses.replace(CHIP, isa=("avx2", "avx512f", "fma"))
    params = {"mc": 64, "nc": 512, "kc": 256, "mr": 32, "nr": 32, "threads": 1, "split": "m",
              "engine": "amx", "pack_a": True, "epilogue": "fused"}
    gemm = next(f for f in ALL_FAMILIES if f.name == "gemm")
    assert any("available" in v for v in gemm.violations(params, no_amx))
    with_amx = dataclasses.replace(CHIP, isa=("amx_bf16", "amx_tile", "avx512f"))
    assert gemm.violations(params, with_amx, {"dtype": "bf16"}) == []
    assert any("f16/f32" in v for v in gemm.violations(params, with_amx, {"dtype": "f32"}))
