"""Compiles lowered CUDA kernels the way MLX's cuda_kernel does — NVRTC, the source
wrapped as custom_kernel.cpp wraps it, --gpu-architecture=sm_90a — and reads ptxas's
resource report (registers, spills, shared memory). Needs libnvrtc (the
nvidia-cuda-nvrtc wheel) and ptxas; `available()` says whether they are here.

MLX's prelude includes mlx/backend/cuda/device/utils.cuh, which MLX embeds in libmlx;
point KERNELEVO_MLX_CUDA_INCLUDE at a folder holding mlx/backend/cuda/device/ (from
MLX's source) to compile against it, else a prelude with the same CUDA includes is used.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kernelevo.lowering import LoweredKernel
from kernelevo.lowering.cuda import MLX_PRELUDE, mlx_source

STAND_IN_PRELUDE = "\n#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n\n#include <cooperative_groups.h>\n\n"
ARCH = "sm_90a"


def _find_nvrtc() -> str | None:
    try:
        import nvidia

        for base in nvidia.__path__:
            found = sorted(glob.glob(os.path.join(base, "cu*", "lib", "libnvrtc.so.*")))
            found = [f for f in found if "builtins" not in f and "alt" not in f]
            if found:
                return found[0]
    except ImportError:
        pass
    return None


def _cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_fp16.h").exists():
            return Path(candidate)
    return None


def available() -> bool:
    return _find_nvrtc() is not None and _cuda_home() is not None and (
        shutil.which("ptxas") or (_cuda_home() / "bin" / "ptxas").exists())


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_bytes: int  # spill stores + loads
    stack_bytes: int
    static_smem: int


def compile_kernel(kernel: LoweredKernel, input_dtypes: tuple[str, ...]) -> Resources:
    """NVRTC-compiles the kernel as MLX would, then assembles its PTX with ptxas -v."""
    path = _find_nvrtc()
    for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
        if "alt" not in builtins:  # NVRTC dlopens it by name; load it first
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    home = _cuda_home()
    mlx_headers = os.environ.get("KERNELEVO_MLX_CUDA_INCLUDE")
    prelude = MLX_PRELUDE if mlx_headers else STAND_IN_PRELUDE
    func, source = mlx_source(kernel, input_dtypes, prelude=prelude)
    includes = [str(home / "include"), str(home / "include" / "cccl")] + ([mlx_headers] if mlx_headers else [])
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None))
    name = f"mlx::core::cu::{func}".encode()
    _check(lib, lib.nvrtcAddNameExpression(prog, name))
    options = [b"--device-as-default-execution-space", f"--gpu-architecture=compute_{ARCH[3:]}".encode()]
    options += [f"--include-path={p}".encode() for p in includes]
    arr = (ctypes.c_char_p * len(options))(*options)
    rc = lib.nvrtcCompileProgram(prog, len(options), arr)
    if rc != 0:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed for {kernel.name}:\n{log.value.decode()[-8000:]}")
    size = ctypes.c_size_t()
    _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
    ptx = ctypes.create_string_buffer(size.value)
    _check(lib, lib.nvrtcGetPTX(prog, ptx))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    ptxas = shutil.which("ptxas") or str(home / "bin" / "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_bytes(ptx.value)
        result = subprocess.run([ptxas, f"-arch={ARCH}", "-v", "-o", str(Path(tmp) / "k.cubin"), str(path)],
                                capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ptxas failed for {kernel.name}:\n{result.stderr[-4000:]}")
    report = result.stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    stores = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    stack = re.search(r"(\d+) bytes stack frame", report)
    smem = re.search(r"(\d+) bytes smem", report)
    return Resources(regs, int(stores.group(1)) + int(stores.group(2)) if stores else 0,
                     int(stack.group(1)) if stack else 0, int(smem.group(1)) if smem else 0)


def _check(lib, rc: int) -> None:
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {rc}: {lib.nvrtcGetErrorString(rc).decode()}")
