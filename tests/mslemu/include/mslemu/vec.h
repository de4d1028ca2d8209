// MSL vector types vec<T, N> (float4, half2, uint3, ...) with Metal's size and alignment
// (a 3-vector occupies 4 elements), component names x/y/z/w and r/g/b/a, swizzles
// (every xyzw combination of 2 to 4 components, readable and assignable; of the rgba
// spellings only rg, rgb, rgba), component-wise
// operators, explicit conversions between element types, and scalar broadcast.
#pragma once

#include "mslemu/scalar.h"

namespace metal {

template <class T, int N>
struct vec;

// A swizzle is a union member aliasing its vector's storage; it reads as vec<T, K>.
template <class T, int N, int... I>
struct swizzle {
  static constexpr int K = sizeof...(I);
  using vec_type = vec<T, K>;
  T e[N];

  constexpr vec_type value() const {
    return vec_type(e[I]...);
  }
  constexpr operator vec_type() const {
    return value();
  }
  swizzle& operator=(const vec_type& v) {
    static_assert(distinct(), "MSL: a swizzle with a repeated component cannot be assigned");
    int k = 0;
    ((e[I] = v[k++]), ...);
    return *this;
  }
  swizzle& operator=(const swizzle& o) {
    return *this = o.value();
  }
  template <class X>
  swizzle& operator+=(const X& x) {
    return *this = value() + x;
  }
  template <class X>
  swizzle& operator-=(const X& x) {
    return *this = value() - x;
  }
  template <class X>
  swizzle& operator*=(const X& x) {
    return *this = value() * x;
  }
  template <class X>
  swizzle& operator/=(const X& x) {
    return *this = value() / x;
  }

 private:
  static constexpr bool distinct() {
    int idx[] = {I...};
    for (int a = 0; a < K; a++)
      for (int b = a + 1; b < K; b++)
        if (idx[a] == idx[b]) return false;
    return true;
  }
};

#define MSLEMU_SW2(n, a, i, b, j) swizzle<T, n, i, j> a##b;
#define MSLEMU_SW3(n, a, i, b, j, c, k) swizzle<T, n, i, j, k> a##b##c;
#define MSLEMU_ROW2_2(n, a, i) MSLEMU_SW2(n, a, i, x, 0) MSLEMU_SW2(n, a, i, y, 1)
#define MSLEMU_ROW2_3(n, a, i) MSLEMU_ROW2_2(n, a, i) MSLEMU_SW2(n, a, i, z, 2)
#define MSLEMU_ROW2_4(n, a, i) MSLEMU_ROW2_3(n, a, i) MSLEMU_SW2(n, a, i, w, 3)
#define MSLEMU_ROW3_3(n, a, i, b, j) \
  MSLEMU_SW3(n, a, i, b, j, x, 0) MSLEMU_SW3(n, a, i, b, j, y, 1) MSLEMU_SW3(n, a, i, b, j, z, 2)
#define MSLEMU_ROW3_4(n, a, i, b, j) MSLEMU_ROW3_3(n, a, i, b, j) MSLEMU_SW3(n, a, i, b, j, w, 3)
#define MSLEMU_PLANE3_3(n, a, i) \
  MSLEMU_ROW3_3(n, a, i, x, 0) MSLEMU_ROW3_3(n, a, i, y, 1) MSLEMU_ROW3_3(n, a, i, z, 2)
#define MSLEMU_SW4(n, a, i, b, j, c, k, d, l) swizzle<T, n, i, j, k, l> a##b##c##d;
#define MSLEMU_ROW4(n, a, i, b, j, c, k)                                                         \
  MSLEMU_SW4(n, a, i, b, j, c, k, x, 0) MSLEMU_SW4(n, a, i, b, j, c, k, y, 1)                    \
      MSLEMU_SW4(n, a, i, b, j, c, k, z, 2) MSLEMU_SW4(n, a, i, b, j, c, k, w, 3)
#define MSLEMU_PLANE4(n, a, i, b, j) \
  MSLEMU_ROW4(n, a, i, b, j, x, 0) MSLEMU_ROW4(n, a, i, b, j, y, 1) MSLEMU_ROW4(n, a, i, b, j, z, 2) MSLEMU_ROW4(n, a, i, b, j, w, 3)
#define MSLEMU_CUBE4(n, a, i) \
  MSLEMU_PLANE4(n, a, i, x, 0) MSLEMU_PLANE4(n, a, i, y, 1) MSLEMU_PLANE4(n, a, i, z, 2) MSLEMU_PLANE4(n, a, i, w, 3)
#define MSLEMU_PLANE3_4(n, a, i)                                                      \
  MSLEMU_ROW3_4(n, a, i, x, 0) MSLEMU_ROW3_4(n, a, i, y, 1) MSLEMU_ROW3_4(n, a, i, z, 2) \
      MSLEMU_ROW3_4(n, a, i, w, 3)

template <class T, int N>
struct vec_storage;

template <class T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  union {
    T e[2];
    struct {
      T x, y;
    };
    struct {
      T r, g;
    };
    MSLEMU_ROW2_2(2, x, 0)
    MSLEMU_ROW2_2(2, y, 1)
  };
};

template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {
  union {
    T e[3];
    T padded_[4];  // Metal: a 3-vector has the size and alignment of a 4-vector
    struct {
      T x, y, z;
    };
    struct {
      T r, g, b;
    };
    MSLEMU_ROW2_3(3, x, 0)
    MSLEMU_ROW2_3(3, y, 1)
    MSLEMU_ROW2_3(3, z, 2)
    MSLEMU_PLANE3_3(3, x, 0)
    MSLEMU_PLANE3_3(3, y, 1)
    MSLEMU_PLANE3_3(3, z, 2)
    swizzle<T, 3, 0, 1> rg;
  };
};

template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  union {
    T e[4];
    struct {
      T x, y, z, w;
    };
    struct {
      T r, g, b, a;
    };
    MSLEMU_ROW2_4(4, x, 0)
    MSLEMU_ROW2_4(4, y, 1)
    MSLEMU_ROW2_4(4, z, 2)
    MSLEMU_ROW2_4(4, w, 3)
    MSLEMU_PLANE3_4(4, x, 0)
    MSLEMU_PLANE3_4(4, y, 1)
    MSLEMU_PLANE3_4(4, z, 2)
    MSLEMU_PLANE3_4(4, w, 3)
    MSLEMU_CUBE4(4, x, 0)
    MSLEMU_CUBE4(4, y, 1)
    MSLEMU_CUBE4(4, z, 2)
    MSLEMU_CUBE4(4, w, 3)
    swizzle<T, 4, 0, 1> rg;
    swizzle<T, 4, 0, 1, 2> rgb;
    swizzle<T, 4, 0, 1, 2, 3> rgba;
  };
};

#undef MSLEMU_SW2
#undef MSLEMU_SW3
#undef MSLEMU_ROW2_2
#undef MSLEMU_ROW2_3
#undef MSLEMU_ROW2_4
#undef MSLEMU_ROW3_3
#undef MSLEMU_ROW3_4
#undef MSLEMU_PLANE3_3
#undef MSLEMU_PLANE3_4
#undef MSLEMU_SW4
#undef MSLEMU_ROW4
#undef MSLEMU_PLANE4
#undef MSLEMU_CUBE4

// What an operand is: a vector (or swizzle) with its element type and width, or a scalar.
template <class X>
struct vec_traits {
  static constexpr bool is_vec = false;
  static constexpr int width = 1;
  using elem = X;
};
template <class T, int N>
struct vec_traits<vec<T, N>> {
  static constexpr bool is_vec = true;
  static constexpr int width = N;
  using elem = T;
};
template <class T, int N, int... I>
struct vec_traits<swizzle<T, N, I...>> {
  static constexpr bool is_vec = true;
  static constexpr int width = sizeof...(I);
  using elem = T;
};
template <class X>
concept vector_like = vec_traits<std::remove_cvref_t<X>>::is_vec;
template <class X>
inline constexpr int width_v = vec_traits<std::remove_cvref_t<X>>::width;
template <class X>
using elem_t = typename vec_traits<std::remove_cvref_t<X>>::elem;

template <class T, int N>
struct vec : vec_storage<T, N> {
  using value_type = T;
  static constexpr int width = N;

  vec() = default;
  constexpr vec(const vec&) = default;
  constexpr vec& operator=(const vec& o) {
    for (int k = 0; k < N; k++) this->e[k] = o.e[k];
    return *this;
  }
  // A scalar broadcasts to every component.
  template <class S>
    requires is_scalar_v<S>
  constexpr vec(S s) {
    for (int k = 0; k < N; k++) this->e[k] = T(s);
  }
  // Components from scalars and vectors, e.g. float4(v.xy, 0.0f, 1.0f).
  template <class... A>
    requires(sizeof...(A) >= 2 && (width_v<A> + ...) == N)
  constexpr vec(const A&... parts) {
    int k = 0;
    (append(k, parts), ...);
  }
  // Between element types only explicitly, as in MSL.
  template <class U>
    requires(!std::is_same_v<U, T>)
  explicit constexpr vec(const vec<U, N>& o) {
    for (int k = 0; k < N; k++) this->e[k] = T(o.e[k]);
  }
  template <int M, int... I>
    requires(sizeof...(I) == N)
  constexpr vec(const swizzle<T, M, I...>& s) : vec(s.value()) {}

  constexpr T& operator[](int k) {
    return this->e[k];
  }
  constexpr const T& operator[](int k) const {
    return this->e[k];
  }

  template <class X>
  constexpr vec& operator+=(const X& x) {
    return *this = *this + x;
  }
  template <class X>
  constexpr vec& operator-=(const X& x) {
    return *this = *this - x;
  }
  template <class X>
  constexpr vec& operator*=(const X& x) {
    return *this = *this * x;
  }
  template <class X>
  constexpr vec& operator/=(const X& x) {
    return *this = *this / x;
  }
  template <class X>
  constexpr vec& operator%=(const X& x) {
    return *this = *this % x;
  }
  template <class X>
  constexpr vec& operator&=(const X& x) {
    return *this = *this & x;
  }
  template <class X>
  constexpr vec& operator|=(const X& x) {
    return *this = *this | x;
  }
  template <class X>
  constexpr vec& operator^=(const X& x) {
    return *this = *this ^ x;
  }
  template <class X>
  constexpr vec& operator<<=(const X& x) {
    return *this = *this << x;
  }
  template <class X>
  constexpr vec& operator>>=(const X& x) {
    return *this = *this >> x;
  }

 private:
  template <class P>
  constexpr void append(int& k, const P& p) {
    if constexpr (vector_like<P>) {
      const auto v = vec<elem_t<P>, width_v<P>>(p);
      for (int i = 0; i < width_v<P>; i++) this->e[k++] = T(v[i]);
    } else {
      this->e[k++] = T(p);
    }
  }
};

template <class X>
constexpr auto as_vec(const X& x) {
  return vec<elem_t<X>, width_v<X>>(x);
}

// Component i of a vector operand, or a scalar operand itself.
template <class X>
constexpr auto component(const X& x, int i) {
  if constexpr (vector_like<X>) {
    return x[i];
  } else {
    return x;
  }
}

template <class A, class B>
concept vector_operands =
    (vector_like<A> || vector_like<B>) && (vector_like<A> || is_scalar_v<A>) &&
    (vector_like<B> || is_scalar_v<B>);

template <class A, class B>
constexpr void check_vector_operands() {
  if constexpr (vector_like<A> && vector_like<B>) {
    static_assert(width_v<A> == width_v<B>, "MSL: vector operands of different widths");
    static_assert(std::is_same_v<elem_t<A>, elem_t<B>>,
                  "MSL: vector operands of different element types need an explicit conversion");
  }
}

// The result's element type is the vector operand's.
#define MSLEMU_VEC_BINOP(op)                                                        \
  template <class A, class B>                                                       \
    requires vector_operands<A, B>                                                  \
  constexpr auto operator op(const A& a, const B& b) {                              \
    check_vector_operands<A, B>();                                                  \
    using T = std::conditional_t<vector_like<A>, elem_t<A>, elem_t<B>>;             \
    constexpr int N = vector_like<A> ? width_v<A> : width_v<B>;                     \
    const auto va = [&] { if constexpr (vector_like<A>) return as_vec(a); else return a; }(); \
    const auto vb = [&] { if constexpr (vector_like<B>) return as_vec(b); else return b; }(); \
    vec<T, N> r;                                                                    \
    for (int k = 0; k < N; k++) r[k] = T(component(va, k) op component(vb, k));    \
    return r;                                                                       \
  }
MSLEMU_VEC_BINOP(+)
MSLEMU_VEC_BINOP(-)
MSLEMU_VEC_BINOP(*)
MSLEMU_VEC_BINOP(/)
MSLEMU_VEC_BINOP(%)
MSLEMU_VEC_BINOP(&)
MSLEMU_VEC_BINOP(|)
MSLEMU_VEC_BINOP(^)
MSLEMU_VEC_BINOP(<<)
MSLEMU_VEC_BINOP(>>)
#undef MSLEMU_VEC_BINOP

// Comparisons are component-wise and give a bool vector.
#define MSLEMU_VEC_CMP(op)                                                          \
  template <class A, class B>                                                       \
    requires vector_operands<A, B>                                                  \
  constexpr auto operator op(const A& a, const B& b) {                              \
    check_vector_operands<A, B>();                                                  \
    constexpr int N = vector_like<A> ? width_v<A> : width_v<B>;                     \
    const auto va = [&] { if constexpr (vector_like<A>) return as_vec(a); else return a; }(); \
    const auto vb = [&] { if constexpr (vector_like<B>) return as_vec(b); else return b; }(); \
    vec<bool, N> r;                                                                 \
    for (int k = 0; k < N; k++) r[k] = component(va, k) op component(vb, k);        \
    return r;                                                                       \
  }
MSLEMU_VEC_CMP(==)
MSLEMU_VEC_CMP(!=)
MSLEMU_VEC_CMP(<)
MSLEMU_VEC_CMP(<=)
MSLEMU_VEC_CMP(>)
MSLEMU_VEC_CMP(>=)
MSLEMU_VEC_CMP(&&)
MSLEMU_VEC_CMP(||)
#undef MSLEMU_VEC_CMP

#define MSLEMU_VEC_UNARY(op)                                   \
  template <class A>                                           \
    requires vector_like<A>                                    \
  constexpr auto operator op(const A& a) {                     \
    auto v = as_vec(a);                                        \
    using T = elem_t<A>;                                       \
    for (int k = 0; k < width_v<A>; k++) v[k] = T(op v[k]);    \
    return v;                                                  \
  }
MSLEMU_VEC_UNARY(-)
MSLEMU_VEC_UNARY(+)
MSLEMU_VEC_UNARY(~)
#undef MSLEMU_VEC_UNARY

template <class A>
  requires vector_like<A>
constexpr vec<bool, width_v<A>> operator!(const A& a) {
  vec<bool, width_v<A>> r;
  for (int k = 0; k < width_v<A>; k++) r[k] = !a[k];
  return r;
}

}  // namespace metal

#define MSLEMU_VEC_TYPEDEFS(T, name)   \
  typedef metal::vec<T, 2> name##2;    \
  typedef metal::vec<T, 3> name##3;    \
  typedef metal::vec<T, 4> name##4;
MSLEMU_VEC_TYPEDEFS(bool, bool)
MSLEMU_VEC_TYPEDEFS(char, char)
MSLEMU_VEC_TYPEDEFS(unsigned char, uchar)
MSLEMU_VEC_TYPEDEFS(short, short)
MSLEMU_VEC_TYPEDEFS(unsigned short, ushort)
MSLEMU_VEC_TYPEDEFS(int, int)
MSLEMU_VEC_TYPEDEFS(unsigned int, uint)
MSLEMU_VEC_TYPEDEFS(long, long)
MSLEMU_VEC_TYPEDEFS(unsigned long, ulong)
MSLEMU_VEC_TYPEDEFS(metal::half, half)
MSLEMU_VEC_TYPEDEFS(metal::bfloat, bfloat)
MSLEMU_VEC_TYPEDEFS(float, float)
#undef MSLEMU_VEC_TYPEDEFS
