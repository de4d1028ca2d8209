"""Metal kernels of the kinds kernelevo generates, run in the MSL emulator: results against
an independent float64 reference in the dtype that runs, and the emulator's counters
against the analytic traffic of each kernel."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mslemu
from helpers import MX, TOL, f64, operand, relative_error

DTYPES = ["f32", "f16", "bf16"]


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16) if a.dtype in (mx.float16, mx.bfloat16) else a.view(mx.uint32))


# ---------------------------------------------------------------- elementwise

AXPBY = mslemu.metal_kernel(
    name="axpby",
    input_names=["x", "y", "alpha", "n"],
    output_names=["out"],
    source="""
    uint i = thread_position_in_grid.x;
    if (i < uint(n)) {
        out[i] = T(alpha * float(x[i]) + float(y[i]));
    }
""",
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_rounds_like_mlx(dtype, rng):
    n = 1003  # ragged: the last threadgroup is partial
    x, y = operand(rng, (n,), dtype), operand(rng, (n,), dtype)
    (out,), stats = AXPBY(inputs=[x, y, 1.7, n], template=[("T", MX[dtype])], grid=(n, 1, 1),
                          threadgroup=(256, 1, 1), output_shapes=[(n,)], output_dtypes=[MX[dtype]])
    ref = 1.7 * f64(x) + f64(y)
    assert relative_error(out, ref) < TOL[dtype]
    # The kernel computes in float and rounds once to T: bit-identical to MLX's rounding.
    expect = (mx.array(np.float32(1.7)) * x.astype(mx.float32) + y.astype(mx.float32)).astype(MX[dtype])
    assert np.array_equal(bits(out), bits(expect))
    item = x.itemsize
    assert stats.buffers["x"].bytes_read == n * item
    assert stats.buffers["y"].bytes_read == n * item
    assert stats.buffers["out"].bytes_written == n * item
    assert stats.device_bytes_read == 2 * n * item  # alpha and n are constants, not device memory
    assert stats.threadgroups == 4 and stats.threads == n


HALF_ARITH = mslemu.metal_kernel(
    name="half_arith",
    input_names=["a", "b"],
    output_names=["out"],
    source="""
    uint i = thread_position_in_grid.x;
    T x = a[i], y = b[i];
    T z = x * y + x;      // two rounded operations
    z -= y / x;
    out[i] = z;
""",
)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_and_bfloat_round_every_operation(dtype, rng):
    n = 512
    a = operand(rng, (n,), dtype) + 2.0
    b = operand(rng, (n,), dtype)
    (out,), _ = HALF_ARITH(inputs=[a, b], template=[("T", MX[dtype])], grid=(n, 1, 1), threadgroup=(128, 1, 1),
                           output_shapes=[(n,)], output_dtypes=[MX[dtype]])
    if dtype == "f16":
        x, y = np.array(a), np.array(b)  # numpy float16 rounds each operation too
        expect = (x * y + x) - y / x
        assert np.array_equal(np.array(out).view(np.uint16), expect.view(np.uint16))
    else:
        expect = (a * b + a) - b / a  # MLX computes bf16 ops in float, rounded per op
        assert np.array_equal(bits(out), bits(expect))


# ---------------------------------------------------------------- threadgroup reduction

ROW_SUM = mslemu.metal_kernel(
    name="row_sum",
    input_names=["x", "cols"],
    output_names=["out"],
    source="""
    threadgroup float partial[32];
    const uint row = threadgroup_position_in_grid.x;
    const uint tid = thread_position_in_threadgroup.x;
    float acc = 0.0f;
    for (int j = tid; j < cols; j += threads_per_threadgroup.x) {
        acc += float(x[row * cols + j]);
    }
    acc = simd_sum(acc);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (simdgroup_index_in_threadgroup == 0) {
        float v = thread_index_in_simdgroup < simdgroups_per_threadgroup ? partial[thread_index_in_simdgroup] : 0.0f;
        v = simd_sum(v);
        if (thread_index_in_simdgroup == 0) {
            out[row] = T(v);
        }
    }
""",
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,threads", [(7, 1000, 256), (3, 33, 96)])
def test_threadgroup_reduction(dtype, rows, cols, threads, rng):
    x = operand(rng, (rows, cols), dtype)
    (out,), st = ROW_SUM(inputs=[x, cols], template=[("T", MX[dtype])], grid=(rows * threads, 1, 1),
                         threadgroup=(threads, 1, 1), output_shapes=[(rows,)], output_dtypes=[MX[dtype]])
    ref = f64(x).sum(axis=1)
    assert relative_error(out, ref) < TOL[dtype] * math.sqrt(cols)
    nsimd = threads // 32
    assert st.buffers["x"].bytes_read == x.nbytes  # every element read exactly once
    assert st.buffers["out"].bytes_written == rows * x.itemsize
    assert st.threadgroup_barriers == rows
    assert st.simd_collectives == rows * (nsimd + 1)  # every simdgroup, then simdgroup 0 again
    assert st.threadgroup_memory == 32 * 4
    assert st.threadgroup_bytes_written == rows * nsimd * 4
    assert st.threadgroup_bytes_read == rows * nsimd * 4


# ---------------------------------------------------------------- softmax with simd_max/simd_sum

SOFTMAX = mslemu.metal_kernel(
    name="softmax",
    input_names=["x", "cols"],
    output_names=["out"],
    source="""
    threadgroup float scratch[32];
    const uint row = threadgroup_position_in_grid.x;
    const uint tid = thread_position_in_threadgroup.x;
    const uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
    const uint nsg = simdgroups_per_threadgroup;
    const device T* in = x + row * cols;

    float m = -INFINITY;
    for (int j = tid; j < cols; j += threads_per_threadgroup.x) m = max(m, float(in[j]));
    m = simd_max(m);
    if (lane == 0) scratch[sg] = m;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    m = simd_max(lane < nsg ? scratch[lane] : -INFINITY);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float s = 0.0f;
    for (int j = tid; j < cols; j += threads_per_threadgroup.x) s += fast::exp(float(in[j]) - m);
    s = simd_sum(s);
    if (lane == 0) scratch[sg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    s = simd_sum(lane < nsg ? scratch[lane] : 0.0f);

    const float inv = 1.0f / s;
    for (int j = tid; j < cols; j += threads_per_threadgroup.x) out[row * cols + j] = T(fast::exp(float(in[j]) - m) * inv);
""",
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(5, 257), (2, 4096)])
def test_softmax(dtype, rows, cols, rng):
    x = operand(rng, (rows, cols), dtype) * 3
    (out,), st = SOFTMAX(inputs=[x, cols], template=[("T", MX[dtype])], grid=(rows * 128, 1, 1),
                         threadgroup=(128, 1, 1), output_shapes=[(rows, cols)], output_dtypes=[MX[dtype]])
    xr = f64(x)
    e = np.exp(xr - xr.max(axis=1, keepdims=True))
    ref = e / e.sum(axis=1, keepdims=True)
    assert relative_error(out, ref) < TOL[dtype]
    assert np.allclose(f64(out).sum(axis=1), 1.0, atol=TOL[dtype] * 20)
    assert st.buffers["x"].bytes_read == 3 * x.nbytes  # three passes over the row
    assert st.buffers["x"].unique_bytes_read == x.nbytes
    assert st.threadgroup_barriers == 3 * rows


# ---------------------------------------------------------------- tiled GEMM with simdgroup_matrix

GEMM_SOURCE = """
    // C[M,N] = A[M,K] @ B[K,N]: a BM x BN tile per threadgroup, BK deep steps through
    // threadgroup memory, WM x WN simdgroups each owning (BM/WM) x (BN/WN) of 8x8 MMAs.
    constexpr int TM = BM / WM / 8, TN = BN / WN / 8, NT = WM * WN * 32;
    threadgroup T As[BM * BK];
    threadgroup T Bs[BK * BN];
    threadgroup float Cs[BM * BN];
    const int M = dims[0], N = dims[1], K = dims[2];
    const int tid = thread_index_in_threadgroup, sg = simdgroup_index_in_threadgroup;
    const int row0 = threadgroup_position_in_grid.y * BM, col0 = threadgroup_position_in_grid.x * BN;
    const int sm = (sg / WN) * TM * 8, sn = (sg % WN) * TN * 8;
    simdgroup_matrix<float, 8, 8> acc[TM][TN];
    for (int i = 0; i < TM; i++)
        for (int j = 0; j < TN; j++) acc[i][j] = make_filled_simdgroup_matrix<float, 8>(0.0f);
    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int e = tid; e < BM * BK; e += NT) {
            const int r = e / BK, c = e % BK;
            As[e] = (row0 + r < M && k0 + c < K) ? A[(row0 + r) * K + k0 + c] : T(0);
        }
        for (int e = tid; e < BK * BN; e += NT) {
            const int r = e / BN, c = e % BN;
            Bs[e] = (k0 + r < K && col0 + c < N) ? B[(k0 + r) * N + col0 + c] : T(0);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int kk = 0; kk < BK; kk += 8) {
            simdgroup_matrix<T, 8, 8> a[TM], b[TN];
            for (int i = 0; i < TM; i++) simdgroup_load(a[i], As, BK, ulong2(kk, sm + 8 * i));
            for (int j = 0; j < TN; j++) simdgroup_load(b[j], Bs, BN, ulong2(sn + 8 * j, kk));
            for (int i = 0; i < TM; i++)
                for (int j = 0; j < TN; j++) simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int i = 0; i < TM; i++)
        for (int j = 0; j < TN; j++) simdgroup_store(acc[i][j], Cs, BN, ulong2(sn + 8 * j, sm + 8 * i));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = tid; e < BM * BN; e += NT) {
        const int r = e / BN, c = e % BN;
        if (row0 + r < M && col0 + c < N) C[(row0 + r) * N + col0 + c] = T(Cs[e]);
    }
"""
GEMM = mslemu.metal_kernel(name="gemm", input_names=["A", "B", "dims"], output_names=["C"], source=GEMM_SOURCE)


def run_gemm(a, b, bm, bn, bk, wm, wn, **kw):
    (m, k), n = a.shape, b.shape[1]
    tiles_m, tiles_n = -(-m // bm), -(-n // bn)
    return GEMM(inputs=[a, b, mx.array([m, n, k], dtype=mx.int32)],
                template=[("T", a.dtype), ("BM", bm), ("BN", bn), ("BK", bk), ("WM", wm), ("WN", wn)],
                grid=(tiles_n * wm * wn * 32, tiles_m, 1), threadgroup=(wm * wn * 32, 1, 1),
                output_shapes=[(m, n)], output_dtypes=[a.dtype], **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,tile", [
    (64, 64, 64, (32, 32, 16, 2, 2)),
    (67, 45, 83, (32, 32, 16, 2, 2)),
    (33, 70, 19, (16, 32, 8, 1, 2)),
    (128, 96, 40, (64, 32, 16, 2, 1)),
])
def test_gemm_simdgroup_matrix(dtype, m, n, k, tile, rng):
    bm, bn, bk, wm, wn = tile
    a, b = operand(rng, (m, k), dtype), operand(rng, (k, n), dtype)
    (c,), st = run_gemm(a, b, *tile)
    ref = f64(a) @ f64(b)
    assert relative_error(c, ref) < TOL[dtype] * 2
    tiles_m, tiles_n, steps = -(-m // bm), -(-n // bn), -(-k // bk)
    # one 8x8x8 MMA per fragment pair per 8-deep slice, in every simdgroup
    assert st.mma == tiles_m * tiles_n * steps * (bk // 8) * (bm // 8) * (bn // 8)
    # each A element is read once per column of tiles, each B element once per row of tiles
    assert st.buffers["A"].bytes_read == tiles_n * a.nbytes
    assert st.buffers["B"].bytes_read == tiles_m * b.nbytes
    assert st.buffers["C"].bytes_written == st.buffers["C"].unique_bytes_written == m * n * c.itemsize
    assert st.threadgroup_memory == (bm * bk + bk * bn) * a.itemsize + bm * bn * 4
    assert st.threadgroup_barriers == tiles_m * tiles_n * (2 * steps + 1)


# ---------------------------------------------------------------- decode attention, GQA packed

DECODE = mslemu.metal_kernel(
    name="decode_attention",
    input_names=["q", "k", "v", "shape"],
    output_names=["o"],
    source="""
    // One simdgroup per KV head handles all G query heads that share it, so each K/V
    // element is read once per KV head. Lane owns dims lane and lane + 32 (D <= 64).
    const int kv_len = shape[0], D = shape[1], H = shape[2], Hkv = shape[3];
    const int G = H / Hkv;
    const int kvh = threadgroup_position_in_grid.x;
    const uint lane = thread_index_in_simdgroup;
    const float scale = rsqrt(float(D));
    float qv[MAXG][2], acc[MAXG][2], m[MAXG], l[MAXG];
    for (int g = 0; g < G; g++) {
        for (int c = 0; c < 2; c++) {
            const int d = lane + 32 * c;
            qv[g][c] = d < D ? float(q[(kvh * G + g) * D + d]) * scale : 0.0f;
            acc[g][c] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const device T* kh = k + kvh * kv_len * D;
    const device T* vh = v + kvh * kv_len * D;
    for (int j = 0; j < kv_len; j++) {
        float kk[2], vv[2];
        for (int c = 0; c < 2; c++) {
            const int d = lane + 32 * c;
            kk[c] = d < D ? float(kh[j * D + d]) : 0.0f;
            vv[c] = d < D ? float(vh[j * D + d]) : 0.0f;
        }
        for (int g = 0; g < G; g++) {
            const float s = simd_sum(qv[g][0] * kk[0] + qv[g][1] * kk[1]);
            const float m_new = max(m[g], s);
            const float alpha = exp(m[g] - m_new), p = exp(s - m_new);
            l[g] = l[g] * alpha + p;
            for (int c = 0; c < 2; c++) acc[g][c] = acc[g][c] * alpha + p * vv[c];
            m[g] = m_new;
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < 2; c++) {
            const int d = lane + 32 * c;
            if (d < D) o[(kvh * G + g) * D + d] = T(acc[g][c] / l[g]);
        }
""",
)


def attention_ref(q, k, v, causal):
    """float64 SDPA; q [H, L, D], k/v [Hkv, S, D], causal mask aligned to the end."""
    h, L, d = q.shape
    hkv, s, _ = k.shape
    kk, vv = np.repeat(k, h // hkv, axis=0), np.repeat(v, h // hkv, axis=0)
    scores = q @ kk.transpose(0, 2, 1) / math.sqrt(d)
    if causal:
        scores = np.where(np.arange(s)[None, :] <= np.arange(L)[:, None] + (s - L), scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    return (p / p.sum(axis=-1, keepdims=True)) @ vv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,kv_len,d", [(8, 2, 100, 64), (5, 1, 37, 48), (4, 4, 64, 32)])
def test_decode_attention_reads_kv_once_per_kv_head(dtype, h, hkv, kv_len, d, rng):
    q = operand(rng, (h, 1, d), dtype)
    k, v = operand(rng, (hkv, kv_len, d), dtype), operand(rng, (hkv, kv_len, d), dtype)
    (o,), st = DECODE(inputs=[q, k, v, mx.array([kv_len, d, h, hkv], dtype=mx.int32)],
                      template=[("T", MX[dtype]), ("MAXG", h // hkv)], grid=(32 * hkv, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(h, 1, d)], output_dtypes=[MX[dtype]])
    ref = attention_ref(f64(q), f64(k), f64(v), causal=False)
    assert relative_error(o, ref) < TOL[dtype]
    # the traffic floor: every K and V element once, every output once
    for name, arr in (("k", k), ("v", v), ("q", q)):
        assert st.buffers[name].bytes_read == st.buffers[name].unique_bytes_read == arr.nbytes
    assert st.buffers["o"].bytes_written == o.nbytes
    assert st.simd_collectives == hkv * kv_len * (h // hkv)


# ---------------------------------------------------------------- causal flash attention (prefill)

FLASH = mslemu.metal_kernel(
    name="flash_attention",
    input_names=["q", "k", "v", "shape"],
    output_names=["o"],
    source="""
    // Causal prefill: a threadgroup of BQ threads owns BQ query rows of one head; K/V go
    // through threadgroup memory BK rows at a time; blocks entirely above the diagonal
    // are skipped. Online softmax per row with float statistics.
    const int L = shape[0], S = shape[1], D = shape[2], H = shape[3], Hkv = shape[4];
    const int head = threadgroup_position_in_grid.y, kvh = head / (H / Hkv);
    const int q0 = threadgroup_position_in_grid.x * BQ, t = thread_index_in_threadgroup;
    const int i = q0 + t;  // this thread's query row
    const int offset = S - L;  // causal diagonal, aligned to the end
    threadgroup T Ks[BK * DMAX];
    threadgroup T Vs[BK * DMAX];
    float qv[DMAX], acc[DMAX], m = -INFINITY, l = 0.0f;
    const float scale = rsqrt(float(D));
    for (int d = 0; d < D; d++) {
        qv[d] = i < L ? float(q[(head * L + i) * D + d]) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    const int last_key = min(S, q0 + BQ + offset);  // keys past it are masked for the whole block
    for (int j0 = 0; j0 < last_key; j0 += BK) {
        for (int e = t; e < BK * D; e += BQ) {
            const int r = e / D, c = e % D;
            const bool in = j0 + r < S;
            Ks[r * DMAX + c] = in ? k[(kvh * S + j0 + r) * D + c] : T(0);
            Vs[r * DMAX + c] = in ? v[(kvh * S + j0 + r) * D + c] : T(0);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int r = 0; r < BK && j0 + r < S; r++) {
            if (i >= L || j0 + r > i + offset) break;
            float s = 0.0f;
            for (int d = 0; d < D; d++) s += qv[d] * float(Ks[r * DMAX + d]);
            const float m_new = max(m, s), alpha = exp(m - m_new), p = exp(s - m_new);
            l = l * alpha + p;
            for (int d = 0; d < D; d++) acc[d] = acc[d] * alpha + p * float(Vs[r * DMAX + d]);
            m = m_new;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (i < L) {
        for (int d = 0; d < D; d++) o[(head * L + i) * D + d] = T(acc[d] / l);
    }
""",
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,L,S,d", [(4, 2, 45, 45, 32), (2, 1, 20, 50, 16)])
def test_causal_flash_attention(dtype, h, hkv, L, S, d, rng):
    bq, bk = 16, 8
    q = operand(rng, (h, L, d), dtype)
    k, v = operand(rng, (hkv, S, d), dtype), operand(rng, (hkv, S, d), dtype)
    (o,), st = FLASH(inputs=[q, k, v, mx.array([L, S, d, h, hkv], dtype=mx.int32)],
                     template=[("T", MX[dtype]), ("BQ", bq), ("BK", bk), ("DMAX", d)],
                     grid=(-(-L // bq) * bq, h, 1), threadgroup=(bq, 1, 1),
                     output_shapes=[(h, L, d)], output_dtypes=[MX[dtype]])
    ref = attention_ref(f64(q), f64(k), f64(v), causal=True)
    assert relative_error(o, ref) < TOL[dtype]
    # Block skipping: a query block loads only the key blocks that reach its diagonal.
    keys_loaded = sum(min(S, -(-min(S, q0 + bq + S - L) // bk) * bk) for q0 in range(0, L, bq))
    assert st.buffers["k"].bytes_read == h * keys_loaded * d * k.itemsize
    assert st.buffers["v"].bytes_read == st.buffers["k"].bytes_read
    assert st.threadgroup_memory == 2 * bk * d * k.itemsize
