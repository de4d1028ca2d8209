"""Lowering: a KernelConfig and a call's features -> the GPU kernels that run it.

A lowered kernel is everything `kernelevo._ext.GpuLaunch` hands to MLX's `fast::cuda_kernel`
(or `fast::metal_kernel`): the body and header sources, input and output names, template
arguments, grid (in threads) and threadgroup, shared memory, output shapes and dtypes.
Problem sizes travel in a small int32 input (`sizes`), not as template arguments, so one
compiled kernel serves every shape of its configuration; the name carries every template
argument, so it is the compiled kernel's cache key.

Families that need more than one kernel (split-K, split decode) lower to a Plan: kernels
run in order, later ones reading earlier ones' outputs by name.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TemplateValue = int | bool | str  # str: an MLX dtype name (float16, bfloat16, float32, bool)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LoweredKernel:
    name: str
    backend: str  # cuda | metal
    source: str  # the kernel body
    header: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    template_args: tuple[tuple[str, TemplateValue], ...]
    grid: tuple[int, int, int]  # threads
    threadgroup: tuple[int, int, int]
    shared_memory: int  # bytes of dynamic shared memory (CUDA)
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]  # MLX dtype names
    sizes: tuple[int, ...] = ()  # the int32 `sizes` input, when input_names has it
    init_value: float | None = None
    ensure_row_contiguous: bool = True


@dataclass(frozen=True)
class Plan:
    """Kernels that together compute one op; `result` names the output that is the op's."""

    kernels: tuple[LoweredKernel, ...]
    result: str = "out"
    pending: Any = None  # what the op still applies after the kernels (an unfused epilogue)


def template_dir(backend: str) -> Path:
    """The installed templates (kernelevo/templates/<backend>), or in a source checkout the
    repository's <backend>/ folder."""
    for candidate in (_PACKAGE_DIR / "templates" / backend, _PACKAGE_DIR.parent.parent / backend):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kernelevo's {backend} kernel templates are not installed "
                            f"(looked in {_PACKAGE_DIR / 'templates' / backend})")


@lru_cache(maxsize=None)
def template(backend: str, *files: str) -> str:
    """The named template files, concatenated in order (a kernel's header)."""
    folder = template_dir(backend)
    return "\n".join((folder / f).read_text(encoding="utf-8") for f in files)


@lru_cache(maxsize=None)
def templates_hash(backend: str) -> str:
    """A digest of what decides a GPU kernel's code: the backend's template files and its
    lowering module. Measurements are keyed by it, so editing either retires them."""
    digest = hashlib.sha256()
    folder = template_dir(backend)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update((Path(__file__).parent / f"{backend}.py").read_bytes())
    return digest.hexdigest()[:16]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def f32_bits(x: float) -> int:
    """A float's bit pattern as an int32 (how f32 scalars ride in `sizes`)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]
