"""The planted-bug suite: each emulator check fires on a kernel with that bug, names the
line, and stays quiet on the corrected kernel. Kernels run in a subprocess, so crashes
and hangs become exceptions, never a dead pytest."""

import mlx.core as mx
import numpy as np
import pytest

import mslemu

N = 256
X = mx.array(np.arange(N, dtype=np.float32))


def kernel(name, source, **kw):
    return mslemu.metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source, **kw)


def run(k, *, n_out=N, threadgroup=(64, 1, 1), **kw):
    return k(inputs=[X], grid=(N, 1, 1), threadgroup=threadgroup, output_shapes=[(n_out,)],
             output_dtypes=[mx.float32], **kw)


def line_of(k, text):
    """1-based line of `text` in the generated source (the emulator reports those lines)."""
    _, src = k.generated_source(inputs=[X], output_dtypes=[mx.float32])
    hits = [i + 1 for i, line in enumerate(src.splitlines()) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def expect(error, k, marker, **kw):
    with pytest.raises(error) as info:
        run(k, **kw)
    assert info.value.line == line_of(k, marker), str(info.value)
    assert marker in info.value.code
    return info.value


# ---------------------------------------------------------------- out of bounds


def test_out_of_bounds_read_names_buffer_element_and_line():
    bad = kernel("oob_read", "uint i = thread_position_in_grid.x;\nout[i] = x[i + 1];  // reads x[256]")
    e = expect(mslemu.OutOfBoundsError, bad, "x[i + 1]")
    assert "buffer 'x'" in str(e) and "element 256 of 256" in str(e) and "read" in str(e)
    good = kernel("ib_read", "uint i = thread_position_in_grid.x;\nout[i] = x[min(i + 1, 255u)];")
    (out,), _ = run(good)
    assert np.array_equal(np.array(out), np.minimum(np.arange(N) + 1, 255))


def test_out_of_bounds_write_names_buffer_and_line():
    bad = kernel("oob_write", "uint i = thread_position_in_grid.x;\nout[i + 3] = x[i];  // writes past the end")
    e = expect(mslemu.OutOfBoundsError, bad, "out[i + 3]")
    assert "buffer 'out'" in str(e) and "write" in str(e)


def test_negative_index_is_out_of_bounds():
    bad = kernel("oob_under", "int i = int(thread_position_in_grid.x);\nout[i] = x[i - 1];  // x[-1]")
    e = expect(mslemu.OutOfBoundsError, bad, "x[i - 1]")
    assert "element -1 of 256" in str(e)


def test_threadgroup_out_of_bounds():
    bad = kernel("tg_oob", """
    threadgroup float tile[64];
    uint t = thread_position_in_threadgroup.x;
    tile[t + 1] = x[thread_position_in_grid.x];  // tile[64]
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = tile[t];
""")
    e = expect(mslemu.OutOfBoundsError, bad, "tile[t + 1]")
    assert "threadgroup variable 'tile'" in str(e)


# ---------------------------------------------------------------- uninitialised reads


def test_uninitialised_threadgroup_read():
    bad = kernel("uninit_tg", """
    threadgroup float tile[64];
    uint t = thread_position_in_threadgroup.x;
    if (t < 63) tile[t] = x[thread_position_in_grid.x];  // tile[63] never written
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = tile[63 - t];
""")
    e = expect(mslemu.UninitializedReadError, bad, "tile[63 - t]")
    assert "'tile'" in str(e) and "byte 252" in str(e)


def test_uninitialised_output_read():
    bad = kernel("uninit_out", "uint i = thread_position_in_grid.x;\nout[i] = out[(i + 1) % 256] + x[i];")
    e = expect(mslemu.UninitializedReadError, bad, "out[(i + 1) % 256]")
    assert "output 'out'" in str(e)
    # with an init_value the output starts defined
    good = kernel("init_out", "uint i = thread_position_in_grid.x;\nout[i] = out[i] + x[i];")
    (out,), _ = run(good, init_value=2.0)
    assert np.array_equal(np.array(out), np.arange(N) + 2.0)


# ---------------------------------------------------------------- missing barriers

RACE_RAW = """
    threadgroup float tile[64];
    uint t = thread_position_in_threadgroup.x;
    tile[t] = x[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tile[t] = tile[t] * 2.0f;
    BARRIER
    out[thread_position_in_grid.x] = tile[63 - t];  // reads a neighbour's update
"""


def test_missing_barrier_found_by_race_detector():
    bad = kernel("race_raw", RACE_RAW.replace("BARRIER", ""))
    e = expect(mslemu.RaceError, bad, "tile[t] = tile[t] * 2.0f")
    assert "missing barrier" in str(e) and "'tile'" in str(e)
    good = kernel("race_raw_fixed", RACE_RAW.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);"))
    (out,), _ = mslemu.run_schedules(good, inputs=[X], grid=(N, 1, 1), threadgroup=(64, 1, 1),
                                     output_shapes=[(N,)], output_dtypes=[mx.float32])
    x = np.arange(N).reshape(4, 64)
    assert np.array_equal(np.array(out), (2 * x[:, ::-1]).reshape(-1))


# A tiled loop missing the barrier at the end of each step: the next step's writes can
# overwrite values other threads have not read yet (write after read).
RACE_WAR = """
    threadgroup float tile[64];
    uint t = thread_position_in_threadgroup.x;
    float acc = 0.0f;
    for (int step = 0; step < 4; step++) {
        tile[t] = x[(thread_position_in_grid.x + 64 * step) % 256];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        acc += tile[(t + 1) % 64] * float(step + 1);
        BARRIER
    }
    out[thread_position_in_grid.x] = acc;
"""


def test_missing_barrier_write_after_read_found_by_race_detector():
    bad = kernel("race_war", RACE_WAR.replace("BARRIER", ""))
    e = expect(mslemu.RaceError, bad, "tile[t] = x[")
    assert "read it" in str(e)


def test_missing_barrier_found_by_schedule_comparison():
    """With the race detector off, the fiber order decides the result: forward and
    reverse order disagree."""
    call = dict(inputs=[X], grid=(N, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(N,)],
                output_dtypes=[mx.float32], race_check=False)
    bad = kernel("race_war", RACE_WAR.replace("BARRIER", ""))
    with pytest.raises(mslemu.ScheduleMismatchError) as info:
        mslemu.run_schedules(bad, **call)
    assert "'out'" in str(info.value)
    good = kernel("race_war_fixed", RACE_WAR.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);"))
    (out,), _ = mslemu.run_schedules(good, **call)
    xs = np.arange(N)
    expect_out = sum((step + 1) * ((xs // 64 * 64 + (xs + 1) % 64 + 64 * step) % 256) for step in range(4))
    assert np.array_equal(np.array(out), expect_out.astype(np.float32))


def test_simdgroup_barrier_orders_a_simdgroup_but_not_the_threadgroup():
    source = """
    threadgroup float tile[64];
    uint t = thread_position_in_threadgroup.x;
    tile[t] = x[thread_position_in_grid.x];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = tile[NEIGHBOUR];
"""
    within = kernel("simd_ok", source.replace("NEIGHBOUR", "t ^ 1"))  # same simdgroup
    (out,), st = run(within)
    assert np.array_equal(np.array(out), np.arange(N) ^ 1)
    assert st.simdgroup_barriers == 8
    across = kernel("simd_race", source.replace("NEIGHBOUR", "(t + 32) % 64"))  # the other simdgroup
    with pytest.raises((mslemu.RaceError, mslemu.UninitializedReadError)) as info:
        run(across)
    assert info.value.line == line_of(across, "(t + 32) % 64")


# ---------------------------------------------------------------- divergence and deadlock


def test_divergent_barrier():
    bad = kernel("div_barrier", """
    uint t = thread_position_in_threadgroup.x;
    float v = x[thread_position_in_grid.x];
    for (uint k = 0; k < (t < 32 ? 2u : 1u); k++) {
        v += 1.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);  // in loop
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // after loop
    out[thread_position_in_grid.x] = v;
""")
    with pytest.raises(mslemu.DivergenceError) as info:
        run(bad)
    msg = str(info.value)
    assert f":{line_of(bad, '// in loop')})" in msg and f":{line_of(bad, '// after loop')})" in msg
    assert "threads 0-31" in msg and "threads 32-63" in msg


def test_barrier_skipped_by_returning_threads_is_a_deadlock():
    bad = kernel("early_return", """
    uint t = thread_position_in_threadgroup.x;
    if (t >= 32) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // half the threadgroup is gone
    out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
""")
    e = expect(mslemu.DeadlockError, bad, "// half the threadgroup is gone")
    assert "threads 32-63 have returned" in str(e)


def test_divergent_collective():
    bad = kernel("div_simd", """
    float v = x[thread_position_in_grid.x];
    if (thread_index_in_simdgroup < 16) {
        v = simd_sum(v);
    } else {
        v = simd_max(v);
    }
    out[thread_position_in_grid.x] = v;
""")
    with pytest.raises(mslemu.DivergenceError) as info:
        run(bad)
    msg = str(info.value)
    assert "simd_sum" in msg and "simd_max" in msg
    assert f":{line_of(bad, 'simd_sum')})" in msg and f":{line_of(bad, 'simd_max')})" in msg


def test_spin_wait_deadlock_is_reported_with_its_line():
    bad = kernel("spin", """
    threadgroup atomic<int> flag;
    uint t = thread_position_in_threadgroup.x;
    if (t == 0) atomic_store_explicit(&flag, 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t == 63) atomic_store_explicit(&flag, 1, memory_order_relaxed);
    while (atomic_load_explicit(&flag, memory_order_relaxed) == 0) {}  // thread 0 spins first
    out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
""")
    e = expect(mslemu.DeadlockError, bad, "// thread 0 spins first", timeout=1.0, workers=1)
    assert "no progress" in str(e)


# ---------------------------------------------------------------- limits, crashes, compile errors


def test_threadgroup_memory_limit():
    bad = kernel("too_big", """
    threadgroup float a[4096];
    threadgroup float b[4096];  // 32 KiB + 16 KiB
    threadgroup float c[4096];
    uint t = thread_position_in_threadgroup.x;
    a[t] = b[t] = c[t] = 1.0f;
    out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
""")
    e = expect(mslemu.LimitError, bad, "threadgroup float c[4096];")
    assert "49152 bytes" in str(e) and "32768" in str(e)


def test_crashes_become_exceptions():
    wild = kernel("wild_pointer", """
    device float* p = (device float*)(uintptr_t(16));
    p[thread_position_in_grid.x] = 1.0f;  // not a buffer
    out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
""")
    with pytest.raises(mslemu.KernelCrash) as info:
        run(wild)
    assert info.value.line == line_of(wild, "// not a buffer")
    div = kernel("div_zero", """
    uint i = thread_position_in_grid.x;
    int d = int(x[i]) - int(x[i / 2 * 2]);  // zero for even i
    out[i] = float(int(i) / d);
""")
    e = expect(mslemu.KernelCrash, div, "out[i] = float(int(i) / d);")
    assert "division by zero" in str(e)


def test_stack_overflow_of_a_gpu_thread():
    deep = kernel("deep", """
    float big[100000];  // 400 KB of thread memory
    uint i = thread_position_in_grid.x;
    for (int j = 0; j < 100000; j++) big[j] = x[i] + j;
    out[i] = big[int(x[i]) * 391];
""")
    with pytest.raises(mslemu.KernelCrash) as info:
        run(deep)
    assert "stack overflow" in str(info.value)


def test_compile_error_points_at_the_kernel_line():
    bad = kernel("typo", "uint i = thread_position_in_grid.x;\nout[i] = x[i] + undefined_name;")
    with pytest.raises(mslemu.CompileError) as info:
        run(bad)
    assert info.value.line == line_of(bad, "undefined_name")
    assert "undefined_name" in str(info.value)


def test_threadgroup_variable_initializer_is_rejected():
    bad = kernel("tg_init", """
    threadgroup float tile[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    out[thread_position_in_grid.x] = tile[thread_position_in_grid.x % 4];
""")
    with pytest.raises(mslemu.CompileError, match="initializer on a threadgroup variable") as info:
        run(bad)
    assert info.value.line == line_of(bad, "threadgroup float tile[4]")


def test_msl_conversion_rules_are_enforced():
    """bfloat converts implicitly to float only (MSL 3.1), vectors never implicitly."""
    for body in ("bfloat b = x[0];", "float4 f = half4(1.0h);"):
        bad = kernel("implicit", f"uint i = thread_position_in_grid.x;\n{body}\nout[i] = x[i];")
        with pytest.raises(mslemu.CompileError) as info:
            run(bad)
        assert info.value.line == line_of(bad, body)


def test_bad_arguments_are_value_errors():
    k = kernel("ok", "out[thread_position_in_grid.x] = x[thread_position_in_grid.x];")
    with pytest.raises(ValueError, match="inputs"):
        k(inputs=[], grid=(N, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(N,)], output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="greater than the maximum"):
        k(inputs=[X], grid=(4096, 1, 1), threadgroup=(2048, 1, 1), output_shapes=[(N,)], output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="schedule"):
        run(k, schedule="sideways")
    with pytest.raises(ValueError, match="3-tuple"):
        k(inputs=[X], grid=(N, 1), threadgroup=(64, 1, 1), output_shapes=[(N,)], output_dtypes=[mx.float32])
