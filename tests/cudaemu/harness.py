"""Runs a lowered CUDA kernel on the CPU emulator (emu.h): the exact translation unit MLX's
cuda_kernel would compile, with MLX's prelude swapped for the emulator and ke_ptx.cuh for
its emulated primitives. Each run happens in a forked child, so a kernel that touches a
guard page fails its test instead of the test process.

Arrays are numpy: float32, float16, bf16 as uint16 bit patterns (to_bf16 / from_bf16),
bool, int32.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kernelevo.lowering import LoweredKernel, Plan
from kernelevo.lowering.cuda import header as cuda_header
from kernelevo.lowering.cuda import mlx_source

HERE = Path(__file__).resolve().parent
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
             "bool": np.bool_, "int32": np.int32}


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bf16 bit patterns, rounded to nearest even."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dtype_of(x: np.ndarray) -> str:
    for name, np_type in NP_DTYPES.items():
        if x.dtype == np_type:
            return name
    raise TypeError(f"no kernel dtype for numpy {x.dtype}")


def _cache_dir() -> Path:
    path = Path(os.environ.get("KERNELEVO_EMU_CACHE") or Path(tempfile.gettempdir()) / "kernelevo-cudaemu")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(kernel: LoweredKernel, input_dtypes: tuple[str, ...]) -> Path:
    """Compiles the kernel for the emulator (cached by the source's hash)."""
    ptx = cuda_header("ke_ptx.cuh")
    assert ptx in kernel.header, "every kernel header includes ke_ptx.cuh"
    header = kernel.header.replace(ptx, '#include "emu_ptx.h"\n')
    func, unit = mlx_source(kernel, input_dtypes, prelude='#include "emu.h"\n', header=header)
    names = list(kernel.input_names) + list(kernel.output_names)
    types = [f"const {t}*" for t in _cuda_types(input_dtypes)] + [f"{t}*" for t in _cuda_types(kernel.output_dtypes)]
    call = ", ".join(f"static_cast<{t}>(args[{i}])" for i, t in enumerate(types))
    unit += f'\nextern "C" void ke_emu_call(void** args) {{ mlx::core::cu::{func}({call}); }}\n'
    assert len(names) == len(types)
    digest = hashlib.sha256((unit + (HERE / "emu.h").read_text() + (HERE / "emu_ptx.h").read_text()).encode()).hexdigest()[:20]
    out = _cache_dir() / f"k{digest}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(unit)
        cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-I", str(HERE), "-w",
               "-o", str(out) + ".tmp", str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"emulator build of {kernel.name} failed:\n{result.stderr[-6000:]}")
        os.replace(str(out) + ".tmp", out)
    return out


def _cuda_types(dtypes):
    from kernelevo.lowering.cuda import CUDA_TYPES

    return [CUDA_TYPES[d] for d in dtypes]


def _child(lib_path, kernel, inputs, order, seed, conn):
    try:
        lib = ctypes.CDLL(str(lib_path))
        lib.ke_emu_alloc.restype = ctypes.c_void_p
        lib.ke_emu_alloc.argtypes = [ctypes.c_long]
        buffers = []
        for x in inputs:
            p = lib.ke_emu_alloc(max(x.nbytes, 1))
            ctypes.memmove(p, x.ctypes.data, x.nbytes)
            buffers.append(p)
        outs = []
        for shape, dtype in zip(kernel.output_shapes, kernel.output_dtypes):
            nbytes = int(np.prod(shape)) * np.dtype(NP_DTYPES[dtype]).itemsize
            p = lib.ke_emu_alloc(max(nbytes, 1))
            ctypes.memset(p, 0xFF, nbytes)  # NaN: an element the kernel never wrote shows
            buffers.append(p)
            outs.append((p, shape, dtype, nbytes))
        args = (ctypes.c_void_p * len(buffers))(*buffers)
        err = ctypes.create_string_buffer(4096)
        (gx, gy, gz), (bx, by, bz) = kernel.grid, kernel.threadgroup
        blocks = (-(-gx // bx), -(-gy // by), -(-gz // bz))
        rc = lib.ke_emu_run(args, *blocks, bx, by, bz, ctypes.c_long(kernel.shared_memory),
                            order, ctypes.c_uint(seed), err, 4096)
        if rc:
            conn.send(("error", err.value.decode()))
            return
        results = []
        for p, shape, dtype, nbytes in outs:
            data = ctypes.string_at(p, nbytes)
            results.append(np.frombuffer(data, dtype=NP_DTYPES[dtype]).reshape(shape).copy())
        conn.send(("ok", results))
    except Exception as err:  # reported to the parent
        conn.send(("error", repr(err)))


def run_kernel(kernel: LoweredKernel, inputs: list[np.ndarray], order: int = 0, seed: int = 0,
               timeout: float = 600.0) -> list[np.ndarray]:
    """Runs one kernel; inputs in the order of kernel.input_names."""
    assert len(inputs) == len(kernel.input_names), (kernel.input_names, len(inputs))
    inputs = [np.ascontiguousarray(x) for x in inputs]
    lib = build(kernel, tuple(dtype_of(x) for x in inputs))
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(lib, kernel, inputs, order, seed, child))
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        raise TimeoutError(f"{kernel.name} ran past {timeout} s in the emulator")
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{kernel.name} crashed the emulator (exit code {proc.exitcode}: "
                           f"an access past a buffer or shared memory hits a guard page)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{kernel.name}: {value}")
    return value


def run_plan(plan: Plan, inputs: dict[str, np.ndarray], order: int = 0, seed: int = 0) -> np.ndarray:
    """Runs a plan's kernels in order, each reading call inputs and earlier outputs by name;
    `sizes` comes from each kernel."""
    env = dict(inputs)
    for kernel in plan.kernels:
        env["sizes"] = np.array(kernel.sizes, dtype=np.int32)
        outs = run_kernel(kernel, [env[n] for n in kernel.input_names], order, seed)
        env.update(zip(kernel.output_names, outs))
    return env[plan.result]
