"""Running kernelevo's lowered Metal kernels in the MSL emulator (tests/mslemu/), and
pretending to be a Metal device so that the op layer's real path — selection from the
shipped apple-*.kevo, lowering, `_ext.launch` — runs with only the launch replaced.

`mslemu.metal_kernel` takes the same arguments as `mx.fast.metal_kernel` and compiles the
exact source MLX would JIT for them (signature, attributes, prelude, template
instantiation), so what runs here is what a Mac would compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

import mslemu
from kernelevo import chips
from kernelevo.lowering import LoweredKernel, Plan
from kernelevo.ops import gpu

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "bool": mx.bool_,
             "int32": mx.int32}

CHIPS = {
    "m1": chips.apple_from_device_info("applegpu_g13g", "Apple M1"),
    "m3": chips.apple_from_device_info("applegpu_g15g", "Apple M3"),
    "m2-pro": chips.apple_from_device_info("applegpu_g14s", "Apple M2 Pro"),
    "m3-max": chips.apple_from_device_info("applegpu_g15c", "Apple M3 Max"),
    "m2-ultra": chips.apple_from_device_info("applegpu_g14d", "Apple M2 Ultra"),
    "m4": chips.apple_from_device_info("applegpu_g16g", "Apple M4"),
}


def emulate(kernel, inputs: list, *, schedule: str = "forward", seed: int = 0):
    """Runs one kernel — a LoweredKernel or the extension's GpuKernel — in the emulator:
    (outputs as mx.arrays, mslemu.Stats)."""
    k = mslemu.metal_kernel(name=kernel.name, input_names=list(kernel.input_names),
                            output_names=list(kernel.output_names), source=kernel.source,
                            header=kernel.header, ensure_row_contiguous=kernel.ensure_row_contiguous)
    template = [(n, MX_DTYPES[v] if isinstance(v, str) else v) for n, v in kernel.template_args]
    return k(inputs=inputs, template=template, grid=tuple(kernel.grid), threadgroup=tuple(kernel.threadgroup),
             output_shapes=[tuple(s) for s in kernel.output_shapes],
             output_dtypes=[MX_DTYPES[d] for d in kernel.output_dtypes], init_value=kernel.init_value,
             schedule=schedule, seed=seed)


def kernel_inputs(kernel: LoweredKernel, env: dict) -> list:
    return [mx.array(kernel.sizes, dtype=mx.int32) if n == "sizes" else env[n] for n in kernel.input_names]


def run_plan(plan: Plan, env: dict, *, schedule: str = "forward", seed: int = 0) -> tuple[mx.array, list]:
    """Runs a plan's kernels in order in the emulator: (result, [Stats per kernel])."""
    env = dict(env)
    stats = []
    for kernel in plan.kernels:
        outs, st = emulate(kernel, kernel_inputs(kernel, env), schedule=schedule, seed=seed)
        env.update(zip(kernel.output_names, outs))
        stats.append(st)
    return env[plan.result], stats


def run_plan_schedules(plan: Plan, env: dict) -> mx.array:
    """Runs each kernel of a plan under forward, reverse and random fiber orders and
    requires bitwise-equal outputs (mslemu.run_schedules); a missing barrier fails."""
    env = dict(env)
    for kernel in plan.kernels:
        k = mslemu.metal_kernel(name=kernel.name, input_names=list(kernel.input_names),
                                output_names=list(kernel.output_names), source=kernel.source,
                                header=kernel.header)
        template = [(n, MX_DTYPES[v] if isinstance(v, str) else v) for n, v in kernel.template_args]
        outs, _ = mslemu.run_schedules(
            k, inputs=kernel_inputs(kernel, env), template=template, grid=kernel.grid,
            threadgroup=kernel.threadgroup, output_shapes=[tuple(s) for s in kernel.output_shapes],
            output_dtypes=[MX_DTYPES[d] for d in kernel.output_dtypes], seed=7)
        env.update(zip(kernel.output_names, outs))
    return env[plan.result]


@dataclass
class EmulatedLaunch:
    """Stands in for the extension's launch (gpu.launch.launch_kernel): runs the kernel in the emulator and
    keeps each launch's kernel name and counters."""

    launched: list[str] = field(default_factory=list)
    stats: list = field(default_factory=list)

    def __call__(self, kernel, inputs, stream=None):
        assert kernel.backend == "metal", kernel.backend
        outs, st = emulate(kernel, list(inputs))
        self.launched.append(kernel.name)
        self.stats.append(st)
        return outs


def pretend_metal(monkeypatch, chip_name: str = "m1") -> EmulatedLaunch:
    """Makes this process look like a Mac with the named Apple GPU to kernelevo: MLX's
    default device a Metal GPU, the chip's facts, and kernels launched in the emulator.
    Everything between — routing, selection, lowering — is the real code."""
    launch = EmulatedLaunch()
    chip = CHIPS[chip_name]
    real_detect = chips.detect
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(chips, "default_backend", lambda: "metal")
    monkeypatch.setattr(chips, "detect", lambda backend="cpu": chip if backend == "metal" else real_detect(backend))
    monkeypatch.setattr(gpu.launch, "launch_kernel", launch)
    return launch
