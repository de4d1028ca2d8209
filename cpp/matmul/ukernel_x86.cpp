// The x86 bf16 engines: `bf16dot` (AVX512-BF16) and `amx` (Intel AMX-BF16 tiles).
//
// Each is compiled only when the build machine's compiler targets it (-march=native
// defines __AVX512BF16__ / __AMX_BF16__), and used only when the CPU reports the feature
// at run time (cpuid) and, for AMX, Linux grants this process the tile state.
#include "matmul/cpu_kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kernelevo::cpu::detail {

namespace {

#if defined(__x86_64__)
// cpuid leaf 7: subleaf 0 EDX bit 22 AMX-BF16, bit 24 AMX-TILE; subleaf 1 EAX bit 5
// AVX512-BF16.
bool cpuid_bit(unsigned subleaf, int reg, int bit) {
  unsigned r[4] = {};
  if (!__get_cpuid_count(7, subleaf, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit) & 1u;
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------
// bf16dot: like the fma engine's tile, but each step multiplies pairs of depth. A pair
// (A[i, 2kk], A[i, 2kk+1]) is broadcast as one 32-bit lane; B holds matching pairs.

#if defined(__AVX512BF16__)
namespace {

template <int MR, int NV>
void bf16dot_kernel(int kb, const void* a_in, int64_t lda, int64_t, const void* b_in, float* c,
                    int64_t ldc, bool accumulate, int m_valid, int n_valid) {
  constexpr int NR = NV * 16;
  const uint16_t* a = static_cast<const uint16_t*>(a_in);
  const uint16_t* b = static_cast<const uint16_t*>(b_in);
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  const int pairs = kb / 2;
  for (int kk = 0; kk < pairs; ++kk) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      bv[j] = (__m512bh)_mm512_loadu_si512(b + (kk * NR + j * 16) * 2);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, a + i * lda + 2 * kk, 4);
      __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  if (m_valid == MR && n_valid == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* dst = c + i * ldc + j * 16;
        _mm512_storeu_ps(dst, accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst), acc[i][j])
                                         : acc[i][j]);
      }
    return;
  }
  alignas(64) float tile[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) _mm512_store_ps(&tile[i][j * 16], acc[i][j]);
  for (int i = 0; i < m_valid; ++i)
    for (int j = 0; j < n_valid; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

}  // namespace
#endif

// Keep in sync with the bf16dot tiles of families/cpu_matmul.py (the fma engine's list).
MicroKernel bf16dot_micro_kernel([[maybe_unused]] int mr, [[maybe_unused]] int nr) {
#if defined(__AVX512BF16__)
#define KE_CASE(MR, NV) \
  if (mr == MR && nr == NV * 16) return &bf16dot_kernel<MR, NV>;
#define KE_ROWS(NV) \
  KE_CASE(1, NV) KE_CASE(2, NV) KE_CASE(3, NV) KE_CASE(4, NV) KE_CASE(5, NV) KE_CASE(6, NV) \
  KE_CASE(8, NV) KE_CASE(10, NV) KE_CASE(12, NV) KE_CASE(14, NV) KE_CASE(16, NV)
  KE_ROWS(1)
  KE_ROWS(2)
  KE_ROWS(3)
  KE_ROWS(4)
#undef KE_ROWS
#undef KE_CASE
#endif
  return nullptr;
}

bool bf16dot_usable() {
#if defined(__AVX512BF16__)
  static const bool usable = cpuid_bit(1, 0, 5);
  return usable;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------
// amx: TM x TN tiles of 16x16 f32 accumulate in tile registers over the whole depth. Each
// 32-deep step loads TM tiles of A (16 rows x 32 bf16) and TN tiles of B (16 pairs of
// rows x 16 columns) and issues TM * TN TDPBF16PS. Eight tile registers: TM*TN + TM + TN <= 8.

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC's tile intrinsics paste the tile number into the instruction text, so it must be a
// literal: these pick the literal matching a template argument.
#define KE_EACH_TILE(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int T>
inline void tile_load(const void* base, int64_t stride_bytes) {
#define KE_X(n) if constexpr (T == n) _tile_loadd(n, base, stride_bytes);
  KE_EACH_TILE(KE_X)
#undef KE_X
}
template <int T>
inline void tile_store(void* base, int64_t stride_bytes) {
#define KE_X(n) if constexpr (T == n) _tile_stored(n, base, stride_bytes);
  KE_EACH_TILE(KE_X)
#undef KE_X
}
template <int T>
inline void tile_zero() {
#define KE_X(n) if constexpr (T == n) _tile_zero(n);
  KE_EACH_TILE(KE_X)
#undef KE_X
}
template <int C, int A, int B>
inline void tile_dp() {
#define KE_X3(c, a, b) if constexpr (C == c && A == a && B == b) _tile_dpbf16ps(c, a, b);
#define KE_X2(c, a) KE_X3(c, a, 0) KE_X3(c, a, 1) KE_X3(c, a, 2) KE_X3(c, a, 3) \
                    KE_X3(c, a, 4) KE_X3(c, a, 5) KE_X3(c, a, 6) KE_X3(c, a, 7)
#define KE_X1(c) KE_X2(c, 0) KE_X2(c, 1) KE_X2(c, 2) KE_X2(c, 3) \
                 KE_X2(c, 4) KE_X2(c, 5) KE_X2(c, 6) KE_X2(c, 7)
  KE_EACH_TILE(KE_X1)
#undef KE_X1
#undef KE_X2
#undef KE_X3
}
#undef KE_EACH_TILE

// Tile registers: C tiles 0 .. TM*TN-1 (row-major), then TM tiles of A, then TN of B.
// One 32-deep step, with each load placed just before its first use: a tile register is
// not renamed, so the next step's load of it waits until this step's last reader is done,
// and spreading the loads lets them overlap the multiplies still in flight.
template <int TM, int TN, int I = 0, int J = 0>
inline void amx_step(const uint16_t* a, int64_t a_row_tile, int64_t a_stride,
                     const uint16_t* b) {
  if constexpr (I < TM) {
    if constexpr (J < TN) {
      if constexpr (J == 0) tile_load<TM * TN + I>(a + I * a_row_tile, a_stride);
      if constexpr (I == 0) tile_load<TM * TN + TM + J>(b + J * 512, 64);
      tile_dp<I * TN + J, TM * TN + I, TM * TN + TM + J>();
      amx_step<TM, TN, I, J + 1>(a, a_row_tile, a_stride, b);
    } else {
      amx_step<TM, TN, I + 1, 0>(a, a_row_tile, a_stride, b);
    }
  }
}

template <int T, int N>
inline void amx_load_c(const float* c, int64_t ldc, int tn) {
  if constexpr (T < N) {
    tile_load<T>(c + (T / tn) * 16 * ldc + (T % tn) * 16, ldc * 4);
    amx_load_c<T + 1, N>(c, ldc, tn);
  }
}
template <int T, int N>
inline void amx_store_c(float* c, int64_t ldc, int tn) {
  if constexpr (T < N) {
    tile_store<T>(c + (T / tn) * 16 * ldc + (T % tn) * 16, ldc * 4);
    amx_store_c<T + 1, N>(c, ldc, tn);
  }
}
template <int T, int N>
inline void amx_zero_c() {
  if constexpr (T < N) {
    tile_zero<T>();
    amx_zero_c<T + 1, N>();
  }
}
template <int TM, int TN>
void amx_kernel(int kb, const void* a_in, int64_t lda, int64_t a_step, const void* b_in,
                float* c, int64_t ldc, bool accumulate, int, int) {
  constexpr int NR = TN * 16;
  const uint16_t* a = static_cast<const uint16_t*>(a_in);
  const uint16_t* b = static_cast<const uint16_t*>(b_in);
  if (accumulate) {
    amx_load_c<0, TM * TN>(c, ldc, TN);
  } else {
    amx_zero_c<0, TM * TN>();
  }
  for (int k = 0; k < kb; k += 32, a += a_step) {
    amx_step<TM, TN>(a, 16 * lda, lda * 2, b + k * NR);
  }
  amx_store_c<0, TM * TN>(c, ldc, TN);
}

bool amx_permitted() {
#if defined(__linux__)
  // Linux hands out the AMX tile state per process on request (ARCH_REQ_XCOMP_PERM).
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace
#endif

// Keep in sync with the amx tiles of families/cpu_matmul.py.
MicroKernel amx_micro_kernel([[maybe_unused]] int mr, [[maybe_unused]] int nr) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define KE_CASE(TM, TN) \
  if (mr == TM * 16 && nr == TN * 16) return &amx_kernel<TM, TN>;
  KE_CASE(1, 1) KE_CASE(1, 2) KE_CASE(2, 1) KE_CASE(2, 2) KE_CASE(1, 3) KE_CASE(3, 1)
#undef KE_CASE
#endif
  return nullptr;
}

bool amx_usable() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  static const bool usable = cpuid_bit(0, 3, 22) && cpuid_bit(0, 3, 24) && amx_permitted();
  return usable;
#else
  return false;
#endif
}

void amx_begin_thread() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  // Every tile is 16 rows of 64 bytes: C 16x16 f32, A 16x32 bf16, B 16 pairs x 16 columns.
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&config);
#endif
}

void amx_end_thread() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  _tile_release();
#endif
}

}  // namespace kernelevo::cpu::detail
