#include "matmul/cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/threadpool.h"
#include "mlx/types/half_types.h"

namespace kernelevo::cpu {

namespace {

using mlx::core::bfloat16_t;
using mlx::core::float16_t;

// 16 f32 lanes: one AVX-512 register, two AVX2 registers or four NEON registers. The
// compiler maps it onto whatever the build machine has (CMake builds with -march=native).
constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
inline vfloat splat(float x) {
  return vfloat{} + x;
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Scratch memory that grows and is reused across calls (one per thread).
struct Scratch {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data;
  size_t capacity = 0;

  float* get(size_t floats) {
    if (floats > capacity) {
      size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
      data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!data) throw std::bad_alloc();
      capacity = floats;
    }
    return data.get();
  }
};

Scratch& thread_scratch(int slot) {
  thread_local Scratch scratch[2];
  return scratch[slot];
}

// ---------------------------------------------------------------------------------------
// gemm: packing

// Packs rows [0, mb) x depth [0, kb) of A into slivers of MR rows: sliver s holds, for
// each k, the MR values A[s*MR + i, k] next to each other. Rows past mb are zero.
template <typename T>
void pack_a(const T* a, int64_t rs, int64_t cs, int mb, int kb, int mr, float* out) {
  for (int s = 0; s < mb; s += mr) {
    int rows = std::min(mr, mb - s);
    for (int k = 0; k < kb; ++k) {
      float* dst = out + static_cast<int64_t>(s) * kb + static_cast<int64_t>(k) * mr;
      for (int i = 0; i < rows; ++i) dst[i] = to_float(a[(s + i) * rs + k * cs]);
      for (int i = rows; i < mr; ++i) dst[i] = 0.0f;
    }
  }
}

// Packs depth [0, kb) x columns [j0, j0 + nr) of B into one sliver: for each k, the nr
// values B[k, j0 + j] side by side. Columns past nb are zero.
template <typename T>
void pack_b_sliver(const T* b, int64_t rs, int64_t cs, int kb, int j0, int nb, int nr,
                   float* out) {
  int cols = std::min(nr, nb - j0);
  for (int k = 0; k < kb; ++k) {
    const T* src = b + k * rs + j0 * cs;
    float* dst = out + static_cast<int64_t>(k) * nr;
    if (cs == 1) {
      for (int j = 0; j < cols; ++j) dst[j] = to_float(src[j]);
    } else {
      for (int j = 0; j < cols; ++j) dst[j] = to_float(src[j * cs]);
    }
    for (int j = cols; j < nr; ++j) dst[j] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// gemm: the register-tiled micro-kernel. C[0:MR, 0:NV*16] (+)= Apack * Bpack over kb.

using MicroKernel = void (*)(int kb, const float* a, const float* b, float* c, int64_t ldc,
                             bool accumulate, int m_valid, int n_valid);

template <int MR, int NV>
void micro_kernel(int kb, const float* __restrict a, const float* __restrict b,
                  float* __restrict c, int64_t ldc, bool accumulate, int m_valid,
                  int n_valid) {
  constexpr int NR = NV * kLanes;
  vfloat acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vfloat{};

  for (int k = 0; k < kb; ++k) {
    vfloat bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = load(b + k * NR + j * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      vfloat av = splat(a[k * MR + i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }

  if (m_valid == MR && n_valid == NR) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) {
        float* dst = c + i * ldc + j * kLanes;
        store(dst, accumulate ? load(dst) + acc[i][j] : acc[i][j]);
      }
    return;
  }
  // Edge tile: write only the valid part.
  alignas(64) float tile[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(&tile[i][j * kLanes], acc[i][j]);
  for (int i = 0; i < m_valid; ++i)
    for (int j = 0; j < n_valid; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

// The compiled register tiles. Keep in sync with CPU_REGISTER_TILES in families.py
// (tests/test_families.py checks both lists agree through gemm_register_tile_supported).
#define KE_MR_LIST(X, NV) \
  X(1, NV) X(2, NV) X(3, NV) X(4, NV) X(5, NV) X(6, NV) X(8, NV) X(10, NV) X(12, NV) X(14, NV) X(16, NV)

MicroKernel find_micro_kernel(int mr, int nr) {
#define KE_CASE(MR, NV) \
  if (mr == MR && nr == NV * kLanes) return &micro_kernel<MR, NV>;
  KE_MR_LIST(KE_CASE, 1)
  KE_MR_LIST(KE_CASE, 2)
  KE_MR_LIST(KE_CASE, 3)
  KE_MR_LIST(KE_CASE, 4)
#undef KE_CASE
  return nullptr;
}

// ---------------------------------------------------------------------------------------
// gemm: the blocked driver

struct GemmTiling {
  int mc, nc, kc, mr, nr, threads;
  bool split_n;  // parallelise over column slivers (else over row blocks)
};

GemmTiling read_gemm(const KernelConfig& config) {
  ConfigReader r(config, "CPU matmul kernel");
  GemmTiling t;
  t.mr = static_cast<int>(r.integer("mr", 1, 64));
  t.nr = static_cast<int>(r.integer("nr", 1, 256));
  t.mc = static_cast<int>(r.integer("mc", 1, 1 << 16));
  t.nc = static_cast<int>(r.integer("nc", 1, 1 << 16));
  t.kc = static_cast<int>(r.integer("kc", 1, 1 << 16));
  t.threads = static_cast<int>(r.integer("threads", 1, 1024));
  t.split_n = r.choice("split", {"m", "n"}) == 1;
  r.finish();
  if (!find_micro_kernel(t.mr, t.nr)) {
    throw std::invalid_argument("CPU gemm has no " + std::to_string(t.mr) + "x" +
                                std::to_string(t.nr) + " register tile");
  }
  if (t.mc % t.mr || t.nc % t.nr) {
    throw std::invalid_argument("CPU gemm needs mc % mr == 0 and nc % nr == 0 (got " +
                                config.to_string() + ")");
  }
  return t;
}

template <typename T>
const T* typed(const Operand& op, int64_t batch) {
  return static_cast<const T*>(op.data) + op.batch_offsets[batch];
}

template <typename T>
void convert_rows(const float* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                  int64_t cols, int threads) {
  parallel_for(static_cast<int>(rows), threads, [&](int i, int) {
    for (int64_t j = 0; j < cols; ++j) dst[i * ldd + j] = T(src[i * lds + j]);
  });
}

template <typename T>
void gemm_typed(const GemmProblem& p, const GemmTiling& t) {
  const MicroKernel kernel = find_micro_kernel(t.mr, t.nr);
  const int64_t M = p.M, N = p.N, K = p.K;
  const int threads = std::max(1, std::min(t.threads, available_cores()));
  // Low-precision outputs accumulate across depth blocks in an f32 panel first.
  constexpr bool direct = std::is_same_v<T, float>;

  for (int64_t batch = 0; batch < p.batch; ++batch) {
    const T* a = typed<T>(p.a, batch);
    const T* b = typed<T>(p.b, batch);
    T* c = static_cast<T*>(p.c) + batch * M * N;
    if (K == 0) {
      for (int64_t i = 0; i < M * N; ++i) c[i] = T(0.0f);
      continue;
    }
    for (int64_t jc = 0; jc < N; jc += t.nc) {
      const int nb = static_cast<int>(std::min<int64_t>(t.nc, N - jc));
      const int n_slivers = (nb + t.nr - 1) / t.nr;
      float* cpanel;
      int64_t ldc;
      if constexpr (direct) {
        cpanel = c + jc;
        ldc = N;
      } else {
        ldc = nb;
        cpanel = thread_scratch(1).get(static_cast<size_t>(M) * nb);
      }
      for (int64_t pc = 0; pc < K; pc += t.kc) {
        const int kb = static_cast<int>(std::min<int64_t>(t.kc, K - pc));
        const bool accumulate = pc > 0;
        float* bpack = thread_scratch(0).get(static_cast<size_t>(n_slivers) * kb * t.nr);
        parallel_for(n_slivers, threads, [&](int s, int) {
          pack_b_sliver(b + pc * p.b.row_stride + jc * p.b.col_stride, p.b.row_stride,
                        p.b.col_stride, kb, s * t.nr, nb, t.nr,
                        bpack + static_cast<int64_t>(s) * kb * t.nr);
        });

        auto compute_block = [&](const float* apack, int64_t ic, int mb, int s_begin,
                                 int s_end) {
          for (int s = s_begin; s < s_end; ++s) {
            const int n_valid = std::min(t.nr, nb - s * t.nr);
            const float* bs = bpack + static_cast<int64_t>(s) * kb * t.nr;
            for (int ir = 0; ir < mb; ir += t.mr) {
              kernel(kb, apack + static_cast<int64_t>(ir) * kb, bs,
                     cpanel + (ic + ir) * ldc + s * t.nr, ldc, accumulate,
                     std::min(t.mr, mb - ir), n_valid);
            }
          }
        };

        const int64_t m_blocks = (M + t.mc - 1) / t.mc;
        const T* ak = a + pc * p.a.col_stride;
        if (!t.split_n) {
          // Each worker packs and multiplies whole row blocks.
          parallel_for(static_cast<int>(m_blocks), threads, [&](int blk, int) {
            thread_local Scratch apack_buffer;
            const int64_t ic = blk * static_cast<int64_t>(t.mc);
            const int mb = static_cast<int>(std::min<int64_t>(t.mc, M - ic));
            float* apack =
                apack_buffer.get(static_cast<size_t>((mb + t.mr - 1) / t.mr) * t.mr * kb);
            pack_a(ak + ic * p.a.row_stride, p.a.row_stride, p.a.col_stride, mb, kb, t.mr,
                   apack);
            compute_block(apack, ic, mb, 0, n_slivers);
          });
        } else {
          // All workers share one packed row block and split its column slivers.
          thread_local Scratch apack_buffer;
          for (int64_t ic = 0; ic < M; ic += t.mc) {
            const int mb = static_cast<int>(std::min<int64_t>(t.mc, M - ic));
            float* apack =
                apack_buffer.get(static_cast<size_t>((mb + t.mr - 1) / t.mr) * t.mr * kb);
            pack_a(ak + ic * p.a.row_stride, p.a.row_stride, p.a.col_stride, mb, kb, t.mr,
                   apack);
            parallel_for(n_slivers, threads,
                         [&](int s, int) { compute_block(apack, ic, mb, s, s + 1); });
          }
        }
      }
      if constexpr (!direct) {
        convert_rows(cpanel, ldc, c + jc, N, M, nb, threads);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// gemv: few rows of A, no packing of B. B is streamed once per block of nb columns.

struct GemvTiling {
  int nb, threads;
};

GemvTiling read_gemv(const KernelConfig& config) {
  ConfigReader r(config, "CPU matmul kernel");
  GemvTiling t;
  t.nb = static_cast<int>(r.integer("nb", 1, 1 << 16));
  t.threads = static_cast<int>(r.integer("threads", 1, 1024));
  r.finish();
  return t;
}

// Loads 16 consecutive values of B as floats.
template <typename T>
inline vfloat load_row16(const T* p) {
  float tmp[kLanes];
  for (int j = 0; j < kLanes; ++j) tmp[j] = to_float(p[j]);
  return load(tmp);
}
template <>
inline vfloat load_row16<float>(const float* p) {
  return load(p);
}
template <>
inline vfloat load_row16<bfloat16_t>(const bfloat16_t* p) {
  typedef uint16_t u16v __attribute__((vector_size(kLanes * 2)));
  typedef uint32_t u32v __attribute__((vector_size(kLanes * 4)));
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  u32v w = __builtin_convertvector(h, u32v) << 16;
  vfloat f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

template <typename T>
void gemv_typed(const GemmProblem& p, const GemvTiling& t) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int threads = std::max(1, std::min(t.threads, available_cores()));
  thread_local Scratch apanel_buffer;
  for (int64_t batch = 0; batch < p.batch; ++batch) {
    // A is small: convert it once into a row-major f32 panel.
    float* apanel = apanel_buffer.get(static_cast<size_t>(std::max<int64_t>(M * K, 1)));
    auto a_at = [&](auto* a, int64_t i, int64_t k) {
      return to_float(a[i * p.a.row_stride + k * p.a.col_stride]);
    };
    const T* a = typed<T>(p.a, batch);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < K; ++k) apanel[i * K + k] = a_at(a, i, k);
    const T* b = typed<T>(p.b, batch);
    T* c = static_cast<T*>(p.c) + batch * M * N;
    const int64_t brs = p.b.row_stride, bcs = p.b.col_stride;
    const int n_tasks = static_cast<int>((N + t.nb - 1) / t.nb);

    parallel_for(n_tasks, threads, [&](int task, int) {
      const int64_t j0 = task * static_cast<int64_t>(t.nb);
      const int64_t j1 = std::min<int64_t>(N, j0 + t.nb);
      if (bcs == 1) {
        // B rows are contiguous: accumulate 4 rows x 16 columns at a time.
        int64_t j = j0;
        for (; j + kLanes <= j1; j += kLanes) {
          for (int64_t i0 = 0; i0 < M; i0 += 4) {
            const int rows = static_cast<int>(std::min<int64_t>(4, M - i0));
            vfloat acc[4] = {};
            for (int64_t k = 0; k < K; ++k) {
              vfloat bv = load_row16(b + k * brs + j);
              for (int i = 0; i < rows; ++i) acc[i] += splat(apanel[(i0 + i) * K + k]) * bv;
            }
            for (int i = 0; i < rows; ++i) {
              alignas(64) float out[kLanes];
              store(out, acc[i]);
              for (int l = 0; l < kLanes; ++l) c[(i0 + i) * N + j + l] = T(out[l]);
            }
          }
        }
        for (; j < j1; ++j)
          for (int64_t i = 0; i < M; ++i) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += apanel[i * K + k] * to_float(b[k * brs + j]);
            c[i * N + j] = T(s);
          }
      } else if (brs == 1) {
        // B columns are contiguous (a transposed weight): dot products along K.
        for (int64_t j = j0; j < j1; ++j) {
          const T* col = b + j * bcs;
          for (int64_t i = 0; i < M; ++i) {
            const float* arow = apanel + i * K;
            vfloat acc = {};
            int64_t k = 0;
            for (; k + kLanes <= K; k += kLanes) acc += load(arow + k) * load_row16(col + k);
            float s = 0.0f;
            for (int l = 0; l < kLanes; ++l) s += acc[l];
            for (; k < K; ++k) s += arow[k] * to_float(col[k]);
            c[i * N + j] = T(s);
          }
        }
      } else {
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = 0; i < M; ++i) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k)
              s += apanel[i * K + k] * to_float(b[k * brs + j * bcs]);
            c[i * N + j] = T(s);
          }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// dtype dispatch

template <typename Fn>
void with_dtype(Dtype d, Fn&& fn) {
  switch (d) {
    case Dtype::f32: return fn(float{});
    case Dtype::f16: return fn(float16_t{});
    case Dtype::bf16: return fn(bfloat16_t{});
  }
}

}  // namespace

bool gemm_register_tile_supported(int mr, int nr) {
  return find_micro_kernel(mr, nr) != nullptr;
}

void validate_matmul_config(const KernelConfig& config) {
  if (config.family == "gemm") {
    read_gemm(config);
  } else if (config.family == "gemv") {
    read_gemv(config);
  } else {
    throw std::invalid_argument("the CPU backend has no matmul family '" + config.family +
                                "'");
  }
}

void matmul(const GemmProblem& problem, const KernelConfig& config) {
  if (problem.M == 0 || problem.N == 0 || problem.batch == 0) return;
  if (config.family == "gemm") {
    const GemmTiling tiling = read_gemm(config);
    with_dtype(problem.dtype, [&](auto t) { gemm_typed<decltype(t)>(problem, tiling); });
  } else if (config.family == "gemv") {
    const GemvTiling tiling = read_gemv(config);
    with_dtype(problem.dtype, [&](auto t) { gemv_typed<decltype(t)>(problem, tiling); });
  } else {
    validate_matmul_config(config);
  }
}

}  // namespace kernelevo::cpu
