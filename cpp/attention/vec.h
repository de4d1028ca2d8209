// SIMD helpers for the CPU attention kernels: a 16-lane f32 vector (GCC vector
// extensions; the build's -march=native maps it onto AVX-512, AVX2 or NEON), loads that
// convert f16/bf16 to f32, and the exp/tanh the softmax and softcap need.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "mlx/types/half_types.h"

namespace kernelevo::cpu::vec {

using mlx::core::bfloat16_t;
using mlx::core::float16_t;

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// How many vfloat values fit the register file (register tiles are sized from this).
#if defined(__AVX512F__)
constexpr int kRegisters = 32;  // 32 zmm
#else
constexpr int kRegisters = 8;  // 16 ymm (AVX2) or 32 q registers (NEON), 2 or 4 per vfloat
#endif

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
// A broadcast (not `vfloat{} + x`: adding 0 is not a no-op for -0.0, so the compiler
// must emit an add before the broadcast).
inline vfloat splat(float x) {
  return vfloat{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// 16 consecutive values of any supported element type, as f32.
inline vfloat load16(const float* p) {
  return load(p);
}
inline vfloat load16(const bfloat16_t* p) {
#if defined(__AVX512F__)
  // bf16 is the top half of an f32: widen and shift.
  __m512i w = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  vfloat f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#else
  typedef uint16_t u16v __attribute__((vector_size(kLanes * 2)));
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  vint w = __builtin_convertvector(h, vint) << 16;
  vfloat f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#endif
}
inline vfloat load16(const float16_t* p) {
#if defined(__AVX512F__)
  __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  vfloat v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#elif defined(__F16C__)
  __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  alignas(64) float tmp[kLanes];
  _mm256_store_ps(tmp, lo);
  _mm256_store_ps(tmp + 8, hi);
  return load(tmp);
#else
  alignas(64) float tmp[kLanes];
  for (int i = 0; i < kLanes; ++i) tmp[i] = static_cast<float>(p[i]);
  return load(tmp);
#endif
}

// The first n (< 16) values, the rest zero: never reads past p[n - 1].
template <typename T>
inline vfloat load_partial(const T* p, int n) {
  alignas(64) float tmp[kLanes] = {};
  for (int i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return load(tmp);
}

// dst[i] = T(src[i] * scale) for n values, rounding to nearest even as MLX does.
inline void store_scaled(const float* src, int64_t n, float scale, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i) * scale);
  for (; i < n; ++i) dst[i] = src[i] * scale;
}
inline void store_scaled(const float* src, int64_t n, float scale, bfloat16_t* dst) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_set1_ps(scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(x));
  }
#endif
  for (; i < n; ++i) dst[i] = bfloat16_t(src[i] * scale);
}
inline void store_scaled(const float* src, int64_t n, float scale, float16_t* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_set1_ps(scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = float16_t(src[i] * scale);
}

// Converts n values to f32 (dst may hold more; only n are written).
template <typename T>
inline void to_f32(const T* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float reduce_add(vfloat v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_add_ps(x);
#else
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// r[j] = sum of the lanes of a[j], for 16 vectors at once (a transpose-and-add tree:
// about 3 instructions per sum instead of 8 for one reduction at a time).
inline vfloat reduce_add16(const vfloat* a) {
#if defined(__AVX512F__)
  __m512 x[16];
  std::memcpy(x, a, sizeof(x));
  __m512 h[8], q[4], e[2];
  // pairs (2j, 2j+1): per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3]
  for (int j = 0; j < 8; ++j) {
    h[j] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * j], x[2 * j + 1]),
                         _mm512_unpackhi_ps(x[2 * j], x[2 * j + 1]));
  }
  // quads: per 128-bit lane one partial sum of each of 4 vectors
  for (int j = 0; j < 4; ++j) {
    q[j] = _mm512_add_ps(_mm512_shuffle_ps(h[2 * j], h[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(h[2 * j], h[2 * j + 1], 0xEE));
  }
  // across 128-bit lanes: first halve the 4 partials of each quad, then finish
  for (int j = 0; j < 2; ++j) {
    e[j] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * j], q[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(q[2 * j], q[2 * j + 1], 0xDD));
  }
  __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88),
                           _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
  vfloat out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
#else
  vfloat out;
  for (int j = 0; j < kLanes; ++j) out[j] = reduce_add(a[j]);
  return out;
#endif
}

inline vfloat vmax(vfloat a, vfloat b) {
  return a > b ? a : b;
}

inline vfloat select(vint mask, vfloat a, vfloat b) {
  return mask ? a : b;
}

// exp(x) to within ~2 ulp for x in f32's range: 2^n * p(f) after Cody-Waite reduction.
// exp(-inf) and anything below the smallest normal give 0; NaN gives NaN (the clamps are
// comparisons that keep x when it is NaN); +inf is not expected (scores minus their max
// are at most 0, or NaN).
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.33654f), hi = splat(88.0f);
  const vint underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vfloat t = x * 1.44269504088896341f + magic;
  vfloat n = t - magic;
  vint ni;
  std::memcpy(&ni, &t, sizeof(ni));
  ni -= 0x4B400000;  // the bits of `magic`: what is left is n
  vfloat f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  // exp(f) for |f| <= ln2/2 (Taylor/minimax coefficients)
  vfloat p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * (f * f) + f + 1.0f;
  vint bits = (ni + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vfloat r = p * scale;
  vint rb;
  std::memcpy(&rb, &r, sizeof(rb));
  rb &= ~underflow;
  std::memcpy(&r, &rb, sizeof(r));
  return r;
}

// exp(x) to about 4e-5 relative (enough for probabilities rounded to bf16): 2^n * p(f)
// with a degree-4 polynomial on |f| <= 1/2. exp(-inf) is 0: inputs are clamped at -200,
// whose 2^n underflows to 0. NaN stays NaN (MAXPS returns its second operand, x, when
// either is NaN).
inline vfloat vexp_bf16(vfloat x) {
#if defined(__AVX512F__)
  __m512 v;
  std::memcpy(&v, &x, sizeof(v));
  v = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-200.0f), v), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_scalef_ps(p, n);
  vfloat out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
#else
  return vexp(x);
#endif
}

inline float reduce_max(vfloat v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_max_ps(x);
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
#endif
}

// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)); absolute error ~1e-7.
inline vfloat vtanh(vfloat x) {
  vfloat a = x < 0.0f ? -x : x;
  a = a > 9.0f ? splat(9.0f) : a;  // tanh(9) is 1 in f32
  vfloat t = 1.0f - 2.0f / (vexp(2.0f * a) + 1.0f);
  return x < 0.0f ? -t : t;
}

// Growable, 64-byte aligned scratch memory, reused across calls (one per thread and use).
struct Buffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data;
  size_t capacity = 0;

  float* get(size_t floats) {
    if (floats > capacity) {
      size_t bytes = ((std::max<size_t>(floats, 1) * sizeof(float) + 63) / 64) * 64;
      data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!data) throw std::bad_alloc();
      capacity = floats;
    }
    return data.get();
  }
};

}  // namespace kernelevo::cpu::vec
