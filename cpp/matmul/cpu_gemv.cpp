// The gemv family: few rows of A (LLM decode). Memory-bound: B is read from memory exactly
// once, in its own layout, and never packed; A (small) is converted once to f32 rows.
//
// Each task owns a block of nb output columns. Within it, B is walked in depth chunks of
// kb that stay in L1 while every group of rows of A uses them.
//   B rows contiguous (x @ W, W stored [K, N]): register tiles of up to 4 rows of A x 64
//     columns, accumulating into the task's f32 output block.
//   B columns contiguous (x @ W.T, W stored [N, K]): tiles of up to 4 rows of A x 4 rows of
//     W, dot products along the depth in vector lanes, reduced once at the end.
#include <algorithm>
#include <vector>

#include "common/threadpool.h"
#include "matmul/cpu_kernels.h"

namespace kernelevo::cpu::detail {

namespace {

constexpr int kRowGroup = 4;  // rows of A per register tile
constexpr int kWRows = 4;     // rows of W per register tile (x @ W.T)

// out[i][0:NV*16] += sum over k in [k0, k1) of A[i, k] * B[k, j:j+NV*16], for MR rows.
template <typename E, int MR, int NV>
void rows_tile(const float* a, int64_t lda, const typename E::raw* b, int64_t brs, int64_t k0,
               int64_t k1, float* out, int64_t ldo) {
  vfloat acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vload(out + i * ldo + v * kLanes);
  for (int64_t k = k0; k < k1; ++k) {
    vfloat bv[NV];
    const typename E::raw* row = b + k * brs;
    for (int v = 0; v < NV; ++v) bv[v] = load16<E>(row + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const vfloat av = splat(a[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vstore(out + i * ldo + v * kLanes, acc[i][v]);
}

// part[i][jr] (vectors of partial sums, kWRows per row of A) += A[i, k0:k1] . W[jr, k0:k1], for MR rows of A and
// JR rows of W (W row jr at w + jr * ldw; depth k at w[k]).
template <typename E, int MR, int JR>
void cols_tile(const float* a, int64_t lda, const typename E::raw* w, int64_t ldw, int64_t k0,
               int64_t k1, float* part) {
  vfloat acc[MR][JR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < JR; ++j) acc[i][j] = vload(part + (i * kWRows + j) * kLanes);
  for (int64_t k = k0; k < k1; k += kLanes) {
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

template <typename E, int MR>
void rows_tile_any(const float* a, int64_t lda, const typename E::raw* b, int64_t brs,
                   int64_t k0, int64_t k1, float* out, int64_t ldo, int nv) {
  switch (nv) {
    case 1: return rows_tile<E, MR, 1>(a, lda, b, brs, k0, k1, out, ldo);
    case 2: return rows_tile<E, MR, 2>(a, lda, b, brs, k0, k1, out, ldo);
    case 3: return rows_tile<E, MR, 3>(a, lda, b, brs, k0, k1, out, ldo);
    default: return rows_tile<E, MR, 4>(a, lda, b, brs, k0, k1, out, ldo);
  }
}

template <typename E, int JR>
void cols_tile_any(const float* a, int64_t lda, const typename E::raw* w, int64_t ldw,
                   int64_t k0, int64_t k1, float* part, int mr) {
  switch (mr) {
    case 1: return cols_tile<E, 1, JR>(a, lda, w, ldw, k0, k1, part);
    case 2: return cols_tile<E, 2, JR>(a, lda, w, ldw, k0, k1, part);
    case 3: return cols_tile<E, 3, JR>(a, lda, w, ldw, k0, k1, part);
    default: return cols_tile<E, 4, JR>(a, lda, w, ldw, k0, k1, part);
  }
}

// Columns [j0, j1) of B with contiguous rows; out is M x (j1 - j0), zeroed.
template <typename E>
void rows_block(const float* a, int64_t lda, const typename E::raw* b, int64_t brs,
                int64_t M, int64_t K, int64_t j0, int64_t j1, int kb, float* out) {
  const int64_t width = j1 - j0, vec_end = width / kLanes * kLanes;
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t k1 = std::min<int64_t>(K, k0 + kb);
    for (int64_t jj = 0; jj < vec_end; jj += 4 * kLanes) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (vec_end - jj) / kLanes));
      for (int64_t i0 = 0; i0 < M; i0 += kRowGroup) {
        const float* ai = a + i0 * lda;
        float* o = out + i0 * width + jj;
        const typename E::raw* bj = b + j0 + jj;
        switch (std::min<int64_t>(kRowGroup, M - i0)) {
          case 1: rows_tile_any<E, 1>(ai, lda, bj, brs, k0, k1, o, width, nv); break;
          case 2: rows_tile_any<E, 2>(ai, lda, bj, brs, k0, k1, o, width, nv); break;
          case 3: rows_tile_any<E, 3>(ai, lda, bj, brs, k0, k1, o, width, nv); break;
          default: rows_tile_any<E, 4>(ai, lda, bj, brs, k0, k1, o, width, nv); break;
        }
      }
    }
    for (int64_t j = vec_end; j < width; ++j)  // the last few columns
      for (int64_t i = 0; i < M; ++i) {
        float s = 0.0f;
        for (int64_t k = k0; k < k1; ++k) s += a[i * lda + k] * to_f32<E>(b[k * brs + j0 + j]);
        out[i * width + j] += s;
      }
  }
}

// Columns [j0, j1) of B with contiguous columns (rows of W); out is M x (j1 - j0).
template <typename E>
void cols_block(const float* a, int64_t lda, const typename E::raw* w, int64_t ldw, int64_t M,
                int64_t K, int64_t j0, int64_t j1, int kb, float* out, float* part) {
  constexpr int JR = kWRows;
  const int64_t width = j1 - j0, k_vec = K / kLanes * kLanes;
  const int chunk = std::max(kLanes, kb / kLanes * kLanes);
  for (int64_t jr = 0; jr < width; jr += JR) {
    const int cols = static_cast<int>(std::min<int64_t>(JR, width - jr));
    const typename E::raw* wj = w + (j0 + jr) * ldw;
    std::fill(part, part + M * JR * kLanes, 0.0f);
    for (int64_t k0 = 0; k0 < k_vec; k0 += chunk) {
      const int64_t k1 = std::min<int64_t>(k_vec, k0 + chunk);
      for (int64_t i0 = 0; i0 < M; i0 += kRowGroup) {
        const int mr = static_cast<int>(std::min<int64_t>(kRowGroup, M - i0));
        float* pi = part + i0 * JR * kLanes;
        switch (cols) {
          case 1: cols_tile_any<E, 1>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr); break;
          case 2: cols_tile_any<E, 2>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr); break;
          case 3: cols_tile_any<E, 3>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr); break;
          default: cols_tile_any<E, 4>(a + i0 * lda, lda, wj, ldw, k0, k1, pi, mr); break;
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
  const int64_t lda = (K + kLanes - 1) / kLanes * kLanes;
  thread_local Scratch a_scratch;
  float* apanel = a_scratch.get_as<float>(M * lda);
  const int n_tasks = static_cast<int>((N + t.nb - 1) / t.nb);

  for (int64_t batch = 0; batch < p.batch; ++batch) {
    // A is small: once as f32 rows.
    const T* a = static_cast<const T*>(p.a.data) + p.a.batch_offsets[batch];
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k)
        apanel[i * lda + k] = to_f32<E>(a[i * p.a.row_stride + k * p.a.col_stride]);
    const T* b = static_cast<const T*>(p.b.data) + p.b.batch_offsets[batch];
    const int64_t brs = p.b.row_stride, bcs = p.b.col_stride;

    parallel_for(n_tasks, threads, [&](int task, int) {
      thread_local Scratch out_scratch, part_scratch;
      const int64_t j0 = task * static_cast<int64_t>(t.nb);
      const int64_t j1 = std::min<int64_t>(N, j0 + t.nb);
      const int64_t width = j1 - j0;
      float* out = out_scratch.get_as<float>(M * width);
      if (bcs == 1) {
        std::fill(out, out + M * width, 0.0f);
        rows_block<E>(apanel, lda, b, brs, M, K, j0, j1, t.kb, out);
      } else if (brs == 1) {
        float* part = part_scratch.get_as<float>(M * kWRows * kLanes);
        cols_block<E>(apanel, lda, b, bcs, M, K, j0, j1, t.kb, out, part);
      } else {
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = j0; j < j1; ++j) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += apanel[i * lda + k] * to_f32<E>(b[k * brs + j * bcs]);
            out[i * width + j - j0] = s;
          }
      }
      finalize_tile(p, batch, 0, j0, static_cast<int>(M), static_cast<int>(width), out, width,
                    t.fused);
    });
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
