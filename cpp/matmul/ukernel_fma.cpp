// The `fma` engine: f32 register tiles on the build machine's vectors (AVX-512, AVX2 or
// NEON through the 16-lane vfloat type; see cpu_simd.h).
#include "matmul/cpu_kernels.h"

namespace kernelevo::cpu::detail {

namespace {

// MR x (NV * 16) accumulators live in registers for the whole depth; each step loads NV
// vectors of B and broadcasts MR values of A.
template <int MR, int NV>
void fma_kernel(int kb, const void* a_in, int64_t lda, int64_t, const void* b_in, float* __restrict c,
                int64_t ldc, bool accumulate, int m_valid, int n_valid) {
  constexpr int NR = NV * kLanes;
  const float* __restrict a = static_cast<const float*>(a_in);
  const float* __restrict b = static_cast<const float*>(b_in);
  vfloat acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vfloat{};

  // C is read and written after the whole depth: ask for it now, so it is in L1 by then.
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) __builtin_prefetch(c + i * ldc + j * kLanes, 1, 3);
  auto step = [&](int k) __attribute__((always_inline)) {
    vfloat bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = vload(b + k * NR + j * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      vfloat av = splat(a[i * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  };
  // Two steps per iteration: the loop's own instructions would otherwise take issue slots
  // from the multiplies.
  int k = 0;
  for (; k + 2 <= kb; k += 2) {
    step(k);
    step(k + 1);
  }
  if (k < kb) step(k);

  if (m_valid == MR && n_valid == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* dst = c + i * ldc + j * kLanes;
        vstore(dst, accumulate ? vload(dst) + acc[i][j] : acc[i][j]);
      }
    return;
  }
  // Edge tile: write only the valid part.
  alignas(64) float tile[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(&tile[i][j * kLanes], acc[i][j]);
  for (int i = 0; i < m_valid; ++i)
    for (int j = 0; j < n_valid; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

}  // namespace

// The compiled register tiles. Keep in sync with FMA_TILE_ROWS / FMA_TILE_COLS in
// families/cpu_matmul.py (tests/test_families.py checks both agree).
#define KE_MR_LIST(X, NV) \
  X(1, NV) X(2, NV) X(3, NV) X(4, NV) X(5, NV) X(6, NV) X(8, NV) X(10, NV) X(12, NV) X(14, NV) X(16, NV)

MicroKernel fma_micro_kernel(int mr, int nr) {
#define KE_CASE(MR, NV) \
  if (mr == MR && nr == NV * kLanes) return &fma_kernel<MR, NV>;
  KE_MR_LIST(KE_CASE, 1)
  KE_MR_LIST(KE_CASE, 2)
  KE_MR_LIST(KE_CASE, 3)
  KE_MR_LIST(KE_CASE, 4)
#undef KE_CASE
  return nullptr;
}

}  // namespace kernelevo::cpu::detail
