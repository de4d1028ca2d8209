// MSL scalar types that C++ lacks: `half` (IEEE binary16) and `bfloat` (bfloat16), with
// Metal's conversion rules and round-to-nearest-even, plus metal::numeric_limits and the
// type traits kernels use. Arithmetic on half/bfloat rounds after every operation, as the
// GPU does (computed exactly in float, then rounded: float has enough precision for the
// double rounding to be innocuous for + - * /).
#pragma once

#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace metal {

struct half;
struct bfloat;

template <class T>
inline constexpr bool is_emulated_float_v = std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
template <class T>
inline constexpr bool is_scalar_v = std::is_arithmetic_v<T> || is_emulated_float_v<T>;

struct half {
  _Float16 v;

  half() = default;
  // float and integers convert implicitly to half in MSL.
  constexpr half(float f) : v(static_cast<_Float16>(f)) {}
  // C++ types an unsuffixed literal `0.5` double; MSL would make it float.
  constexpr half(double d) : v(static_cast<_Float16>(d)) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  constexpr half(I i) : v(static_cast<_Float16>(static_cast<float>(i))) {}
  // bfloat -> half only explicitly (MSL: bfloat converts implicitly to float alone).
  explicit constexpr half(bfloat b);
  constexpr operator float() const {
    return static_cast<float>(v);
  }
  static constexpr half from_bits(uint16_t b) {
    half h;
    h.v = std::bit_cast<_Float16>(b);
    return h;
  }
};

struct bfloat {
  uint16_t bits;

  bfloat() = default;
  // MSL: neither float nor half converts implicitly to bfloat.
  explicit constexpr bfloat(float f) : bits(round(f)) {}
  explicit constexpr bfloat(double d) : bits(round(static_cast<float>(d))) {}
  explicit constexpr bfloat(half h) : bits(round(static_cast<float>(h))) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  constexpr bfloat(I i) : bits(round(static_cast<float>(i))) {}
  constexpr operator float() const {
    return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
  }
  static constexpr bfloat from_bits(uint16_t b) {
    bfloat r;
    r.bits = b;
    return r;
  }
  // Round to nearest, ties to even; NaN stays a (quiet) NaN.
  static constexpr uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return static_cast<uint16_t>((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

constexpr half::half(bfloat b) : v(static_cast<_Float16>(static_cast<float>(b))) {}

static_assert(sizeof(half) == 2 && sizeof(bfloat) == 2);

// Result type of a binary operation with at least one half/bfloat operand: the same type
// twice keeps it, an integer adopts the other operand's type, anything else is float.
template <class A, class B>
constexpr auto mixed_result() {
  if constexpr (std::is_same_v<A, B>) {
    return A{};
  } else if constexpr (is_emulated_float_v<A> && std::is_integral_v<B>) {
    return A{};
  } else if constexpr (is_emulated_float_v<B> && std::is_integral_v<A>) {
    return B{};
  } else {
    return float{};
  }
}
template <class A, class B>
using mixed_result_t = decltype(mixed_result<A, B>());
template <class A, class B>
concept mixed_operands =
    (is_emulated_float_v<A> || is_emulated_float_v<B>) && is_scalar_v<A> && is_scalar_v<B>;

#define MSLEMU_FLOAT_BINOP(op)                                                  \
  template <class A, class B>                                                   \
    requires mixed_operands<A, B>                                               \
  constexpr mixed_result_t<A, B> operator op(A a, B b) {                        \
    return mixed_result_t<A, B>(static_cast<float>(a) op static_cast<float>(b)); \
  }
MSLEMU_FLOAT_BINOP(+)
MSLEMU_FLOAT_BINOP(-)
MSLEMU_FLOAT_BINOP(*)
MSLEMU_FLOAT_BINOP(/)
#undef MSLEMU_FLOAT_BINOP

#define MSLEMU_FLOAT_CMP(op)                                 \
  template <class A, class B>                                \
    requires mixed_operands<A, B>                            \
  constexpr bool operator op(A a, B b) {                     \
    return static_cast<float>(a) op static_cast<float>(b);   \
  }
MSLEMU_FLOAT_CMP(==)
MSLEMU_FLOAT_CMP(!=)
MSLEMU_FLOAT_CMP(<)
MSLEMU_FLOAT_CMP(<=)
MSLEMU_FLOAT_CMP(>)
MSLEMU_FLOAT_CMP(>=)
#undef MSLEMU_FLOAT_CMP

#define MSLEMU_FLOAT_ASSIGN(T, op)                              \
  template <class B>                                            \
    requires is_scalar_v<B>                                     \
  constexpr T& operator op##=(T & a, B b) {                     \
    a = T(static_cast<float>(a) op static_cast<float>(b));      \
    return a;                                                   \
  }
#define MSLEMU_FLOAT_UNARY(T)                                   \
  constexpr T operator-(T a) {                                  \
    return T::from_bits(std::bit_cast<uint16_t>(a) ^ 0x8000u);  \
  }                                                             \
  constexpr T operator+(T a) {                                  \
    return a;                                                   \
  }                                                             \
  constexpr T& operator++(T & a) {                              \
    return a += 1;                                              \
  }                                                             \
  constexpr T& operator--(T & a) {                              \
    return a -= 1;                                              \
  }                                                             \
  constexpr T operator++(T & a, int) {                          \
    T r = a;                                                    \
    a += 1;                                                     \
    return r;                                                   \
  }                                                             \
  constexpr T operator--(T & a, int) {                          \
    T r = a;                                                    \
    a -= 1;                                                     \
    return r;                                                   \
  }
MSLEMU_FLOAT_ASSIGN(half, +)
MSLEMU_FLOAT_ASSIGN(half, -)
MSLEMU_FLOAT_ASSIGN(half, *)
MSLEMU_FLOAT_ASSIGN(half, /)
MSLEMU_FLOAT_ASSIGN(bfloat, +)
MSLEMU_FLOAT_ASSIGN(bfloat, -)
MSLEMU_FLOAT_ASSIGN(bfloat, *)
MSLEMU_FLOAT_ASSIGN(bfloat, /)
MSLEMU_FLOAT_UNARY(half)
MSLEMU_FLOAT_UNARY(bfloat)
#undef MSLEMU_FLOAT_ASSIGN
#undef MSLEMU_FLOAT_UNARY

// ---- numeric_limits: std's for built-in types, IEEE values for half and bfloat ----
template <class T>
struct numeric_limits : std::numeric_limits<T> {};

template <class T, uint16_t Max, uint16_t Min, uint16_t Eps, uint16_t Inf, uint16_t NaN,
          uint16_t Denorm, int Digits>
struct float16_limits {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = Digits;
  static constexpr T max() { return T::from_bits(Max); }
  static constexpr T min() { return T::from_bits(Min); }
  static constexpr T lowest() { return T::from_bits(Max | 0x8000u); }
  static constexpr T epsilon() { return T::from_bits(Eps); }
  static constexpr T infinity() { return T::from_bits(Inf); }
  static constexpr T quiet_NaN() { return T::from_bits(NaN); }
  static constexpr T denorm_min() { return T::from_bits(Denorm); }
};
template <>
struct numeric_limits<half>
    : float16_limits<half, 0x7bff, 0x0400, 0x1400, 0x7c00, 0x7e00, 0x0001, 11> {};
template <>
struct numeric_limits<bfloat>
    : float16_limits<bfloat, 0x7f7f, 0x0080, 0x3c00, 0x7f80, 0x7fc0, 0x0001, 8> {};

// ---- type traits (MSL's <metal_type_traits>) ----
using std::add_const_t;
using std::add_pointer_t;
using std::bool_constant;
using std::common_type_t;
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_same;
using std::is_same_v;
using std::is_signed;
using std::is_signed_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_reference;
using std::remove_reference_t;
using std::true_type;
using std::underlying_type_t;
using std::is_class_v;
using std::is_enum_v;
using std::is_void_v;
using std::remove_pointer_t;
using std::remove_volatile_t;
using std::declval;
// Address spaces are erased, so removing one changes nothing.
template <class T>
struct remove_addrspace {
  using type = T;
};
template <class T>
using remove_addrspace_t = T;
template <class T>
struct is_floating_point
    : std::bool_constant<std::is_floating_point_v<T> || is_emulated_float_v<std::remove_cv_t<T>>> {};
template <class T>
inline constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T>
struct is_arithmetic : std::bool_constant<is_scalar_v<std::remove_cv_t<T>>> {};
template <class T>
inline constexpr bool is_arithmetic_v = is_arithmetic<T>::value;

}  // namespace metal

// `1.0h` (half) and `1.0bf` (bfloat) literals.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wliteral-suffix"
constexpr metal::half operator""h(long double v) {
  return metal::half(static_cast<double>(v));
}
constexpr metal::bfloat operator""bf(long double v) {
  return metal::bfloat(static_cast<double>(v));
}
#pragma GCC diagnostic pop

// MSL spells these as built-in type names.
typedef metal::half half;
typedef metal::bfloat bfloat;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
