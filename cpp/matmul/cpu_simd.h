// Portable SIMD helpers of the CPU matmul kernels: a 16-lane f32 vector type, loads and
// stores that convert f16/bf16 on the fly, and the vector math of the epilogues.
//
// `vfloat` is a GCC/Clang vector of 16 floats. The compiler maps it onto whatever the
// build machine has (CMake builds with -march=native): one AVX-512 register, two AVX2
// registers or four NEON registers. Conversions use F16C/AVX512-BF16 instructions where
// the build has them and exact bit manipulation elsewhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

#if defined(__x86_64__) && (defined(__F16C__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

namespace kernelevo::cpu {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t vhalf_bits __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// Element types as the kernels see them: raw bits for the 16-bit formats.
struct F32 {
  using raw = float;
  static constexpr Dtype dtype = Dtype::f32;
};
struct F16 {
  using raw = uint16_t;
  static constexpr Dtype dtype = Dtype::f16;
};
struct BF16 {
  using raw = uint16_t;
  static constexpr Dtype dtype = Dtype::bf16;
};

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
// (Written out, not `vfloat{} + x`: the add would have to be kept for x = -0.0 and costs an
// extra instruction per broadcast in the micro-kernels.)
inline vfloat splat(float x) {
  return vfloat{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}
template <typename V>
inline V bit_cast_vec(const auto& x) {
  static_assert(sizeof(V) == sizeof(x));
  V v;
  std::memcpy(&v, &x, sizeof(v));
  return v;
}

// ---- scalar conversions ----------------------------------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t w = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (as MLX converts).
inline uint16_t f32_to_bf16(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  if ((w & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  w += 0x7fffu + ((w >> 16) & 1u);
  return uint16_t(w >> 16);
}

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  // Exact IEEE half -> single by bit manipulation (subnormals renormalised).
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, w;
  if (exp == 0x1f) {
    w = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    w = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    w = sign;
  } else {
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    w = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &w, 4);
  return f;
#endif
}

inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  // Round to nearest even, with overflow to inf and gradual underflow.
  uint32_t w;
  std::memcpy(&w, &f, 4);
  uint32_t sign = (w >> 16) & 0x8000, abs = w & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00);
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // rounds past 65504
  if (abs < 0x38800000u) {                                 // half subnormal or zero
    float scaled;
    uint32_t a = abs;
    std::memcpy(&scaled, &a, 4);
    return uint16_t(sign | uint32_t(std::nearbyint(scaled * 16777216.0f)));
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
#endif
}

template <typename E>
inline float to_f32(typename E::raw x) {
  if constexpr (E::dtype == Dtype::f32) return x;
  else if constexpr (E::dtype == Dtype::bf16) return bf16_to_f32(x);
  else return f16_to_f32(x);
}

template <typename E>
inline typename E::raw from_f32(float x) {
  if constexpr (E::dtype == Dtype::f32) return x;
  else if constexpr (E::dtype == Dtype::bf16) return f32_to_bf16(x);
  else return f32_to_f16(x);
}

// ---- 16-lane loads and stores of each element type -------------------------------------

template <typename E>
inline vfloat load16(const typename E::raw* p) {
  if constexpr (E::dtype == Dtype::f32) {
    return vload(p);
  } else if constexpr (E::dtype == Dtype::bf16) {
#if defined(__AVX512F__)
    // One widening load (GCC splits __builtin_convertvector into four instructions here).
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return bit_cast_vec<vfloat>(_mm512_slli_epi32(wide, 16));
#else
    vhalf_bits h;
    std::memcpy(&h, p, sizeof(h));
    return bit_cast_vec<vfloat>(__builtin_convertvector(h, vuint) << 16);
#endif
  } else {
#if defined(__AVX512F__)
    return bit_cast_vec<vfloat>(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)));
#elif defined(__F16C__)
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)));
    float out[kLanes];
    _mm256_storeu_ps(out, lo);
    _mm256_storeu_ps(out + 8, hi);
    return vload(out);
#else
    float out[kLanes];
    for (int l = 0; l < kLanes; ++l) out[l] = f16_to_f32(p[l]);
    return vload(out);
#endif
  }
}

template <typename E>
inline void store16(typename E::raw* p, vfloat v) {
  if constexpr (E::dtype == Dtype::f32) {
    vstore(p, v);
  } else if constexpr (E::dtype == Dtype::bf16) {
#if defined(__AVX512BF16__)
    __m256bh h = _mm512_cvtneps_pbh(bit_cast_vec<__m512>(v));
    std::memcpy(p, &h, 32);
#else
    vuint w = bit_cast_vec<vuint>(v);
    vuint rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
    vuint is_nan = (vuint)((w & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~is_nan) | (0x7fc0u & is_nan);
    vhalf_bits h = __builtin_convertvector(rounded, vhalf_bits);
    std::memcpy(p, &h, sizeof(h));
#endif
  } else {
#if defined(__AVX512F__)
    _mm256_storeu_si256((__m256i*)p,
                        _mm512_cvtps_ph(bit_cast_vec<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < kLanes; ++l) p[l] = f32_to_f16(v[l]);
#endif
  }
}

// Loads n < 16 values (the rest are zero) and stores n values.
template <typename E>
inline vfloat load_partial(const typename E::raw* p, int n) {
  float tmp[kLanes] = {};
  for (int l = 0; l < n; ++l) tmp[l] = to_f32<E>(p[l]);
  return vload(tmp);
}
template <typename E>
inline void store_partial(typename E::raw* p, vfloat v, int n) {
  for (int l = 0; l < n; ++l) p[l] = from_f32<E>(v[l]);
}

inline float hsum(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(bit_cast_vec<__m512>(v));
#else
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}

// ---- vector math for the epilogues --------------------------------------------------

inline vfloat vmax(vfloat a, vfloat b) {
  return a > b ? a : b;
}
inline vfloat vmin(vfloat a, vfloat b) {
  return a < b ? a : b;
}

// exp(x): x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to degree 7
// (relative error < 1e-8 there), 2^n built in the exponent bits. Saturates to 0 / inf.
inline vfloat vexp(vfloat x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.5f));
  vfloat half = x > 0 ? splat(0.5f) : splat(-0.5f);
  vfloat n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + half, vint), vfloat);
  vfloat r = x - n * 0.693145752f;  // ln2 split in two for an exact reduction
  r = r - n * 1.42860677e-6f;
  vfloat p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * bit_cast_vec<vfloat>(bits);
}

// tanh(x) = 1 - 2 / (exp(2x) + 1), odd; small |x| by its series, where the formula cancels.
inline vfloat vtanh(vfloat x) {
  vfloat ax = vmax(x, -x);
  vfloat big = 1.0f - 2.0f / (vexp(2.0f * ax) + 1.0f);
  vfloat x2 = x * x;
  vfloat small = ax * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315))));
  vfloat t = ax < splat(0.0625f) ? small : big;
  return x < splat(0.0f) ? -t : t;
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
inline vfloat verf(vfloat x) {
  vfloat ax = vmax(x, -x);
  vfloat t = 1.0f / (1.0f + 0.3275911f * ax);
  vfloat poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                t * (-1.453152027f + t * 1.061405429f))));
  vfloat e = 1.0f - poly * vexp(-ax * ax);
  return x < splat(0.0f) ? -e : e;
}

}  // namespace kernelevo::cpu
