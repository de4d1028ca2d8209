"""The kernel source exactly as `mx.fast.metal_kernel` writes it (MLX 0.32.4,
mlx/backend/common/metal_kernel.cpp): kernel name, `[[kernel]]` signature, body and
template instantiation. MLX JIT-compiles `metal::utils()` (see prelude.py) followed by
this text; tests/test_mslemu_source.py checks the two agree character for character.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Inputs with fewer elements than this are passed in the `constant` address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# The attributes MLX adds to the signature when their name occurs in the source, in its
# order, with their MSL types.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# MLX dtype -> (MSL type string as MLX spells it, numpy dtype holding the same bytes)
DTYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.float64: ("double", np.float64),
    mx.complex64: ("complex64_t", np.complex64),
    mx.bool_: ("bool", np.bool_),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
}
_FROM_NUMPY = {np.dtype(np_t): d for d, (_, np_t) in DTYPES.items() if d != mx.bfloat16}


def to_mx_dtype(dtype) -> mx.Dtype:
    """An MLX dtype from an MLX or numpy dtype (numpy has no bfloat16: use mx.bfloat16)."""
    if isinstance(dtype, mx.Dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype} cannot be passed to a Metal kernel")
        return dtype
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except (TypeError, KeyError):
        raise ValueError(f"unsupported dtype {dtype!r}; use an mx.Dtype such as mx.float32") from None


def type_string(dtype) -> str:
    return DTYPES[to_mx_dtype(dtype)][0]


@dataclass(frozen=True)
class ArgSpec:
    """What the signature needs to know about one input array."""

    dtype: mx.Dtype
    ndim: int
    size: int


def template_value(arg) -> tuple[str, str]:
    """(parameter kind, value as MLX prints it) for one template argument."""
    if isinstance(arg, bool):  # before int: bool is an int in Python
        return "bool", str(int(arg))
    if isinstance(arg, (int, np.integer)):
        return "int", str(int(arg))
    try:
        return "typename", type_string(arg)
    except ValueError:
        raise ValueError(f"template argument {arg!r} is not a bool, int or dtype") from None


def shape_infos(source: str, input_names) -> list[tuple[bool, bool, bool]]:
    """Whether the source uses `<name>_shape`, `<name>_strides`, `<name>_ndim`."""
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def used_attributes(source: str) -> list[tuple[str, str]]:
    return [(a, t) for a, t in ATTRIBUTES if a in source]


def kernel_name(name: str, inputs: list[ArgSpec], output_dtypes, template) -> tuple[str, str]:
    """MLX's kernel name and the template argument list `<...>` ("" without templates)."""
    kname = "custom_kernel_" + name
    template_def = ""
    if template:
        template_def = "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
        # make_template_hash: '<' and '>' become '_', ", " becomes '_', the last char dropped
        h = template_def.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]
        kname += "_" + h
    for a in inputs:
        kname += "_" + type_string(a.dtype)
        if a.ndim == 0:
            kname += "s"
        elif a.size < MAX_CONSTANT_ARRAY_SIZE:
            kname += "c"
    for d in output_dtypes:
        kname += "_" + type_string(d)
    return kname, template_def


def write_source(
    name: str,
    input_names,
    output_names,
    source: str,
    header: str,
    atomic_outputs: bool,
    inputs: list[ArgSpec],
    output_dtypes,
    template,
) -> tuple[str, str]:
    """(kernel name, kernel source) as MLX generates them for this call."""
    kname, template_def = kernel_name(name, inputs, output_dtypes, template)
    infos = shape_infos(source, input_names)
    attributes = used_attributes(source)
    out = [header]
    if template:
        out.append("template <" + ", ".join(f"{template_value(v)[0]} {n}" for n, v in template) + ">\n")
    out.append(f"[[kernel]] void {kname}(\n")
    index = 0
    for n, a, (has_shape, has_strides, has_ndim) in zip(input_names, inputs, infos):
        location = "constant" if a.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if a.ndim == 0 else "*"
        out.append(f"  const {location} {type_string(a.dtype)}{ref} {n} [[buffer({index})]],\n")
        index += 1
        if a.ndim > 0:
            if has_shape:
                out.append(f"  const constant int* {n}_shape [[buffer({index})]],\n")
                index += 1
            if has_strides:
                out.append(f"  const constant int64_t* {n}_strides [[buffer({index})]],\n")
                index += 1
            if has_ndim:
                out.append(f"  const constant int& {n}_ndim [[buffer({index})]],\n")
                index += 1
    for n, d in zip(output_names, output_dtypes):
        t = type_string(d)
        if atomic_outputs:
            t = f"atomic<{t}>"
        out.append(f"  device {t}* {n} [[buffer({index})]]")
        # MLX compares the running buffer index (which counts shape/stride buffers too)
        # with the number of inputs and outputs; reproduced as is.
        last = not (index < len(inputs) + len(output_names) - 1 or attributes)
        out.append(") {\n" if last else ",\n")
        index += 1
    for i, (a, t) in enumerate(attributes):
        out.append(f"  {t} {a} [[{a}]]")
        out.append(") {\n" if i == len(attributes) - 1 else ",\n")
    out.append(source)
    out.append("\n}\n")
    if template:
        full = kname + template_def
        out.append(f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({full}) {full};\n')
    return kname, "".join(out)


def mlx_reference_source(kernel_args: dict, call_args: dict, workdir) -> str:
    """The source MLX itself generates for a call, for comparison: `mx.fast.metal_kernel`
    called with `verbose=True` while `mx.export_function` traces it (without a Metal
    device MLX still builds the kernel there, and prints its source to fd 1)."""
    import os
    import re
    import tempfile
    from pathlib import Path

    kernel = mx.fast.metal_kernel(**kernel_args)
    inputs = call_args["inputs"]
    arrays = [x for x in inputs if isinstance(x, mx.array)]

    def traced(*arrs):
        it = iter(arrs)
        bound = [next(it) if isinstance(x, mx.array) else x for x in inputs]
        return kernel(**{**call_args, "inputs": bound, "verbose": True})

    with tempfile.TemporaryFile() as out:
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(str(Path(workdir) / "traced.mlxfn"), traced, *arrays)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        printed = out.read().decode()
    m = re.search(r"```\n(.*)\n```", printed, re.DOTALL)
    if not m:
        raise RuntimeError(f"MLX printed no kernel source:\n{printed}")
    return m.group(1)
