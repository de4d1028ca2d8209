// metal:: math, integer, relational and geometric functions for float and half scalars
// and every vector type (bfloat scalars get theirs from MLX's prelude, bf16_math.h, which
// calls the __metal_* builtins defined at the end), plus metal::fast and metal::precise.
// float uses the C library (correctly rounded or nearly so); half computes in float and
// rounds. Apple's GPU results can differ by a few ulp, more in fast-math mode.
#pragma once

#include <cstring>

#include "mslemu/vec.h"

// MSL's constants (<metal_math>, <metal_limits>).
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_huge_valf()
#define MAXFLOAT 0x1.fffffep+127f
#define FLT_MAX 0x1.fffffep+127f
#define FLT_MIN 0x1p-126f
#define FLT_EPSILON 0x1p-23f
#define HALF_MAX 65504.0h
#define HALF_MIN 0x1p-14h
#define HALF_EPSILON 0x1p-10h
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f

namespace metal {

// ---- as_type: reinterpret the bits of a value of the same size ----
template <class To, class From>
constexpr To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "MSL: as_type between types of different sizes");
  if constexpr (std::is_trivially_copyable_v<To> && std::is_trivially_copyable_v<From>) {
    return std::bit_cast<To>(from);
  } else {
    To to;
    __builtin_memcpy(static_cast<void*>(&to), static_cast<const void*>(&from), sizeof(To));
    return to;
  }
}

template <class X>
concept swizzle_operand = vector_like<X> && !std::is_same_v<std::remove_cvref_t<X>, vec<elem_t<X>, width_v<X>>>;

// One-argument float functions: float, half (via float), vectors component-wise.
#define MSLEMU_UNARY(name, expr)                              \
  inline float name(float x) {                                \
    return expr;                                              \
  }                                                           \
  inline half name(half h) {                                  \
    const float x = h;                                        \
    return half(expr);                                        \
  }                                                           \
  template <class T, int N>                                   \
  vec<T, N> name(vec<T, N> v) {                               \
    for (int k = 0; k < N; k++) v[k] = name(v[k]);            \
    return v;                                                 \
  }                                                           \
  template <swizzle_operand S>                                \
  auto name(const S& s) {                                     \
    return name(as_vec(s));                                   \
  }

MSLEMU_UNARY(acos, __builtin_acosf(x))
MSLEMU_UNARY(acosh, __builtin_acoshf(x))
MSLEMU_UNARY(asin, __builtin_asinf(x))
MSLEMU_UNARY(asinh, __builtin_asinhf(x))
MSLEMU_UNARY(atan, __builtin_atanf(x))
MSLEMU_UNARY(atanh, __builtin_atanhf(x))
MSLEMU_UNARY(ceil, __builtin_ceilf(x))
MSLEMU_UNARY(cos, __builtin_cosf(x))
MSLEMU_UNARY(cosh, __builtin_coshf(x))
MSLEMU_UNARY(cospi, __builtin_cosf(x * 3.14159265358979323846f))
MSLEMU_UNARY(exp, __builtin_expf(x))
MSLEMU_UNARY(exp2, __builtin_exp2f(x))
MSLEMU_UNARY(exp10, __builtin_powf(10.0f, x))
MSLEMU_UNARY(fabs, __builtin_fabsf(x))
MSLEMU_UNARY(abs, __builtin_fabsf(x))
MSLEMU_UNARY(floor, __builtin_floorf(x))
MSLEMU_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSLEMU_UNARY(log, __builtin_logf(x))
MSLEMU_UNARY(log2, __builtin_log2f(x))
MSLEMU_UNARY(log10, __builtin_log10f(x))
MSLEMU_UNARY(rint, __builtin_rintf(x))
MSLEMU_UNARY(round, __builtin_roundf(x))
MSLEMU_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSLEMU_UNARY(sin, __builtin_sinf(x))
MSLEMU_UNARY(sinh, __builtin_sinhf(x))
MSLEMU_UNARY(sinpi, __builtin_sinf(x * 3.14159265358979323846f))
MSLEMU_UNARY(sqrt, __builtin_sqrtf(x))
MSLEMU_UNARY(tan, __builtin_tanf(x))
MSLEMU_UNARY(tanh, __builtin_tanhf(x))
MSLEMU_UNARY(tanpi, __builtin_tanf(x * 3.14159265358979323846f))
MSLEMU_UNARY(trunc, __builtin_truncf(x))
MSLEMU_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSLEMU_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? x : 0.0f)))
#undef MSLEMU_UNARY

// Two-argument float functions.
#define MSLEMU_BINARY(name, expr)                                  \
  inline float name(float x, float y) {                            \
    return expr;                                                   \
  }                                                                \
  inline half name(half hx, half hy) {                             \
    const float x = hx, y = hy;                                    \
    return half(expr);                                             \
  }                                                                \
  template <class T, int N>                                        \
  vec<T, N> name(vec<T, N> a, vec<T, N> b) {                       \
    for (int k = 0; k < N; k++) a[k] = name(a[k], b[k]);           \
    return a;                                                      \
  }

MSLEMU_BINARY(atan2, __builtin_atan2f(x, y))
MSLEMU_BINARY(copysign, __builtin_copysignf(x, y))
MSLEMU_BINARY(divide, x / y)
MSLEMU_BINARY(fdim, x > y ? x - y : 0.0f)
MSLEMU_BINARY(fmax, __builtin_fmaxf(x, y))
MSLEMU_BINARY(fmin, __builtin_fminf(x, y))
MSLEMU_BINARY(fmod, __builtin_fmodf(x, y))
MSLEMU_BINARY(nextafter, __builtin_nextafterf(x, y))
MSLEMU_BINARY(pow, __builtin_powf(x, y))
MSLEMU_BINARY(powr, __builtin_powf(x, y))
MSLEMU_BINARY(step, y < x ? 0.0f : 1.0f)
#undef MSLEMU_BINARY

inline float fma(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
inline half fma(half a, half b, half c) {
  return half(__builtin_fmaf(a, b, c));
}
template <class T, int N>
vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  for (int k = 0; k < N; k++) a[k] = fma(a[k], b[k], c[k]);
  return a;
}
template <class A, class B, class C>
auto mad(A a, B b, C c) {
  return fma(a, b, c);
}

inline float ldexp(float x, int k) {
  return __builtin_ldexpf(x, k);
}
inline half ldexp(half x, int k) {
  return half(__builtin_ldexpf(x, k));
}
inline float frexp(float x, int& e) {
  return __builtin_frexpf(x, &e);
}
inline half frexp(half x, int& e) {
  return half(__builtin_frexpf(x, &e));
}

// ---- min/max/clamp: one type for all operands (MSL has no mixed overloads). For
// floating types min/max are fmin/fmax (a NaN operand is ignored). ----
template <class T>
concept msl_scalar = is_scalar_v<T>;

template <msl_scalar T>
constexpr T max(T a, T b) {
  if constexpr (is_floating_point_v<T>) {
    return T(__builtin_fmaxf(static_cast<float>(a), static_cast<float>(b)));
  } else {
    return a < b ? b : a;
  }
}
template <msl_scalar T>
constexpr T min(T a, T b) {
  if constexpr (is_floating_point_v<T>) {
    return T(__builtin_fminf(static_cast<float>(a), static_cast<float>(b)));
  } else {
    return b < a ? b : a;
  }
}
// An unsuffixed literal is double in C++ but float in MSL: accept float with double.
constexpr float max(float a, double b) {
  return max(a, static_cast<float>(b));
}
constexpr float max(double a, float b) {
  return max(static_cast<float>(a), b);
}
constexpr float min(float a, double b) {
  return min(a, static_cast<float>(b));
}
constexpr float min(double a, float b) {
  return min(static_cast<float>(a), b);
}
template <msl_scalar T>
constexpr T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <msl_scalar T>
constexpr T max3(T a, T b, T c) {
  return max(max(a, b), c);
}
template <msl_scalar T>
constexpr T min3(T a, T b, T c) {
  return min(min(a, b), c);
}
template <msl_scalar T>
constexpr T median3(T a, T b, T c) {
  return max(min(a, b), min(max(a, b), c));
}
inline float fmax3(float a, float b, float c) {
  return max3(a, b, c);
}
inline float fmin3(float a, float b, float c) {
  return min3(a, b, c);
}
inline float fmedian3(float a, float b, float c) {
  return median3(a, b, c);
}
inline half fmax3(half a, half b, half c) {
  return max3(a, b, c);
}
inline half fmin3(half a, half b, half c) {
  return min3(a, b, c);
}
inline half fmedian3(half a, half b, half c) {
  return median3(a, b, c);
}
template <class T, int N>
vec<T, N> max(vec<T, N> a, vec<T, N> b) {
  for (int k = 0; k < N; k++) a[k] = max(a[k], b[k]);
  return a;
}
template <class T, int N>
vec<T, N> min(vec<T, N> a, vec<T, N> b) {
  for (int k = 0; k < N; k++) a[k] = min(a[k], b[k]);
  return a;
}
template <class T, int N>
vec<T, N> max(vec<T, N> a, T b) {
  return max(a, vec<T, N>(b));
}
template <class T, int N>
vec<T, N> min(vec<T, N> a, T b) {
  return min(a, vec<T, N>(b));
}
template <class T, int N>
vec<T, N> clamp(vec<T, N> x, vec<T, N> lo, vec<T, N> hi) {
  return min(max(x, lo), hi);
}
template <class T, int N>
vec<T, N> clamp(vec<T, N> x, T lo, T hi) {
  return min(max(x, lo), hi);
}

// abs of integers (float/half abs are above).
template <class T>
  requires std::is_integral_v<T>
constexpr T abs(T x) {
  if constexpr (std::is_signed_v<T>) {
    return x < 0 ? T(-x) : x;
  } else {
    return x;
  }
}
template <class T>
  requires std::is_integral_v<T>
constexpr std::make_unsigned_t<T> absdiff(T a, T b) {
  return a > b ? std::make_unsigned_t<T>(a - b) : std::make_unsigned_t<T>(b - a);
}

template <msl_scalar T, class U>
constexpr T mix(T x, T y, U a) {
  return T(x + (y - x) * a);
}
template <class T, int N, class U>
vec<T, N> mix(vec<T, N> x, vec<T, N> y, U a) {
  return x + (y - x) * a;
}
template <msl_scalar T>
T smoothstep(T e0, T e1, T x) {
  T t = clamp(T((x - e0) / (e1 - e0)), T(0), T(1));
  return T(t * t * (T(3) - T(2) * t));
}

// ---- relational ----
template <class T>
  requires is_floating_point_v<T>
constexpr bool isnan(T x) {
  return __builtin_isnan(static_cast<float>(x));
}
template <class T>
  requires is_floating_point_v<T>
constexpr bool isinf(T x) {
  return __builtin_isinf(static_cast<float>(x));
}
template <class T>
  requires is_floating_point_v<T>
constexpr bool isfinite(T x) {
  return __builtin_isfinite(static_cast<float>(x));
}
template <class T>
  requires is_floating_point_v<T>
constexpr bool isnormal(T x) {
  return __builtin_isnormal(static_cast<float>(x));
}
template <class T>
  requires is_floating_point_v<T>
constexpr bool signbit(T x) {
  return __builtin_signbit(static_cast<float>(x));
}
#define MSLEMU_VEC_PREDICATE(name)                 \
  template <class T, int N>                        \
  vec<bool, N> name(vec<T, N> v) {                 \
    vec<bool, N> r;                                \
    for (int k = 0; k < N; k++) r[k] = name(v[k]); \
    return r;                                      \
  }
MSLEMU_VEC_PREDICATE(isnan)
MSLEMU_VEC_PREDICATE(isinf)
MSLEMU_VEC_PREDICATE(isfinite)
MSLEMU_VEC_PREDICATE(signbit)
#undef MSLEMU_VEC_PREDICATE

constexpr bool all(bool b) {
  return b;
}
constexpr bool any(bool b) {
  return b;
}
template <int N>
constexpr bool all(vec<bool, N> v) {
  for (int k = 0; k < N; k++)
    if (!v[k]) return false;
  return true;
}
template <int N>
constexpr bool any(vec<bool, N> v) {
  for (int k = 0; k < N; k++)
    if (v[k]) return true;
  return false;
}

// select(a, b, c): c ? b : a, component-wise for vectors.
template <class T>
  requires is_scalar_v<T>
constexpr T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
constexpr vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
  for (int k = 0; k < N; k++) a[k] = c[k] ? b[k] : a[k];
  return a;
}
template <class T, int N>
constexpr vec<T, N> select(vec<T, N> a, vec<T, N> b, bool c) {
  return c ? b : a;
}

// ---- geometric ----
template <class T, int N>
T dot(vec<T, N> a, vec<T, N> b) {
  T r = a[0] * b[0];
  for (int k = 1; k < N; k++) r = T(r + a[k] * b[k]);
  return r;
}
template <class T, int N>
T length_squared(vec<T, N> v) {
  return dot(v, v);
}
template <class T, int N>
T length(vec<T, N> v) {
  return sqrt(dot(v, v));
}
template <class T, int N>
T distance(vec<T, N> a, vec<T, N> b) {
  return length(a - b);
}
template <class T, int N>
vec<T, N> normalize(vec<T, N> v) {
  return v * rsqrt(dot(v, v));
}
template <class T>
vec<T, 3> cross(vec<T, 3> a, vec<T, 3> b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

// ---- integer ----
template <class T>
  requires std::is_integral_v<T>
constexpr T popcount(T x) {
  return T(std::popcount(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T clz(T x) {
  return T(std::countl_zero(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T ctz(T x) {
  return T(std::countr_zero(std::make_unsigned_t<T>(x)));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T reverse_bits(T x) {
  using U = std::make_unsigned_t<T>;
  U u = U(x), r = 0;
  for (unsigned i = 0; i < 8 * sizeof(T); i++) r = U((r << 1) | ((u >> i) & 1u));
  return T(r);
}
template <class T>
  requires std::is_integral_v<T>
constexpr T rotate(T v, T i) {
  using U = std::make_unsigned_t<T>;
  return T(std::rotl(U(v), int(i % T(8 * sizeof(T)))));
}
template <class T>
  requires std::is_integral_v<T>
constexpr T mulhi(T a, T b) {
  if constexpr (sizeof(T) < 8) {
    using W = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
    return T((W(a) * W(b)) >> (8 * sizeof(T)));
  } else {
    using W = std::conditional_t<std::is_signed_v<T>, __int128, unsigned __int128>;
    return T((W(a) * W(b)) >> 64);
  }
}
template <class T>
  requires std::is_integral_v<T>
constexpr T extract_bits(T x, uint offset, uint bits) {
  using U = std::make_unsigned_t<T>;
  if (bits == 0) return T(0);
  U mask = bits >= 8 * sizeof(T) ? U(~U(0)) : U((U(1) << bits) - 1);
  U v = U(U(x) >> offset) & mask;
  if constexpr (std::is_signed_v<T>) {
    if (bits < 8 * sizeof(T) && ((v >> (bits - 1)) & 1u)) v |= U(~mask);
  }
  return T(v);
}

// ---- swizzles as arguments: v.xy works wherever a vector does ----
template <class X>
constexpr decltype(auto) unswizzle(const X& x) {
  if constexpr (swizzle_operand<X>) {
    return as_vec(x);
  } else {
    return (x);
  }
}
template <class... A>
concept any_swizzle = (swizzle_operand<A> || ...);
#define MSLEMU_SWIZZLE_FORWARD(name)                        \
  template <class... A>                                     \
    requires any_swizzle<A...>                              \
  constexpr auto name(const A&... a) {                      \
    return name(unswizzle(a)...);                           \
  }
MSLEMU_SWIZZLE_FORWARD(atan2)
MSLEMU_SWIZZLE_FORWARD(copysign)
MSLEMU_SWIZZLE_FORWARD(divide)
MSLEMU_SWIZZLE_FORWARD(fdim)
MSLEMU_SWIZZLE_FORWARD(fmax)
MSLEMU_SWIZZLE_FORWARD(fmin)
MSLEMU_SWIZZLE_FORWARD(fmod)
MSLEMU_SWIZZLE_FORWARD(pow)
MSLEMU_SWIZZLE_FORWARD(powr)
MSLEMU_SWIZZLE_FORWARD(step)
MSLEMU_SWIZZLE_FORWARD(fma)
MSLEMU_SWIZZLE_FORWARD(max)
MSLEMU_SWIZZLE_FORWARD(min)
MSLEMU_SWIZZLE_FORWARD(clamp)
MSLEMU_SWIZZLE_FORWARD(mix)
MSLEMU_SWIZZLE_FORWARD(select)
MSLEMU_SWIZZLE_FORWARD(all)
MSLEMU_SWIZZLE_FORWARD(any)
MSLEMU_SWIZZLE_FORWARD(isnan)
MSLEMU_SWIZZLE_FORWARD(isinf)
MSLEMU_SWIZZLE_FORWARD(isfinite)
MSLEMU_SWIZZLE_FORWARD(dot)
MSLEMU_SWIZZLE_FORWARD(length)
MSLEMU_SWIZZLE_FORWARD(length_squared)
MSLEMU_SWIZZLE_FORWARD(distance)
MSLEMU_SWIZZLE_FORWARD(normalize)
MSLEMU_SWIZZLE_FORWARD(cross)
#undef MSLEMU_SWIZZLE_FORWARD

// ---- metal::fast and metal::precise name the same functions here ----
#define MSLEMU_MATH_NAMES(X)                                                             \
  X(acos) X(acosh) X(asin) X(asinh) X(atan) X(atanh) X(ceil) X(cos) X(cosh) X(cospi)      \
  X(exp) X(exp2) X(exp10) X(fabs) X(abs) X(floor) X(fract) X(log) X(log2) X(log10)        \
  X(rint) X(round) X(rsqrt) X(sin) X(sinh) X(sinpi) X(sqrt) X(tan) X(tanh) X(tanpi)       \
  X(trunc) X(saturate) X(sign) X(atan2) X(copysign) X(divide) X(fdim) X(fmax) X(fmin)     \
  X(fmod) X(nextafter) X(pow) X(powr) X(step) X(fma) X(ldexp) X(frexp) X(max) X(min)      \
  X(clamp) X(fmax3) X(fmin3) X(fmedian3) X(max3) X(min3) X(median3) X(mix) X(smoothstep) \
  X(isnan) X(isinf) X(isfinite) X(signbit) X(dot) X(length) X(normalize) X(distance)

#define MSLEMU_USING(name) using metal::name;
namespace fast {
MSLEMU_MATH_NAMES(MSLEMU_USING)
}
namespace precise {
MSLEMU_MATH_NAMES(MSLEMU_USING)
}
#undef MSLEMU_USING
#undef MSLEMU_MATH_NAMES

}  // namespace metal

// ---- Apple's compiler builtins, as MLX's bf16_math.h calls them (float arguments; the
// trailing math-mode argument is accepted and ignored) ----
#define __METAL_MAYBE_FAST_MATH__ 0
#define __METAL_FAST_MATH__ 1
#define __METAL_PRECISE_MATH__ 2

#define MSLEMU_BUILTIN1(name) \
  template <class... Mode>    \
  inline float __metal_##name(float x, Mode...) { return metal::name(x); }
#define MSLEMU_BUILTIN2(name) \
  template <class... Mode>    \
  inline float __metal_##name(float x, float y, Mode...) { return metal::name(x, y); }
#define MSLEMU_BUILTIN3(name) \
  template <class... Mode>    \
  inline float __metal_##name(float x, float y, float z, Mode...) { return metal::name(x, y, z); }
MSLEMU_BUILTIN1(acos)
MSLEMU_BUILTIN1(acosh)
MSLEMU_BUILTIN1(asin)
MSLEMU_BUILTIN1(asinh)
MSLEMU_BUILTIN1(atan)
MSLEMU_BUILTIN1(atanh)
MSLEMU_BUILTIN1(ceil)
MSLEMU_BUILTIN1(cos)
MSLEMU_BUILTIN1(cosh)
MSLEMU_BUILTIN1(cospi)
MSLEMU_BUILTIN1(exp)
MSLEMU_BUILTIN1(exp10)
MSLEMU_BUILTIN1(exp2)
MSLEMU_BUILTIN1(fabs)
MSLEMU_BUILTIN1(floor)
MSLEMU_BUILTIN1(fract)
MSLEMU_BUILTIN1(log)
MSLEMU_BUILTIN1(log10)
MSLEMU_BUILTIN1(log2)
MSLEMU_BUILTIN1(rint)
MSLEMU_BUILTIN1(round)
MSLEMU_BUILTIN1(rsqrt)
MSLEMU_BUILTIN1(sin)
MSLEMU_BUILTIN1(sinh)
MSLEMU_BUILTIN1(sinpi)
MSLEMU_BUILTIN1(sqrt)
MSLEMU_BUILTIN1(tan)
MSLEMU_BUILTIN1(tanh)
MSLEMU_BUILTIN1(tanpi)
MSLEMU_BUILTIN1(trunc)
MSLEMU_BUILTIN2(atan2)
MSLEMU_BUILTIN2(divide)
MSLEMU_BUILTIN2(fmax)
MSLEMU_BUILTIN2(fmin)
MSLEMU_BUILTIN2(fmod)
MSLEMU_BUILTIN2(nextafter)
MSLEMU_BUILTIN2(pow)
MSLEMU_BUILTIN2(powr)
MSLEMU_BUILTIN3(fma)
MSLEMU_BUILTIN3(fmax3)
MSLEMU_BUILTIN3(fmin3)
MSLEMU_BUILTIN3(fmedian3)
#undef MSLEMU_BUILTIN1
#undef MSLEMU_BUILTIN2
#undef MSLEMU_BUILTIN3
template <class... Mode>
inline float __metal_ldexp(float x, int k, Mode...) {
  return metal::ldexp(x, k);
}
inline float __metal_frexp(float x, int* e) {
  return metal::frexp(x, *e);
}
