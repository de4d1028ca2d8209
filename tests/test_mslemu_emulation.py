"""The emulation itself: MSL types, layouts, SIMD-group semantics, Apple's simdgroup_matrix
lane layout, atomics, dispatch geometry and input binding, each against an independent
expectation (numpy, MLX, or the definition in the MSL specification)."""

import mlx.core as mx
import numpy as np
import pytest

import mslemu
from mslemu import prelude
from test_mslemu_source import CASES


def run1(source, inputs, n_out, dtype=mx.float32, input_names=None, grid=None, threadgroup=(32, 1, 1), **kw):
    names = input_names or [f"in{i}" for i in range(len(inputs))]
    k = mslemu.metal_kernel(name="t", input_names=names, output_names=["out"], source=source)
    (out,), stats = k(inputs=inputs, grid=grid or (n_out, 1, 1), threadgroup=threadgroup,
                      output_shapes=[(n_out,)], output_dtypes=[dtype], **kw)
    return out, stats


SPECIAL_FLOATS = np.array(
    [0.0, -0.0, 1.0, 65504.0, 65520.0, 65519.99, 1e-8, 6.1e-5, 5.96e-8, 2.98e-8, 2.9802326e-08,
     1.0009765625, 1.00048828125, 1.00146484375, 3.3895314e38, np.inf, -np.inf, np.nan, 1 + 2**-8, 1 + 3 * 2**-9,
     -1.00390625, 1.3e-39],
    dtype=np.float32,
)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_float_to_half_and_bfloat_round_to_nearest_even(dtype, rng):
    x = np.concatenate([SPECIAL_FLOATS, rng.standard_normal(200).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 200)])
    x = x.astype(np.float32)
    out, _ = run1("uint i = thread_position_in_grid.x; out[i] = T(x[i]);", [mx.array(x)], len(x), dtype,
                  input_names=["x"], template=[("T", dtype)])
    expect = mx.array(x).astype(dtype)  # MLX's own round-to-nearest-even conversion
    got_bits, expect_bits = np.array(out.view(mx.uint16)), np.array(expect.view(mx.uint16))
    nan = np.isnan(x)
    assert np.array_equal(got_bits[~nan], expect_bits[~nan])
    assert np.all(np.isnan(np.array(out.astype(mx.float32))[nan]))


def test_vector_layout_matches_metal():
    source = """
    uint i = thread_position_in_grid.x;
    if (i == 0) {
        int sizes[] = {int(sizeof(float2)), int(sizeof(float3)), int(sizeof(float4)), int(sizeof(half3)),
                       int(sizeof(half4)), int(sizeof(bfloat2)), int(sizeof(uint3)), int(alignof(float3)),
                       int(alignof(half4)), int(sizeof(long3)), int(sizeof(bool4)), int(sizeof(half))};
        for (int k = 0; k < 12; k++) out[k] = sizes[k];
    }
"""
    out, _ = run1(source, [mx.zeros((8,))], 12, mx.int32, input_names=["unused"], grid=(1, 1, 1))
    assert np.array(out).tolist() == [8, 16, 16, 8, 8, 4, 16, 16, 8, 32, 4, 2]


def test_vectors_swizzles_and_as_type():
    source = """
    uint i = thread_position_in_grid.x;
    float4 v = float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
    float4 w = float4(v.zyx, 1.0f) * 2.0f + v.wwww;   // swizzle reads
    w.xy = v.yx;                                          // swizzle write
    w.z += dot(v.xy, float2(1.0f, 10.0f));
    uint2 bits = as_type<uint2>(half4(v));
    half4 back = as_type<half4>(bits);
    float4 h = float4(back) + select(float4(0.0f), float4(100.0f), v > 2.5f);
    for (int k = 0; k < 4; k++) out[8 * i + k] = w[k];
    for (int k = 0; k < 4; k++) out[8 * i + 4 + k] = h[k];
"""
    x = np.arange(8, dtype=np.float32) * 0.75
    out, _ = run1(source, [mx.array(x)], 16, input_names=["x"], grid=(2, 1, 1))
    out = np.array(out).reshape(2, 8)
    for i in range(2):
        v = x[4 * i:4 * i + 4]
        w = np.array([v[1], v[0], v[0] * 2 + v[3] + v[0] + 10 * v[1], 2 + v[3]])
        h = v.astype(np.float16).astype(np.float32) + np.where(v > 2.5, 100, 0)
        assert np.allclose(out[i, :4], w) and np.allclose(out[i, 4:], h)


def test_simd_shuffles_scans_and_votes_follow_msl():
    source = """
    uint i = thread_position_in_grid.x, lane = thread_index_in_simdgroup;
    float v = x[i];
    out[8 * i + 0] = simd_shuffle_down(v, 5);      // upper 5 lanes keep their own value
    out[8 * i + 1] = simd_shuffle_up(v, 3);        // lower 3 lanes keep their own value
    out[8 * i + 2] = simd_shuffle_xor(v, 6);
    out[8 * i + 3] = simd_broadcast(v, 17);
    out[8 * i + 4] = simd_prefix_exclusive_sum(v);
    out[8 * i + 5] = simd_prefix_inclusive_sum(v);
    out[8 * i + 6] = float(uint64_t(simd_ballot(v > 40.0f)) & 0xffffffffu);
    out[8 * i + 7] = simd_shuffle_and_fill_down(v, -v, 4, 8);
"""
    x = np.arange(64, dtype=np.float32)
    out, st = run1(source, [mx.array(x)], 64 * 8, input_names=["x"], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    out = np.array(out).reshape(64, 8)
    lanes = np.arange(32)
    for sg in range(2):
        v = x[32 * sg:32 * sg + 32]
        o = out[32 * sg:32 * sg + 32]
        assert np.array_equal(o[:, 0], np.where(lanes + 5 < 32, v[np.minimum(lanes + 5, 31)], v))
        assert np.array_equal(o[:, 1], np.where(lanes >= 3, v[np.maximum(lanes - 3, 0)], v))
        assert np.array_equal(o[:, 2], v[lanes ^ 6])
        assert np.all(o[:, 3] == v[17])
        assert np.array_equal(o[:, 4], np.cumsum(v) - v)
        assert np.array_equal(o[:, 5], np.cumsum(v))
        assert np.all(o[:, 6] == float(sum(1 << l for l in lanes if v[l] > 40)))
        group, pos = lanes // 8 * 8, lanes % 8 + 4
        fill = np.where(pos < 8, v[group + pos % 8], -v[group + pos % 8])
        assert np.array_equal(o[:, 7], fill)
    assert st.simd_collectives == 2 * 8


def test_partial_simdgroup_reduces_over_existing_lanes():
    # a threadgroup of 40 threads: simdgroup 1 has 8 lanes
    out, _ = run1("uint i = thread_position_in_grid.x; out[i] = simd_sum(x[i]);",
                  [mx.array(np.ones(40, np.float32))], 40, input_names=["x"], threadgroup=(40, 1, 1))
    assert np.array(out).tolist() == [32.0] * 32 + [8.0] * 8


MLX_FRAGMENT = """
    // MLX's steel BaseMMAFrag::get_coord: lane -> (row fm, columns fn, fn + 1)
    const ushort lane = thread_index_in_simdgroup;
    const short qid = lane / 4;
    const short fm = (qid & 4) + ((lane / 2) % 4);
    const short fn = (qid & 2) * 2 + (lane % 2) * 2;
"""


def test_simdgroup_matrix_lane_layout_is_mlx_fragment_layout(rng):
    """Fill thread_elements() the way MLX's steel GEMM does and store with
    simdgroup_store: the stored matrix must be the source, so the emulated lane layout
    is the one MLX (run on Apple GPUs) relies on."""
    m = rng.standard_normal(64).astype(np.float32)
    source = MLX_FRAGMENT + """
    simdgroup_matrix<float, 8, 8> frag;
    frag.thread_elements()[0] = a[fm * 8 + fn];
    frag.thread_elements()[1] = a[fm * 8 + fn + 1];
    simdgroup_store(frag, out, 8);
"""
    out, _ = run1(source, [mx.array(m)], 64, input_names=["a"], grid=(32, 1, 1))
    assert np.array_equal(np.array(out), m)


def test_simdgroup_load_store_origin_transpose_and_mma(rng):
    a = rng.standard_normal((16, 12)).astype(np.float32)
    b = rng.standard_normal((16, 12)).astype(np.float32)
    source = MLX_FRAGMENT + """
    simdgroup_float8x8 A, B, C, D;
    simdgroup_load(A, a, 12, ulong2(4, 8));         // rows 8..15, columns 4..11
    simdgroup_load(B, b, 12, ulong2(2, 3), true);   // transpose of rows 3..10, columns 2..9
    C = simdgroup_float8x8(2.0f);                    // 2 on the diagonal
    simdgroup_multiply_accumulate(D, A, B, C);
    simdgroup_store(D, out, 8);
    simdgroup_store(A, out + 64, 8, ulong2(0, 0), true);
"""
    out, st = run1(source, [mx.array(a), mx.array(b)], 128, input_names=["a", "b"], grid=(32, 1, 1))
    out = np.array(out)
    A = a[8:16, 4:12].astype(np.float64)
    B = b[3:11, 2:10].T.astype(np.float64)
    assert np.allclose(out[:64].reshape(8, 8), A @ B + 2 * np.eye(8), rtol=1e-5, atol=1e-5)
    assert np.array_equal(out[64:].reshape(8, 8), a[8:16, 4:12].T)
    assert st.mma == 1


def test_device_atomics_histogram(rng):
    values = rng.integers(0, 10, 1000).astype(np.int32)
    k = mslemu.metal_kernel(name="hist", input_names=["v"], output_names=["h"], atomic_outputs=True, source="""
        atomic_fetch_add_explicit(&h[v[thread_position_in_grid.x]], 1, memory_order_relaxed);
    """)
    for schedule in ("forward", "random"):
        (h,), st = k(inputs=[mx.array(values)], grid=(1000, 1, 1), threadgroup=(128, 1, 1), output_shapes=[(10,)],
                     output_dtypes=[mx.int32], init_value=0, schedule=schedule)
        assert np.array_equal(np.array(h), np.bincount(values, minlength=10))
        assert st.atomics == 1000


def test_threadgroup_atomics_and_float_atomics(rng):
    x = rng.standard_normal(256).astype(np.float32)
    source = """
    threadgroup atomic_uint count;
    threadgroup atomic_float total;
    uint t = thread_position_in_threadgroup.x;
    if (t == 0) {
        atomic_store_explicit(&count, 0u, memory_order_relaxed);
        atomic_store_explicit(&total, 0.0f, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float v = x[thread_position_in_grid.x];
    if (v > 0.0f) atomic_fetch_add_explicit(&count, 1u, memory_order_relaxed);
    atomic_fetch_add_explicit(&total, v, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t == 0) {
        out[2 * threadgroup_position_in_grid.x] = float(atomic_load_explicit(&count, memory_order_relaxed));
        out[2 * threadgroup_position_in_grid.x + 1] = atomic_load_explicit(&total, memory_order_relaxed);
    }
"""
    out, _ = run1(source, [mx.array(x)], 8, input_names=["x"], grid=(256, 1, 1), threadgroup=(64, 1, 1))
    out = np.array(out).reshape(4, 2)
    groups = x.reshape(4, 64)
    assert np.array_equal(out[:, 0], (groups > 0).sum(axis=1))
    assert np.allclose(out[:, 1], groups.astype(np.float64).sum(axis=1), atol=1e-4)


def test_ragged_grid_dispatch_geometry():
    """MLX dispatches threads, not threadgroups: a grid of 50 x 3 with 16 x 2 threadgroups
    has ragged edge threadgroups whose threads_per_threadgroup is their actual size."""
    source = """
    uint3 g = thread_position_in_grid;
    uint idx = g.y * 50 + g.x;
    out[4 * idx + 0] = threads_per_threadgroup.x * 10 + threads_per_threadgroup.y;
    out[4 * idx + 1] = threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y;
    out[4 * idx + 2] = thread_index_in_threadgroup;
    out[4 * idx + 3] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
"""
    out, st = run1(source, [mx.zeros((8,))], 150 * 4, mx.uint32, input_names=["unused"], grid=(50, 3, 1),
                   threadgroup=(16, 2, 1))
    o = np.array(out).reshape(3, 50, 4)
    xs, ys = np.meshgrid(np.arange(50), np.arange(3))
    size_x, size_y = np.where(xs >= 48, 2, 16), np.where(ys >= 2, 1, 2)
    assert np.array_equal(o[..., 0], size_x * 10 + size_y)
    assert np.array_equal(o[..., 1], xs // 16 * 10 + ys // 2)
    assert np.array_equal(o[..., 2], (ys % 2) * size_x + xs % 16)
    assert np.all(o[..., 3] == 42)
    assert st.threadgroups == 8 and st.threads == 150


def test_strided_input_without_row_contiguous_copy(rng):
    base = rng.standard_normal((6, 10)).astype(np.float32)
    view = base[::2, 1::3]  # 3 x 3, strides (20, 3) in elements
    k = mslemu.metal_kernel(name="strided", input_names=["a"], output_names=["out"], ensure_row_contiguous=False,
                            source="""
        uint i = thread_position_in_grid.x;
        out[i] = a[elem_to_loc(i, a_shape, a_strides, a_ndim)];
    """)
    (out,), _ = k(inputs=[view], grid=(9, 1, 1), threadgroup=(9, 1, 1), output_shapes=[(9,)],
                  output_dtypes=[mx.float32])
    assert np.array_equal(np.array(out), view.reshape(-1))


def test_sources_from_the_mlx_comparison_compile_and_run():
    """The MLX-generated sources of test_mslemu_source run; the one MLX writes with a
    broken signature does not compile, as it would not under Metal."""
    for name, (kernel_args, call_args) in CASES.items():
        k = mslemu.metal_kernel(**kernel_args)
        if name == "mlx_quirk_shape_with_two_outputs":
            with pytest.raises(mslemu.CompileError):
                k(**call_args)
        else:
            outs, _ = k(**call_args)
            assert len(outs) == len(kernel_args["output_names"])


def test_repeated_dispatches_reuse_the_build():
    source = "uint i = thread_position_in_grid.x; out[i] = x[i] + 1;"
    k = mslemu.metal_kernel(name="cached", input_names=["x"], output_names=["out"], source=source)
    call = dict(grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float32])
    k(inputs=[mx.zeros((8,))], **call)
    (out,), st = k(inputs=[mx.ones((8,))], **call)
    assert st.compile_seconds == 0.0
    assert np.array(out).tolist() == [2.0] * 8


def test_portable_ucontext_fibers_match_the_x86_switch(rng):
    """Hosts other than x86-64 switch fibers with ucontext; x86-64 runs that path too."""
    x = rng.standard_normal(512).astype(np.float32)
    source = """
    threadgroup float partial[4];
    uint i = thread_position_in_grid.x;
    float v = simd_sum(x[i]);
    if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = partial[(simdgroup_index_in_threadgroup + 1) % 4] + v;
"""
    runs = [run1(source, [mx.array(x)], 512, input_names=["x"], threadgroup=(128, 1, 1), schedule="random",
                 context_switch=cs) for cs in ("auto", "ucontext")]
    (a, sa), (b, sb) = runs
    assert np.array_equal(np.array(a), np.array(b))
    assert (sa.simd_collectives, sa.threadgroup_barriers) == (sb.simd_collectives, sb.threadgroup_barriers) == (16, 4)
    sums = x.reshape(16, 32).astype(np.float64).sum(axis=1)
    expect = np.repeat(sums + sums.reshape(4, 4)[:, [1, 2, 3, 0]].reshape(-1), 32)
    assert np.allclose(np.array(a), expect, atol=1e-4)
    with pytest.raises(mslemu.DeadlockError):
        run1("if (thread_index_in_threadgroup > 3) return;\nthreadgroup_barrier(mem_flags::mem_none);\nout[0] = 1;",
             [mx.zeros((8,))], 1, input_names=["unused"], grid=(64, 1, 1), context_switch="ucontext")


STEEL_GEMM = mslemu.metal_kernel(
    name="steel_gemm",
    input_names=["A", "B", "dims"],
    output_names=["D"],
    header=prelude.expand_mlx_header("mlx/backend/metal/kernels/steel/gemm/gemm.h"),
    source="""
    using namespace mlx::steel;
    using gemm_kernel = GEMMKernel<T, T, BM, BN, BK, WM, WN, false, TRANSPOSE_B, MN_ALIGNED, K_ALIGNED>;
    threadgroup T As[gemm_kernel::tgp_mem_size_a];
    threadgroup T Bs[gemm_kernel::tgp_mem_size_b];
    const int M = dims[0], N = dims[1], K = dims[2];
    const GEMMParams params{M, N, K, K, TRANSPOSE_B ? K : N, N, (N + BN - 1) / BN, (M + BM - 1) / BM,
                            0, 0, 0, 0, K / BK, 0};
    gemm_kernel::run(A, B, D, &params, As, Bs, thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
                     threadgroup_position_in_grid, thread_position_in_threadgroup);
""",
)


@pytest.mark.parametrize("dtype,m,n,k,transpose_b", [
    (mx.float32, 64, 64, 64, False),
    (mx.bfloat16, 67, 45, 83, False),
    (mx.float16, 40, 72, 48, True),
])
def test_mlx_steel_gemm_runs_in_the_emulator(dtype, m, n, k, transpose_b, rng):
    """MLX's production GEMM (steel GEMMKernel: fragments loaded by lane coordinates,
    simdgroup MMAs on thread_elements) is correct on Apple GPUs; run here with the
    emulator's types and lane layout it must match float64 too."""
    bm, bn, bk, wm, wn = 32, 32, 16, 2, 2
    a = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)).astype(dtype)
    (d,), st = STEEL_GEMM(
        inputs=[a, b, mx.array([m, n, k], dtype=mx.int32)],
        template=[("T", dtype), ("BM", bm), ("BN", bn), ("BK", bk), ("WM", wm), ("WN", wn),
                  ("TRANSPOSE_B", transpose_b), ("MN_ALIGNED", m % bm == 0 and n % bn == 0),
                  ("K_ALIGNED", k % bk == 0)],
        grid=(-(-n // bn) * wm * wn * 32, -(-m // bm), 1), threadgroup=(wm * wn * 32, 1, 1),
        output_shapes=[(m, n)], output_dtypes=[dtype])
    a64 = np.array(a.astype(mx.float32)).astype(np.float64)
    b64 = np.array(b.astype(mx.float32)).astype(np.float64)
    ref = a64 @ (b64.T if transpose_b else b64)
    err = np.abs(np.array(d.astype(mx.float32)) - ref).max() / np.abs(ref).max()
    assert err < {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}[dtype]
    assert st.mma == -(-m // bm) * -(-n // bn) * -(-k // bk) * (bk // 8) * (bm // 8) * (bn // 8)
