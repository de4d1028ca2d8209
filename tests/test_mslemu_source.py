"""The emulator runs exactly the kernel source MLX would JIT-compile.

MLX generates that source (signature, extras, attributes, template instantiation) in
`mx.fast.metal_kernel`; on a machine without Metal it still does so while
`mx.export_function` traces a call, and prints it with verbose=True. Each case here
compares the emulator's source with MLX's, character for character. The prelude MLX
prepends (`metal::utils()`, built into libmlx on macOS only) is rebuilt from the headers
in the wheel by the rules of MLX's make_compiled_preamble.sh; its test checks those rules.
"""

import re

import mlx.core as mx
import pytest

import mslemu
from mslemu import mlx_source, prelude

ATTRS_BODY = """
    uint3 g = thread_position_in_grid;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint3 tg = threadgroup_position_in_grid;
    uint3 tpt = threads_per_threadgroup;
    uint w = threads_per_simdgroup + thread_execution_width + quadgroup_index_in_threadgroup;
    uint n = a_ndim + a_shape[0] + uint(a_strides[0]);
    out[g.x] = T(a[g.x] * N) + T(lane + sg + tg.x + tpt.x + w + n + uint(B));
"""

CASES = {
    "plain": (
        dict(name="plain", input_names=["x"], output_names=["y"],
             source="uint i = thread_position_in_grid.x;\ny[i] = x[i] * 2;"),
        dict(inputs=[mx.zeros((16,))], output_shapes=[(16,)], output_dtypes=[mx.float32], grid=(16, 1, 1),
             threadgroup=(16, 1, 1)),
    ),
    "templates_attributes_extras": (
        dict(name="attrs", input_names=["a", "s", "c"], output_names=["out"], source=ATTRS_BODY,
             header="template <typename T> T twice(T v) { return v + v; }\n"),
        dict(inputs=[mx.zeros((4, 5), dtype=mx.bfloat16), 3.0, mx.zeros((3,), dtype=mx.int32)],
             output_shapes=[(4, 5)], output_dtypes=[mx.bfloat16], grid=(20, 1, 1), threadgroup=(32, 1, 1),
             template=[("T", mx.bfloat16), ("N", 7), ("B", True)]),
    ),
    "half_uint_two_outputs": (
        dict(name="two", input_names=["p", "q"], output_names=["o1", "o2"],
             source="uint i = thread_position_in_grid.x; o1[i] = p[i]; o2[i] = q[i];"),
        dict(inputs=[mx.zeros((9,), dtype=mx.float16), mx.zeros((9,), dtype=mx.uint32)],
             output_shapes=[(9,), (9,)], output_dtypes=[mx.float16, mx.uint32], grid=(9, 1, 1),
             threadgroup=(9, 1, 1), template=[("U", mx.uint32)]),
    ),
    "atomic_outputs": (
        dict(name="hist", input_names=["v"], output_names=["h"], atomic_outputs=True,
             source="atomic_fetch_add_explicit(&h[v[thread_position_in_grid.x]], 1, memory_order_relaxed);"),
        dict(inputs=[mx.zeros((64,), dtype=mx.int32)], output_shapes=[(10,)], output_dtypes=[mx.int32],
             grid=(64, 1, 1), threadgroup=(64, 1, 1), init_value=0),
    ),
    # MLX decides where the parameter list ends by comparing the running buffer index
    # (which counts *_shape buffers) with inputs + outputs: with two outputs and a
    # `_shape` extra it closes the list after the first output. Reproduced as is.
    "mlx_quirk_shape_with_two_outputs": (
        dict(name="quirk", input_names=["a"], output_names=["o1", "o2"],
             source="o1[0] = a_shape[0]; o2[0] = 1;"),
        dict(inputs=[mx.zeros((8,))], output_shapes=[(1,), (1,)], output_dtypes=[mx.float32, mx.float32],
             grid=(1, 1, 1), threadgroup=(1, 1, 1)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_source_is_identical_to_mlx(case, tmp_path):
    kernel_args, call_args = CASES[case]
    expected = mlx_source.mlx_reference_source(kernel_args, call_args, tmp_path)
    k = mslemu.metal_kernel(**kernel_args)
    name, got = k.generated_source(inputs=call_args["inputs"], output_dtypes=call_args["output_dtypes"],
                                   template=call_args.get("template"))
    assert got == expected
    assert f"void {name}(" in got


def test_kernel_names_carry_types_and_how_inputs_are_passed():
    k = mslemu.metal_kernel(name="k", input_names=["a", "b", "c"], output_names=["o"], source="o[0] = 0;")
    name, _ = k.generated_source(inputs=[mx.zeros((8,)), 2, mx.zeros((2,), dtype=mx.float16)],
                                 output_dtypes=[mx.bfloat16], template=[("T", mx.float16), ("K", 3)])
    # 0-d inputs get "s", inputs of fewer than 8 elements (constant address space) "c"
    assert name == "custom_kernel_k__float16_t_3_float_int32_ts_float16_tc_bfloat16_t"


def test_prelude_follows_mlx_build_rules():
    text = prelude.mlx_utils()
    headers = re.findall(r'^#line 1 "(.*)"$', text, re.MULTILINE)
    # each header once, dependencies before the headers that include them, utils.h last
    assert headers[-1] == "mlx/backend/metal/kernels/utils.h"
    assert len(headers) == len(set(headers))
    assert headers.index("mlx/backend/metal/kernels/bf16.h") < headers.index("mlx/backend/metal/kernels/complex.h")
    for header in headers:
        body = (prelude.INCLUDE_ROOT / header).read_text()
        kept = [l for l in body.splitlines() if not re.search(r'#include ".*.h"|#pragma once', l)]
        assert "\n".join(kept) in text, header
    assert not re.search(r'#include ".*"', text)
    # the emulator's one change keeps every line where it was
    assert prelude.emulator_prelude().count("\n") == text.count("\n")
