"""Chips: detecting the local one into a stable id and a table of facts.

A chip id names a class of machines on which one set of timings holds: `apple-m3-max`,
`nvidia-h200`, `cpu-avx512-intel-xeon-2c`. Heuristics files name the chips they apply
to by id or glob, tuned heuristics are stored per id, and the DSL reads the facts as
`chip.<fact>`.

Apple and NVIDIA chips cannot be detected on a CPU-only machine, so their rules are
plain functions of what MLX reports (`mx.device_info()`), testable with injected values.
Apple GPU generation 17 and later (M5, `applegpu_g17*`) is a class of its own: MLX runs its
NAX kernels there (`mlx_uses_nax`, the `chip.nax` fact), which the M1-M4 rules do not describe.
"""

from __future__ import annotations

import os
import platform
import re
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

BACKENDS: tuple[str, ...] = ("cpu", "metal", "cuda")


@dataclass(frozen=True)
class Chip:
    id: str
    backend: str  # cpu | metal | cuda
    name: str  # as the vendor names it
    vendor: str
    cores: int  # CPU cores this process may use / Apple GPU cores / NVIDIA SMs (0: unknown)
    memory_gb: float = 0.0
    bandwidth_gbs: float = 0.0  # nominal peak memory bandwidth (0: unknown)
    simd_width: int = 0  # CPU: bits per vector register; GPU: threads per simdgroup/warp
    vector_registers: int = 0  # CPU: architectural vector registers
    threadgroup_memory: int = 0  # GPU: bytes of threadgroup/shared memory per group
    max_threads: int = 0  # GPU: threads per threadgroup/block
    peak_f32_gflops: float = 0.0  # nominal (0: unknown)
    generation: int = 0  # Apple: M generation (3 for M3); NVIDIA: compute capability x10; CPU: 0
    isa: tuple[str, ...] = ()  # CPU instruction-set features, GPU architecture
    known: bool = True  # False when the chip was not recognised and facts are guesses
    notes: tuple[str, ...] = field(default=(), compare=False)

    def matches(self, pattern: str) -> bool:
        return fnmatchcase(self.id, pattern)

    @property
    def has_amx(self) -> int:
        """1 when the CPU has AMX-BF16 tiles (the `amx` engine of gemm and flash needs them)."""
        return int(self.backend == "cpu" and "amx_bf16" in self.isa and "amx_tile" in self.isa)

    @property
    def has_bf16dot(self) -> int:
        """1 when the CPU has AVX512-BF16 (what the gemm family's `bf16dot` engine needs)."""
        return int(self.backend == "cpu" and "avx512_bf16" in self.isa)

    @property
    def has_nax(self) -> int:
        """1 on an Apple GPU for which MLX (>= 0.31) runs its NAX kernels (generation 17 and
        later: M5): see `mlx_uses_nax`."""
        return int(self.backend == "metal" and bool(self.isa) and mlx_uses_nax(self.isa[0]))


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: str
    doc: str


#: What the DSL can read as `chip.<name>`.
FACTS: tuple[Fact, ...] = (
    Fact("cores", "cores", "CPU cores this process may use; Apple GPU cores; NVIDIA SMs"),
    Fact("memory", "memory_gb", "memory in GB (unified memory on Apple silicon)"),
    Fact("bandwidth", "bandwidth_gbs", "nominal memory bandwidth in GB/s"),
    Fact("simd_width", "simd_width", "CPU: bits per vector register; GPU: threads per simdgroup/warp"),
    Fact("vector_registers", "vector_registers", "CPU: architectural vector registers"),
    Fact("threadgroup_memory", "threadgroup_memory", "GPU: bytes of threadgroup/shared memory per group"),
    Fact("max_threads", "max_threads", "GPU: threads per threadgroup/block"),
    Fact("peak_gflops", "peak_f32_gflops", "nominal f32 throughput in GFLOP/s"),
    Fact("generation", "generation", "Apple: the M generation (1 for M1, 3 for M3); NVIDIA: "
         "compute capability times ten (90 for Hopper); CPU: 0"),
    Fact("amx", "has_amx", "CPU: 1 with AMX-BF16 tile units (gemm engine=amx, flash dot=amx), else 0"),
    Fact("bf16dot", "has_bf16dot", "CPU: 1 with AVX512-BF16 dot products, else 0"),
    Fact("nax", "has_nax", "Apple: 1 on GPU generation 17 and later (M5), where MLX runs its NAX "
         "kernels for GEMM and prefill attention (macOS 26.2+), else 0"),
)
FACT_NAMES: tuple[str, ...] = tuple(f.name for f in FACTS)


def fact(chip: Chip, name: str) -> float | int:
    for f in FACTS:
        if f.name == name:
            return getattr(chip, f.attribute)
    raise KeyError(name)


# --------------------------------------------------------------------------------------
# CPU


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model_slug(model_name: str) -> str:
    """A short stable slug of a CPU's marketing name (`AMD EPYC 9454 48-Core Processor` ->
    `amd-epyc-9454`)."""
    text = re.sub(r"\((R|TM|tm|r)\)", " ", model_name)
    text = re.sub(r"@.*$", " ", text)  # clock speed
    text = re.sub(r"\b\d+-Core\b|\bProcessor\b|\bCPU\b|\bwith .*$", " ", text, flags=re.I)
    return _slug(text) or "unknown"


def cpu_from_facts(*, machine: str, model_name: str, flags: set[str], cores: int,
                   memory_gb: float = 0.0) -> Chip:
    """Builds a CPU chip from what the OS reports (testable without the hardware)."""
    machine = machine.lower()
    notes: tuple[str, ...] = ()
    if machine in ("x86_64", "amd64"):
        if "avx512f" in flags:
            isa_level, width, registers = "avx512", 512, 32
        elif "avx2" in flags and "fma" in flags:
            isa_level, width, registers = "avx2", 256, 16
        else:
            isa_level, width, registers = "sse", 128, 16
    elif machine in ("arm64", "aarch64"):
        isa_level, width, registers = "neon", 128, 32
    else:
        isa_level, width, registers = machine or "unknown", 128, 16
        notes = (f"unrecognised CPU architecture {machine!r}",)
    model = cpu_model_slug(model_name)
    wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile",
              "avx2", "fma", "f16c", "neon", "asimd", "bf16", "i8mm", "sve")
    isa = tuple(sorted(f for f in flags if f in wanted))
    vendor = model.split("-")[0] if model != "unknown" else "unknown"
    return Chip(
        id=f"cpu-{isa_level}-{model}-{cores}c",
        backend="cpu",
        name=model_name.strip() or "unknown CPU",
        vendor=vendor,
        cores=cores,
        memory_gb=memory_gb,
        simd_width=width,
        vector_registers=registers,
        isa=isa,
        known=isa_level in ("avx512", "avx2", "neon"),
        notes=notes,
    )


def _read_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not model and platform.system() == "Darwin":
        import subprocess

        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            model = ""
        flags |= {"neon"} if platform.machine() == "arm64" else set()
    return model or platform.processor() or "", flags


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def detect_cpu() -> Chip:
    model, flags = _read_cpuinfo()
    return cpu_from_facts(machine=platform.machine(), model_name=model, flags=flags,
                          cores=_usable_cores(), memory_gb=round(_memory_gb(), 1))


# --------------------------------------------------------------------------------------
# Apple silicon (Metal)

#: MLX reports the GPU as e.g. `applegpu_g15s`: generation, then a device-class letter.
APPLE_GENERATIONS = {"g13": "m1", "g14": "m2", "g15": "m3", "g16": "m4", "g17": "m5"}
APPLE_CLASSES = {"g": "", "p": "", "s": "pro", "c": "max", "d": "ultra"}

# (GPU cores of the full configuration, nominal bandwidth GB/s, nominal f32 GFLOP/s)
APPLE_TABLE: dict[str, tuple[int, float, float]] = {
    "apple-m1": (8, 68, 2600), "apple-m1-pro": (16, 200, 5200),
    "apple-m1-max": (32, 400, 10400), "apple-m1-ultra": (64, 800, 20800),
    "apple-m2": (10, 100, 3600), "apple-m2-pro": (19, 200, 6800),
    "apple-m2-max": (38, 400, 13600), "apple-m2-ultra": (76, 800, 27200),
    "apple-m3": (10, 100, 4100), "apple-m3-pro": (18, 150, 7400),
    "apple-m3-max": (40, 400, 16400), "apple-m3-ultra": (80, 819, 32800),
    "apple-m4": (10, 120, 4300), "apple-m4-pro": (20, 273, 8700),
    "apple-m4-max": (40, 546, 17400),
    "apple-m5": (10, 153, 0.0),  # f32 peak not known here
}


def mlx_uses_nax(architecture: str) -> bool:
    """Whether MLX runs its NAX kernels (GEMM, split-K GEMM and prefill attention on the GPU's
    neural accelerators) on the Apple GPU of this architecture string — the class of chip
    generation 17 (M5) begins, which the M1-M4 rules do not describe.

    MLX 0.32.1, mlx/backend/metal/device.cpp, `metal::is_nax_available()`:
        auto arch = d.get_architecture().back();
        auto gen = d.get_architecture_gen();
        can_use_nax &= gen >= (arch == 'p' ? 18 : 17);
    where `Device::Device()` reads gen as the two digits before the class letter
    (`arch_[arch_.size() - 3]`, `arch_[arch_.size() - 2]`: applegpu_g17s gives 17). The same
    function also needs macOS 26.2 (`__builtin_available(macOS 26.2, ...)`) and a build without
    MLX_METAL_NO_NAX, which the architecture does not tell: on an older macOS MLX runs its steel
    kernels on these chips, and the shipped files send every call to MLX either way. matmul.cpp
    (`use_nax`) and scaled_dot_product_attention.cpp then take the NAX path for non-complex
    dtypes (f32 only with TF32 allowed, MLX's default) and heads other than 72 and 80 wide.
    """
    arch = architecture.strip()
    if len(arch) < 3 or not arch[-3:-1].isdigit():
        return False
    gen = int(arch[-3:-1])
    return gen >= (18 if arch[-1] == "p" else 17)


def apple_from_device_info(architecture: str, device_name: str = "",
                           memory_size: int = 0) -> Chip:
    """Builds an Apple GPU chip from `mx.device_info()` on a Metal machine."""
    m = re.fullmatch(r"applegpu_(g\d+)([a-z])", architecture.strip())
    generation = APPLE_GENERATIONS.get(m.group(1)) if m else None
    if not m or not generation:
        return Chip(id="apple-unknown", backend="metal", name=device_name or architecture,
                    vendor="apple", cores=8, memory_gb=memory_size / 1e9, simd_width=32,
                    threadgroup_memory=32768, max_threads=1024, isa=(architecture,),
                    known=False, notes=(f"unrecognised Apple GPU {architecture!r}",))
    variant = APPLE_CLASSES.get(m.group(2), "")
    chip_id = f"apple-{generation}" + (f"-{variant}" if variant else "")
    if variant == "" and device_name:
        # The phone/tablet class letter says nothing of Pro/Max; the name can.
        for candidate in ("ultra", "max", "pro"):
            if candidate in device_name.lower():
                chip_id = f"apple-{generation}-{candidate}"
                break
    cores, bandwidth, gflops = APPLE_TABLE.get(chip_id, (8, 0.0, 0.0))
    return Chip(id=chip_id, backend="metal", name=device_name or chip_id, vendor="apple",
                cores=cores, memory_gb=round(memory_size / 1e9, 1), bandwidth_gbs=bandwidth,
                simd_width=32, threadgroup_memory=32768, max_threads=1024,
                peak_f32_gflops=gflops, generation=int(generation[1:]), isa=(architecture,),
                notes=() if chip_id in APPLE_TABLE else
                (f"no fact table entry for {chip_id}: 8 GPU cores assumed, bandwidth and peak unknown",))


# --------------------------------------------------------------------------------------
# NVIDIA (CUDA)

# SMs, nominal bandwidth GB/s, nominal dense f32 (non-tensor) GFLOP/s
NVIDIA_TABLE: dict[str, tuple[int, float, float]] = {
    "nvidia-h200": (132, 4800, 67000), "nvidia-h100": (132, 3350, 67000),
    "nvidia-h100-pcie": (114, 2000, 51000), "nvidia-h100-nvl": (132, 3900, 60000),
    "nvidia-a100": (108, 2039, 19500), "nvidia-a100-pcie": (108, 1935, 19500),
    "nvidia-l40s": (142, 864, 91600), "nvidia-l4": (58, 300, 30300),
    "nvidia-a10": (72, 600, 31200), "nvidia-rtx-4090": (128, 1008, 82600),
    "nvidia-rtx-3090": (82, 936, 35600), "nvidia-gb200": (148, 8000, 80000),
    "nvidia-b200": (148, 8000, 80000),
}

# Dynamic shared memory a block may opt into, by compute capability (bytes).
_SHARED_MEMORY = {(9, 0): 227 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
                  (8, 9): 99 * 1024, (7, 5): 64 * 1024, (7, 0): 96 * 1024,
                  (10, 0): 227 * 1024, (12, 0): 99 * 1024}


def nvidia_id(device_name: str) -> str:
    name = re.sub(r"^NVIDIA\s+", "", device_name.strip(), flags=re.I)
    name = re.sub(r"\b(GeForce|Tesla)\b", "", name, flags=re.I)
    name = re.sub(r"\b(SXM\d*|\d+GB|HBM\d*e?)\b", "", name, flags=re.I)
    return "nvidia-" + (_slug(name) or "unknown")


def nvidia_from_device_info(device_name: str, architecture: str,
                            total_memory: int = 0) -> Chip:
    """Builds an NVIDIA chip from `mx.device_info(mx.gpu)` on a CUDA machine."""
    chip_id = nvidia_id(device_name)
    m = re.fullmatch(r"sm_(\d+)(\d)", architecture.strip())
    cc = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    table = NVIDIA_TABLE.get(chip_id)
    sms, bandwidth, gflops = table or (0, 0.0, 0.0)
    return Chip(id=chip_id, backend="cuda", name=device_name, vendor="nvidia",
                cores=sms, memory_gb=round(total_memory / 1e9, 1), bandwidth_gbs=bandwidth,
                simd_width=32, threadgroup_memory=_SHARED_MEMORY.get(cc, 48 * 1024),
                max_threads=1024, peak_f32_gflops=gflops, generation=cc[0] * 10 + cc[1],
                isa=(architecture,), known=table is not None,
                notes=() if table else (f"no fact table entry for {device_name!r}",))


def from_id(chip_id: str) -> Chip:
    """A GPU chip from its id alone (Apple and NVIDIA ids in the fact tables), for looking
    at what the heuristics would choose there; timing still needs the chip itself."""
    for arch_gen, generation in APPLE_GENERATIONS.items():
        for letter, variant in APPLE_CLASSES.items():
            if letter != "p" and chip_id == f"apple-{generation}" + (f"-{variant}" if variant else ""):
                name = f"Apple {generation.upper()}" + (f" {variant.title()}" if variant else "")
                return apple_from_device_info(f"applegpu_{arch_gen}{letter}", name)
    if chip_id in NVIDIA_TABLE:
        arch = _NVIDIA_ARCH.get(chip_id, "sm_90")
        return nvidia_from_device_info(chip_id.replace("nvidia-", "NVIDIA ").upper(), arch)
    known = sorted(list(APPLE_TABLE) + list(NVIDIA_TABLE))
    raise ValueError(f"unknown chip id {chip_id!r}; known GPU ids: {', '.join(known)} "
                     f"(`kernelevo chips` prints this machine's)")


_NVIDIA_ARCH = {"nvidia-a100": "sm_80", "nvidia-a100-pcie": "sm_80", "nvidia-a10": "sm_86",
                "nvidia-rtx-3090": "sm_86", "nvidia-l40s": "sm_89", "nvidia-l4": "sm_89",
                "nvidia-rtx-4090": "sm_89", "nvidia-b200": "sm_100", "nvidia-gb200": "sm_100"}


# --------------------------------------------------------------------------------------
# The local machine


@lru_cache(maxsize=None)
def detect(backend: str = "cpu") -> Chip:
    """The local chip for a backend. Warns (once) when the chip is not recognised."""
    if backend == "cpu":
        chip = detect_cpu()
    else:
        import mlx.core as mx

        if backend == "metal" and mx.metal.is_available():
            info = mx.device_info(mx.gpu)
            chip = apple_from_device_info(str(info.get("architecture", "")),
                                          str(info.get("device_name", "")),
                                          int(info.get("memory_size", 0)))
        elif backend == "cuda" and mx.cuda.is_available():
            info = mx.device_info(mx.gpu)
            chip = nvidia_from_device_info(str(info.get("device_name", "")),
                                           str(info.get("architecture", "")),
                                           int(info.get("total_memory", 0)))
        else:
            raise ValueError(f"no {backend} device on this machine")
    if not chip.known:
        warnings.warn(f"kernelevo does not recognise this {backend} chip ({chip.name}); "
                      f"using generic heuristics. " + " ".join(chip.notes), stacklevel=2)
    return chip


def available_backends() -> tuple[str, ...]:
    import mlx.core as mx

    found = ["cpu"]
    if mx.metal.is_available():
        found.append("metal")
    if mx.cuda.is_available():
        found.append("cuda")
    return tuple(found)


def gpu_backend() -> str:
    """The kernelevo backend of this machine's GPU (where MLX has one)."""
    import mlx.core as mx

    return "metal" if mx.metal.is_available() else "cuda"


def default_backend() -> str:
    """The backend of MLX's default device (asked on every op call: kept cheap)."""
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else gpu_backend()

