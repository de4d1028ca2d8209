"""Chip detection rules, with injected facts for hardware this machine does not have."""

import pytest

from kernelevo import chips
from kernelevo.chips import apple_from_device_info, cpu_from_facts, nvidia_from_device_info


@pytest.mark.parametrize("arch,name,expected,cores", [
    ("applegpu_g13g", "Apple M1", "apple-m1", 8),
    ("applegpu_g13s", "Apple M1 Pro", "apple-m1-pro", 16),
    ("applegpu_g13c", "Apple M1 Max", "apple-m1-max", 32),
    ("applegpu_g13d", "Apple M1 Ultra", "apple-m1-ultra", 64),
    ("applegpu_g14g", "Apple M2", "apple-m2", 10),
    ("applegpu_g14s", "Apple M2 Pro", "apple-m2-pro", 19),
    ("applegpu_g14c", "Apple M2 Max", "apple-m2-max", 38),
    ("applegpu_g14d", "Apple M2 Ultra", "apple-m2-ultra", 76),
    ("applegpu_g15g", "Apple M3", "apple-m3", 10),
    ("applegpu_g15s", "Apple M3 Pro", "apple-m3-pro", 18),
    ("applegpu_g15c", "Apple M3 Max", "apple-m3-max", 40),
    ("applegpu_g15d", "Apple M3 Ultra", "apple-m3-ultra", 80),
    ("applegpu_g16g", "Apple M4", "apple-m4", 10),
    ("applegpu_g16s", "Apple M4 Pro", "apple-m4-pro", 20),
    ("applegpu_g16c", "Apple M4 Max", "apple-m4-max", 40),
    ("applegpu_g16p", "Apple M4 Pro", "apple-m4-pro", 20),  # class letter says phone; name decides
    ("applegpu_g17g", "Apple M5", "apple-m5", 10),
])
def test_apple_chips(arch, name, expected, cores):
    chip = apple_from_device_info(arch, name, memory_size=64 * 10**9)
    assert chip.id == expected and chip.backend == "metal" and chip.known
    assert chip.cores == cores and chip.threadgroup_memory == 32768 and chip.simd_width == 32
    assert chip.bandwidth_gbs > 0 and chip.memory_gb == 64.0


@pytest.mark.parametrize("arch,nax", [
    # MLX's metal::is_nax_available(): gen >= (arch == 'p' ? 18 : 17), gen the two digits
    # before the class letter
    ("applegpu_g13g", False), ("applegpu_g16s", False), ("applegpu_g16c", False), ("applegpu_g16d", False),
    ("applegpu_g17g", True), ("applegpu_g17s", True), ("applegpu_g17c", True), ("applegpu_g17d", True),
    ("applegpu_g17p", False), ("applegpu_g18p", True), ("applegpu_g19s", True), ("", False), ("g", False),
])
def test_mlx_uses_nax_from_generation_17(arch, nax):
    assert chips.mlx_uses_nax(arch) is nax
    chip = apple_from_device_info(arch, "Apple")
    assert chip.has_nax == int(nax) and chips.fact(chip, "nax") == int(nax)


def test_generation_17_is_its_own_class():
    """M5 (applegpu_g17*) gets its own ids, known, with the nax fact set; M1-M4 and other
    backends never have it."""
    for letter, expected in [("g", "apple-m5"), ("s", "apple-m5-pro"), ("c", "apple-m5-max"), ("d", "apple-m5-ultra")]:
        chip = apple_from_device_info(f"applegpu_g17{letter}", "")
        assert chip.id == expected and chip.known and chip.generation == 5 and chip.has_nax == 1
        assert chips.from_id(expected).has_nax == 1
    assert all(chips.from_id(i).has_nax == 0 for i in chips.APPLE_TABLE if not i.startswith("apple-m5"))
    assert chips.detect("cpu").has_nax == 0 and chips.from_id("nvidia-h100").has_nax == 0
    assert "nax" in chips.FACT_NAMES


def test_unknown_apple_gpu_is_flagged():
    chip = apple_from_device_info("applegpu_g99x", "Apple M9")
    assert chip.id == "apple-unknown" and not chip.known and chip.notes


@pytest.mark.parametrize("name,arch,expected,smem", [
    ("NVIDIA H200", "sm_90", "nvidia-h200", 227 * 1024),
    ("NVIDIA H100 80GB HBM3", "sm_90", "nvidia-h100", 227 * 1024),
    ("NVIDIA A100-SXM4-80GB", "sm_80", "nvidia-a100", 163 * 1024),  # form factor and memory size dropped
    ("NVIDIA GeForce RTX 4090", "sm_89", "nvidia-rtx-4090", 99 * 1024),
])
def test_nvidia_chips(name, arch, expected, smem):
    chip = nvidia_from_device_info(name, arch, total_memory=80 * 10**9)
    assert chip.id == expected and chip.backend == "cuda"
    assert chip.threadgroup_memory == smem and chip.max_threads == 1024


def test_nvidia_known_and_unknown():
    assert nvidia_from_device_info("NVIDIA H200", "sm_90").cores == 132
    unknown = nvidia_from_device_info("NVIDIA Quadro X1", "sm_75")
    assert not unknown.known and unknown.id == "nvidia-quadro-x1"


@pytest.mark.parametrize("machine,model,flags,expected,width,regs", [
    ("x86_64", "AMD EPYC 9454 48-Core Processor", {"avx512f", "avx2", "fma", "avx512_bf16"},
     "cpu-avx512-amd-epyc-9454-2c", 512, 32),
    ("x86_64", "Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz", {"avx2", "fma"},
     "cpu-avx2-intel-core-i7-9700k-2c", 256, 16),
    ("aarch64", "", {"asimd"}, "cpu-neon-unknown-2c", 128, 32),
    ("arm64", "Apple M2", {"neon"}, "cpu-neon-apple-m2-2c", 128, 32),
])
def test_cpu_chips(machine, model, flags, expected, width, regs):
    chip = cpu_from_facts(machine=machine, model_name=model, flags=flags, cores=2)
    assert chip.id == expected and chip.simd_width == width and chip.vector_registers == regs
    assert chip.known


def test_unrecognised_cpu_architecture():
    chip = cpu_from_facts(machine="riscv64", model_name="SiFive", flags=set(), cores=4)
    assert not chip.known and chip.id.startswith("cpu-riscv64-")


def test_local_cpu_is_detected():
    chip = chips.detect("cpu")
    assert chip.backend == "cpu" and chip.cores >= 1 and chip.id.startswith("cpu-")
    assert chip.simd_width in (128, 256, 512)


def test_missing_gpu_backend_is_an_error():
    import mlx.core as mx

    if not mx.metal.is_available():
        with pytest.raises(ValueError, match="no metal device"):
            chips.detect.__wrapped__("metal")
