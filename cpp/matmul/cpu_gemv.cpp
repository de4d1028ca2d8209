// The gemv family: few rows of A (LLM decode). Memory-bound: B is read from memory exactly
// once, in its own layout, and never packed; A (small) is converted once to f32 rows.
//
// Each task owns a block of nb output columns. Within it, B is walked in depth chunks of
// kb that stay in L1 while every group of rows of A uses them.
//   B rows contiguous (x @ W, W stored [K, N]): tasks also own a part of the depth of kb
//     (partial sums added at the end); 4 rows of B at a time stream past the rows of A,
//     whose 4 x 4 coefficients stay in registers, into the task's f32 block.
//   B columns contiguous (x @ W.T, W stored [N, K]): tiles of up to 4 rows of A x 4 rows of
//     W, dot products along the depth in vector lanes, reduced once at the end.
// Either way the kernel reads 4 rows of B side by side and asks for the rows ahead of them
// in memory order (RowPrefetcher), so that the memory sees one stream per task.
#include <algorithm>
#include <vector>

#include "common/threadpool.h"
#include "matmul/cpu_kernels.h"

namespace kernelevo::cpu::detail {

namespace {

constexpr int kRowGroup = 4;  // rows of A per register tile
constexpr int kWRows = 4;     // rows of W per register tile (x @ W.T)
constexpr int kMaxParts = 64; // depth parts of x @ W (each keeps M x N partial sums)

// x @ W.T reads a tile of 4 rows of W side by side: 4 streams 2-8 KB apart, which the
// hardware prefetchers follow poorly (on the 2-core AMD EPYC, one thread: a 4-row tile read
// 10-12 GB/s, one row at a time 23-25, the tile reading ahead 22-24;
// benchmarks/probe_gemv_streams.cpp). So the
// kernel asks for the rows ahead of the tile itself, one after another in memory order, as
// fast as the tile consumes its own: to the memory the task is then one sequential stream.
// The distance ahead is at least this many bytes of whole tiles.
constexpr int64_t kPrefetchAheadBytes = 16384;

// Walks rows of W line by line, in memory order, asking for each line into L2.
struct RowPrefetcher {
  const char* row = nullptr;  // the row being asked for
  int64_t stride = 0, row_bytes = 0, offset = 0, rows_left = 0;
  void advance(int64_t bytes) {
    for (int64_t q = 0; q < bytes && rows_left > 0; q += 64) {
      __builtin_prefetch(row + offset, 0, 2);
      offset += 64;
      if (offset >= row_bytes) {
        offset = 0;
        row += stride;
        --rows_left;
      }
    }
  }
};

// part[i][jr] (vectors of partial sums, kWRows per row of A) += A[i, k0:k1] . W[jr, k0:k1], for MR rows of A and
// JR rows of W (W row jr at w + jr * ldw; depth k at w[k]). `ahead` (or null) is asked for
// as many bytes as each step reads.
template <typename E, int MR, int JR>
void cols_tile(const float* a, int64_t lda, const typename E::raw* w, int64_t ldw, int64_t k0,
               int64_t k1, float* part, RowPrefetcher* ahead) {
  constexpr int64_t step_bytes = JR * kLanes * sizeof(typename E::raw);
  vfloat acc[MR][JR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < JR; ++j) acc[i][j] = vload(part + (i * kWRows + j) * kLanes);
  for (int64_t k = k0; k < k1; k += kLanes) {
    if (ahead) ahead->advance(step_bytes);
    vfloat wv[JR];
    for (int j = 0; j < JR; ++j) wv[j] = load16<E>(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const vfloat av = vload(a + i * lda + k);
      for (int j = 0; j < JR; ++j) acc[i][j] += av * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < JR; ++j) vstore(part + (i * kWRows + j) * kLanes, acc[i][j]);
}

template <typename E, int JR>
void cols_tile_any(const float* a, int64_t lda, const typename E::raw* w, int64_t ldw,
                   int64_t k0, int64_t k1, float* part, int mr, RowPrefetcher* ahead) {
  switch (mr) {
    case 1: return cols_tile<E, 1, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    case 2: return cols_tile<E, 2, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    case 3: return cols_tile<E, 3, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    default: return cols_tile<E, 4, JR>(a, lda, w, ldw, k0, k1, part, ahead);
  }
}

#if defined(__AVX512BF16__)
// The bf16 x bf16 tile of x @ W.T on AVX512-BF16: A's rows kept as bf16 (what the call
// gave), one dot product of 32 pairs of W and A per instruction into f32 lanes, where the
// f32 path widens each half of W and multiplies it separately (on a 2-core AMD EPYC the
// widening made rows 2-16 compute-bound at 35-45% of the read bandwidth). Products are
// exact in f32; subnormal inputs count as zero (the instruction's rule, as in gemm's
// bf16dot engine). part as in cols_tile.
template <int MR, int JR>
void cols_tile_dot(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t ldw, int64_t k0,
                   int64_t k1, float* part, RowPrefetcher* ahead) {
  constexpr int64_t step_bytes = JR * 64;
  __m512 acc[MR][JR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < JR; ++j) acc[i][j] = _mm512_loadu_ps(part + (i * kWRows + j) * kLanes);
  for (int64_t k = k0; k < k1; k += 2 * kLanes) {
    if (ahead) ahead->advance(step_bytes);
    __m512bh wv[JR];
    for (int j = 0; j < JR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + i * lda + k);
      for (int j = 0; j < JR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < JR; ++j) _mm512_storeu_ps(part + (i * kWRows + j) * kLanes, acc[i][j]);
}

template <int JR>
void cols_tile_dot_any(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t ldw,
                       int64_t k0, int64_t k1, float* part, int mr, RowPrefetcher* ahead) {
  switch (mr) {
    case 1: return cols_tile_dot<1, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    case 2: return cols_tile_dot<2, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    case 3: return cols_tile_dot<3, JR>(a, lda, w, ldw, k0, k1, part, ahead);
    default: return cols_tile_dot<4, JR>(a, lda, w, ldw, k0, k1, part, ahead);
  }
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// Whether x @ W.T of this element type runs cols_tile_dot (reading A's bf16 rows).
template <typename E>
constexpr bool uses_bf16_dot() {
  return kBf16Dot && E::dtype == Dtype::bf16;
}

// out[i][0:width] += sum over k in [k0, k0 + KR) of A[i, k] * B[k, j0:j0 + width] for the
// rows i in [i0, i0 + MR): the MR x KR values of A stay in registers while the KR rows of B
// stream past once, front to back. `ahead` (or null) is asked for as many bytes as each
// step reads.
template <typename E, int MR, int KR>
void rows_sweep(const float* a, int64_t lda, const typename E::raw* b, int64_t brs, int64_t k0,
                int64_t width, float* out, RowPrefetcher* ahead) {
  constexpr int64_t step_bytes = KR * kLanes * sizeof(typename E::raw);
  vfloat coef[MR][KR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < KR; ++r) coef[i][r] = splat(a[i * lda + k0 + r]);
  const int64_t vec_end = width / kLanes * kLanes;
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    if (ahead) ahead->advance(step_bytes);
    vfloat bv[KR];
    for (int r = 0; r < KR; ++r) bv[r] = load16<E>(b + (k0 + r) * brs + j);
    for (int i = 0; i < MR; ++i) {
      vfloat o = vload(out + i * width + j);
      for (int r = 0; r < KR; ++r) o += coef[i][r] * bv[r];
      vstore(out + i * width + j, o);
    }
  }
  for (int64_t j = vec_end; j < width; ++j)  // the last few columns
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < KR; ++r) out[i * width + j] += a[i * lda + k0 + r] * to_f32<E>(b[(k0 + r) * brs + j]);
}

template <typename E, int KR>
void rows_sweep_any(const float* a, int64_t lda, const typename E::raw* b, int64_t brs,
                    int64_t k0, int64_t width, float* out, int mr, RowPrefetcher* ahead) {
  switch (mr) {
    case 1: return rows_sweep<E, 1, KR>(a, lda, b, brs, k0, width, out, ahead);
    case 2: return rows_sweep<E, 2, KR>(a, lda, b, brs, k0, width, out, ahead);
    case 3: return rows_sweep<E, 3, KR>(a, lda, b, brs, k0, width, out, ahead);
    default: return rows_sweep<E, 4, KR>(a, lda, b, brs, k0, width, out, ahead);
  }
}

// The rows [first, end) of a matrix whose row r is `width` elements at base + r * stride,
// asked for from `lead` rows ahead of `first`, where lead keeps whole groups of `group`
// rows and at least kPrefetchAheadBytes between the rows read and the rows asked for.
template <typename T>
RowPrefetcher rows_ahead(const T* base, int64_t stride, int64_t width, int64_t first,
                         int64_t end, int64_t group) {
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  const int64_t lead = group * ((kPrefetchAheadBytes + group * row_bytes - 1) / (group * row_bytes));
  return RowPrefetcher{reinterpret_cast<const char*>(base + (first + lead) * stride),
                       stride * static_cast<int64_t>(sizeof(T)), row_bytes, 0,
                       std::max<int64_t>(0, end - first - lead)};
}

// Depth [kbeg, kend) and columns [j0, j1) of B with contiguous rows (x @ W); out is
// M x (j1 - j0), zeroed. Four rows of B at a time stream past every group of rows of A,
// while the rows' pieces ahead are asked for in memory order (RowPrefetcher).
template <typename E>
void rows_block(const float* a, int64_t lda, const typename E::raw* b, int64_t brs,
                int64_t M, int64_t kbeg, int64_t kend, int64_t j0, int64_t j1, float* out) {
  const int64_t width = j1 - j0;
  const typename E::raw* bj = b + j0;
  RowPrefetcher ahead = rows_ahead(bj, brs, width, kbeg, kend, 4);
  int64_t k = kbeg;
  for (; k + 4 <= kend; k += 4)
    for (int64_t i0 = 0; i0 < M; i0 += kRowGroup)
      rows_sweep_any<E, 4>(a + i0 * lda, lda, bj, brs, k, width, out + i0 * width,
                           static_cast<int>(std::min<int64_t>(kRowGroup, M - i0)),
                           i0 == 0 ? &ahead : nullptr);
  for (; k < kend; ++k)
    for (int64_t i0 = 0; i0 < M; i0 += kRowGroup)
      rows_sweep_any<E, 1>(a + i0 * lda, lda, bj, brs, k, width, out + i0 * width,
                           static_cast<int>(std::min<int64_t>(kRowGroup, M - i0)), nullptr);
}

// Columns [j0, j1) of B with contiguous columns (rows of W, N of them); out is M x
// (j1 - j0). Groups of 4 rows of W are read once each, front to back, while the rows
// ahead are asked for in memory order (RowPrefetcher); within a depth chunk of kb, every
// group of rows of A uses the chunk from L1.
template <typename E>
void cols_block(const float* a, const uint16_t* a16, int64_t lda, const typename E::raw* w,
                int64_t ldw, int64_t M, int64_t N, int64_t K, int64_t j0, int64_t j1, int kb,
                float* out, float* part) {
  constexpr int JR = kWRows;
  constexpr int step = uses_bf16_dot<E>() ? 2 * kLanes : kLanes;  // depth per instruction
  const int64_t width = j1 - j0, k_vec = K / step * step;
  const int chunk = std::max(step, kb / step * step);
  RowPrefetcher ahead = rows_ahead(w, ldw, K, j0, N, JR);
  for (int64_t jr = 0; jr < width; jr += JR) {
    const int cols = static_cast<int>(std::min<int64_t>(JR, width - jr));
    const typename E::raw* wj = w + (j0 + jr) * ldw;
    std::fill(part, part + M * JR * kLanes, 0.0f);
    for (int64_t k0 = 0; k0 < k_vec; k0 += chunk) {
      const int64_t k1 = std::min<int64_t>(k_vec, k0 + chunk);
      for (int64_t i0 = 0; i0 < M; i0 += kRowGroup) {
        const int mr = static_cast<int>(std::min<int64_t>(kRowGroup, M - i0));
        float* pi = part + i0 * JR * kLanes;
        RowPrefetcher* pf = i0 == 0 ? &ahead : nullptr;  // once per depth step
#if defined(__AVX512BF16__)
        if constexpr (uses_bf16_dot<E>()) {
          const uint16_t* ai = a16 + i0 * lda;
          switch (cols) {
            case 1: cols_tile_dot_any<1>(ai, lda, wj, ldw, k0, k1, pi, mr, pf); break;
            case 2: cols_tile_dot_any<2>(ai, lda, wj, ldw, k0, k1, pi, mr, pf); break;
            case 3: cols_tile_dot_any<3>(ai, lda, wj, ldw, k0, k1, pi, mr, pf); break;
            default: cols_tile_dot_any<4>(ai, lda, wj, ldw, k0, k1, pi, mr, pf); break;
          }
          continue;
        }
#endif
        switch (cols) {
          case 1: cols_tile_any<E, 1>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr, pf); break;
          case 2: cols_tile_any<E, 2>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr, pf); break;
          case 3: cols_tile_any<E, 3>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr, pf); break;
          default: cols_tile_any<E, 4>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr, pf); break;
        }
      }
    }
    for (int64_t i = 0; i < M; ++i)
      for (int j = 0; j < cols; ++j) {
        float s = hsum(vload(part + (i * JR + j) * kLanes));
        for (int64_t k = k_vec; k < K; ++k) s += a[i * lda + k] * to_f32<E>(wj[j * ldw + k]);
        out[i * width + jr + j] = s;
      }
  }
}

template <typename E>
void gemv_typed(const GemmProblem& p, const GemvTiling& t) {
  using T = typename E::raw;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int threads = std::max(1, std::min(t.threads, available_cores()));
  // Rows of A a multiple of 4 KB apart alias in L1 (4 rows of 1024 floats read at 40% of
  // the speed of the same rows 64 bytes further apart): pad such a stride by a vector.
  int64_t lda = (K + kLanes - 1) / kLanes * kLanes;
  if (M > 1 && (lda * static_cast<int64_t>(sizeof(float))) % 4096 == 0) lda += kLanes;
  const int64_t col_tasks = (N + t.nb - 1) / t.nb;
  const bool rows_layout = p.b.col_stride == 1;
  // B stored [K, N]: tasks also split the depth, in parts of kb (at most kMaxParts parts),
  // so that a task streams whole rows of B front to back; the parts' sums are added at the
  // end.
  const int64_t parts = rows_layout ? std::min<int64_t>(kMaxParts, (K + t.kb - 1) / t.kb) : 1;
  const int64_t part_depth = (K + parts - 1) / parts;
  thread_local Scratch a_scratch, sums_scratch;
  float* apanel = a_scratch.get_as<float>(M * lda);
  thread_local Scratch a16_scratch;  // A's rows as bf16, for cols_tile_dot
  uint16_t* a16 = uses_bf16_dot<E>() ? a16_scratch.get_as<uint16_t>(M * lda) : nullptr;
  float* sums = parts > 1 ? sums_scratch.get_as<float>(parts * M * N) : nullptr;

  for (int64_t batch = 0; batch < p.batch; ++batch) {
    // A is small: once as f32 rows.
    const T* a = static_cast<const T*>(p.a.data) + p.a.batch_offsets[batch];
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k)
        apanel[i * lda + k] = to_f32<E>(a[i * p.a.row_stride + k * p.a.col_stride]);
    if constexpr (uses_bf16_dot<E>())
      for (int64_t i = 0; i < M; ++i)
        for (int64_t k = 0; k < K; ++k) a16[i * lda + k] = a[i * p.a.row_stride + k * p.a.col_stride];
    const T* b = static_cast<const T*>(p.b.data) + p.b.batch_offsets[batch];
    const int64_t brs = p.b.row_stride, bcs = p.b.col_stride;

    parallel_for(static_cast<int>(col_tasks * parts), threads, [&](int task, int) {
      thread_local Scratch out_scratch, part_scratch;
      const int64_t part = task % parts;
      const int64_t j0 = (task / parts) * static_cast<int64_t>(t.nb);
      const int64_t j1 = std::min<int64_t>(N, j0 + t.nb);
      const int64_t width = j1 - j0;
      float* out = out_scratch.get_as<float>(M * width);
      if (rows_layout) {
        const int64_t kbeg = part * part_depth, kend = std::min(K, kbeg + part_depth);
        std::fill(out, out + M * width, 0.0f);
        rows_block<E>(apanel, lda, b, brs, M, kbeg, kend, j0, j1, out);
      } else if (brs == 1) {
        float* partial = part_scratch.get_as<float>(M * kWRows * kLanes);
        cols_block<E>(apanel, a16, lda, b, bcs, M, N, K, j0, j1, t.kb, out, partial);
      } else {
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = j0; j < j1; ++j) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += apanel[i * lda + k] * to_f32<E>(b[k * brs + j * bcs]);
            out[i * width + j - j0] = s;
          }
      }
      if (parts == 1) {
        finalize_tile(p, batch, 0, j0, static_cast<int>(M), static_cast<int>(width), out, width,
                      t.fused);
      } else {
        for (int64_t i = 0; i < M; ++i)
          std::copy(out + i * width, out + (i + 1) * width, sums + (part * M + i) * N + j0);
      }
    });
    if (parts > 1) {
      // Add the parts' sums (into the first) and finish, a block of columns per task.
      parallel_for(static_cast<int>(col_tasks), threads, [&](int task, int) {
        const int64_t j0 = task * static_cast<int64_t>(t.nb), width = std::min<int64_t>(N - j0, t.nb);
        for (int64_t i = 0; i < M; ++i) {
          float* dst = sums + i * N + j0;
          for (int64_t q = 1; q < parts; ++q) {
            const float* src = sums + (q * M + i) * N + j0;
            for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
          }
        }
        finalize_tile(p, batch, 0, j0, static_cast<int>(M), static_cast<int>(width),
                      sums + j0, N, t.fused);
      });
    }
  }
  if (!t.fused && !p.epilogue.empty()) {
    const int64_t rows = p.batch * M;
    parallel_for(static_cast<int>(rows), threads,
                 [&](int r, int) { epilogue_pass(p, r, r + 1); });
  }
}

}  // namespace

void gemv(const GemmProblem& p, const GemvTiling& t) {
  switch (p.dtype) {
    case Dtype::f32: return gemv_typed<F32>(p, t);
    case Dtype::f16: return gemv_typed<F16>(p, t);
    case Dtype::bf16: return gemv_typed<BF16>(p, t);
  }
}

}  // namespace kernelevo::cpu::detail
