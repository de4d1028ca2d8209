// Everything that involves more than one GPU thread: barriers, SIMD-group collectives
// (reductions, scans, shuffles, votes, quad ops), simdgroup_matrix with Apple's lane
// layout, atomics, and the storage behind kernel-scope `threadgroup` variables. Each
// collective is a scheduling point of the fiber runtime (runtime.h).
#pragma once

#include "mslemu/math.h"
#include "mslemu/runtime.h"

// Collectives are inlined so that the runtime sees the kernel's call site.
#define MSLEMU_INLINE inline __attribute__((always_inline))

namespace metal {

// ---- barriers ----
enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) | uint32_t(b));
}
MSLEMU_INLINE void threadgroup_barrier(mem_flags f) {
  mslemu::threadgroup_barrier(uint32_t(f));
}
MSLEMU_INLINE void simdgroup_barrier(mem_flags f) {
  mslemu::simdgroup_barrier(uint32_t(f));
}

// The emulator's own reads of the exchange buffers are not the kernel's memory traffic:
// these helpers are not instrumented (and therefore not inlined).
#define MSLEMU_UNCHECKED __attribute__((no_sanitize_thread, noinline))

namespace detail {

using mslemu::Collective;
using mslemu::Exchange;
using mslemu::kSimdWidth;

template <class T>
MSLEMU_INLINE Exchange exchange(Collective what, const char* name, const T& v) {
  static_assert(sizeof(T) <= mslemu::kSlotBytes, "mslemu: value too large for a SIMD collective");
  return mslemu::simd_collective(what, name, &v, sizeof(T));
}
template <class T>
MSLEMU_UNCHECKED T slot_value(const Exchange& ex, uint32_t lane) {
  T v;
  __builtin_memcpy(static_cast<void*>(&v), ex.slot(lane), sizeof(T));
  return v;
}
// A lane that does not exist or has exited: the GPU gives an undefined value; poison it.
template <class T>
T undefined_value() {
  T v;
  __builtin_memset(static_cast<void*>(&v), 0xff, sizeof(T));
  return v;
}
template <class T>
T value_of_lane(const Exchange& ex, uint32_t lane) {
  return ex.has(lane) ? slot_value<T>(ex, lane) : undefined_value<T>();
}

// A butterfly over the active lanes (partner distance 16, 8, 4, 2, 1), the usual shape
// of a hardware SIMD reduction; computed once, every lane gets the same result.
template <class T, class F>
MSLEMU_UNCHECKED T tree_reduce(const Exchange& ex, F op) {
  static_assert(sizeof(T) <= mslemu::kSharedBytes);
  if (!*ex.shared_ready) {
    T v[kSimdWidth];
    bool valid[kSimdWidth];
    for (uint32_t l = 0; l < kSimdWidth; l++) {
      valid[l] = ex.has(l);
      if (valid[l]) __builtin_memcpy(static_cast<void*>(&v[l]), ex.slot(l), sizeof(T));
    }
    for (uint32_t s = kSimdWidth / 2; s >= 1; s /= 2) {
      for (uint32_t l = 0; l < s; l++) {
        if (valid[l + s]) {
          v[l] = valid[l] ? T(op(v[l], v[l + s])) : v[l + s];
          valid[l] = true;
        }
      }
    }
    __builtin_memcpy(ex.shared, static_cast<const void*>(&v[0]), sizeof(T));
    *ex.shared_ready = true;
  }
  T r;
  __builtin_memcpy(static_cast<void*>(&r), ex.shared, sizeof(T));
  return r;
}

template <class T, class F>
MSLEMU_UNCHECKED T scan(const Exchange& ex, F op, bool inclusive, T identity) {
  T acc = identity;
  for (uint32_t l = 0; l < ex.lane; l++)
    if (ex.has(l)) acc = T(op(acc, slot_value<T>(ex, l)));
  return inclusive ? T(op(acc, slot_value<T>(ex, ex.lane))) : acc;
}

template <class T>
T shuffle_from(const Exchange& ex, int src) {
  return src >= 0 && src < int(kSimdWidth) ? value_of_lane<T>(ex, uint32_t(src)) : undefined_value<T>();
}

template <class T>
T bit_xor(T a, T b) {
  using U = std::conditional_t<sizeof(T) == 1, uint8_t,
            std::conditional_t<sizeof(T) == 2, uint16_t,
            std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;
  return as_type<T>(U(as_type<U>(a) ^ as_type<U>(b)));
}

}  // namespace detail

// ---- reductions and scans ----
#define MSLEMU_SIMD_REDUCE(name, op)                                                     \
  template <class T>                                                                     \
  MSLEMU_INLINE T name(T x) {                                                            \
    auto ex = detail::exchange(mslemu::Collective::reduce, #name, x);                    \
    return detail::tree_reduce<T>(ex, [](T a, T b) { return op; });                     \
  }
MSLEMU_SIMD_REDUCE(simd_sum, a + b)
MSLEMU_SIMD_REDUCE(simd_product, a * b)
MSLEMU_SIMD_REDUCE(simd_max, max(a, b))
MSLEMU_SIMD_REDUCE(simd_min, min(a, b))
MSLEMU_SIMD_REDUCE(simd_and, a & b)
MSLEMU_SIMD_REDUCE(simd_or, a | b)
MSLEMU_SIMD_REDUCE(simd_xor, detail::bit_xor(a, b))
#undef MSLEMU_SIMD_REDUCE

#define MSLEMU_SIMD_SCAN(name, op, inclusive, identity)                                  \
  template <class T>                                                                     \
  MSLEMU_INLINE T name(T x) {                                                            \
    auto ex = detail::exchange(mslemu::Collective::prefix, #name, x);                    \
    return detail::scan<T>(ex, [](T a, T b) { return op; }, inclusive, T(identity));    \
  }
MSLEMU_SIMD_SCAN(simd_prefix_inclusive_sum, a + b, true, 0)
MSLEMU_SIMD_SCAN(simd_prefix_exclusive_sum, a + b, false, 0)
MSLEMU_SIMD_SCAN(simd_prefix_inclusive_product, a * b, true, 1)
MSLEMU_SIMD_SCAN(simd_prefix_exclusive_product, a * b, false, 1)
#undef MSLEMU_SIMD_SCAN

// ---- shuffles and broadcasts ----
template <class T>
MSLEMU_INLINE T simd_shuffle(T x, ushort lane) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle", x);
  return detail::shuffle_from<T>(ex, lane);
}
template <class T>
MSLEMU_INLINE T simd_broadcast(T x, ushort lane) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_broadcast", x);
  return detail::shuffle_from<T>(ex, lane);
}
template <class T>
MSLEMU_INLINE T simd_broadcast_first(T x) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_broadcast_first", x);
  return detail::shuffle_from<T>(ex, __builtin_ctz(ex.active));
}
// The lanes a shuffle_down/up would read from outside the SIMD-group keep their value.
template <class T>
MSLEMU_INLINE T simd_shuffle_down(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_down", x);
  int src = int(ex.lane) + delta;
  return src < int(detail::kSimdWidth) ? detail::shuffle_from<T>(ex, src) : x;
}
template <class T>
MSLEMU_INLINE T simd_shuffle_up(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_up", x);
  int src = int(ex.lane) - delta;
  return src >= 0 ? detail::shuffle_from<T>(ex, src) : x;
}
template <class T>
MSLEMU_INLINE T simd_shuffle_xor(T x, ushort mask) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_xor", x);
  return detail::shuffle_from<T>(ex, int(ex.lane ^ mask));
}
template <class T>
MSLEMU_INLINE T simd_shuffle_rotate_down(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_rotate_down", x);
  return detail::shuffle_from<T>(ex, int((ex.lane + delta) % detail::kSimdWidth));
}
template <class T>
MSLEMU_INLINE T simd_shuffle_rotate_up(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_rotate_up", x);
  return detail::shuffle_from<T>(ex, int((ex.lane + detail::kSimdWidth - delta % detail::kSimdWidth) %
                                         detail::kSimdWidth));
}
// Within groups of `modulo` lanes: read lane i+delta of `data`, past the group's end
// continue in `filling` (and symmetrically for _up).
template <class T>
MSLEMU_INLINE T simd_shuffle_and_fill_down(T data, T filling, ushort delta, ushort modulo = 32) {
  struct Pair {
    T d, f;
  } mine{data, filling};
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_and_fill_down", mine);
  int g = int(ex.lane) / modulo * modulo, i = int(ex.lane) % modulo + delta;
  Pair p = detail::shuffle_from<Pair>(ex, g + (i < modulo ? i : i - modulo));
  return i < modulo ? p.d : p.f;
}
template <class T>
MSLEMU_INLINE T simd_shuffle_and_fill_up(T data, T filling, ushort delta, ushort modulo = 32) {
  struct Pair {
    T d, f;
  } mine{data, filling};
  auto ex = detail::exchange(mslemu::Collective::shuffle, "simd_shuffle_and_fill_up", mine);
  int g = int(ex.lane) / modulo * modulo, i = int(ex.lane) % modulo - delta;
  Pair p = detail::shuffle_from<Pair>(ex, g + (i >= 0 ? i : i + modulo));
  return i >= 0 ? p.d : p.f;
}

// ---- votes ----
struct simd_vote {
  using vote_t = uint64_t;
  vote_t v;
  explicit constexpr simd_vote(vote_t x = 0) : v(x) {}
  explicit constexpr operator vote_t() const {
    return v;
  }
  constexpr bool all() const {
    return v == 0xffffffffu;
  }
  constexpr bool any() const {
    return v != 0;
  }
};
MSLEMU_INLINE simd_vote simd_ballot(bool b) {
  auto ex = detail::exchange(mslemu::Collective::vote, "simd_ballot", b);
  simd_vote::vote_t m = 0;
  for (uint32_t l = 0; l < detail::kSimdWidth; l++)
    if (ex.has(l) && detail::slot_value<bool>(ex, l)) m |= simd_vote::vote_t(1) << l;
  return simd_vote(m);
}
MSLEMU_INLINE bool simd_all(bool b) {
  auto ex = detail::exchange(mslemu::Collective::vote, "simd_all", b);
  for (uint32_t l = 0; l < detail::kSimdWidth; l++)
    if (ex.has(l) && !detail::slot_value<bool>(ex, l)) return false;
  return true;
}
MSLEMU_INLINE bool simd_any(bool b) {
  auto ex = detail::exchange(mslemu::Collective::vote, "simd_any", b);
  for (uint32_t l = 0; l < detail::kSimdWidth; l++)
    if (ex.has(l) && detail::slot_value<bool>(ex, l)) return true;
  return false;
}
MSLEMU_INLINE simd_vote simd_active_threads_mask() {
  auto ex = detail::exchange(mslemu::Collective::vote, "simd_active_threads_mask", true);
  return simd_vote(ex.active);
}
MSLEMU_INLINE bool simd_is_first() {
  auto ex = detail::exchange(mslemu::Collective::vote, "simd_is_first", true);
  return ex.lane == uint32_t(__builtin_ctz(ex.active));
}

// ---- quad-groups (4 lanes). Run as SIMD-group-wide collectives here. ----
#define MSLEMU_QUAD_REDUCE(name, op)                                                     \
  template <class T>                                                                     \
  MSLEMU_INLINE T name(T x) {                                                            \
    auto ex = detail::exchange(mslemu::Collective::quad, #name, x);                      \
    uint32_t q = ex.lane & ~3u;                                                          \
    T r = detail::value_of_lane<T>(ex, q);                                               \
    for (uint32_t l = q + 1; l < q + 4; l++)                                             \
      if (ex.has(l)) {                                                                   \
        T a = r, b = detail::slot_value<T>(ex, l);                                       \
        r = T(op);                                                                       \
      }                                                                                  \
    return r;                                                                            \
  }
MSLEMU_QUAD_REDUCE(quad_sum, a + b)
MSLEMU_QUAD_REDUCE(quad_max, max(a, b))
MSLEMU_QUAD_REDUCE(quad_min, min(a, b))
#undef MSLEMU_QUAD_REDUCE
template <class T>
MSLEMU_INLINE T quad_shuffle(T x, ushort lane) {
  auto ex = detail::exchange(mslemu::Collective::quad, "quad_shuffle", x);
  return detail::shuffle_from<T>(ex, int((ex.lane & ~3u) + (lane & 3u)));
}
template <class T>
MSLEMU_INLINE T quad_broadcast(T x, ushort lane) {
  auto ex = detail::exchange(mslemu::Collective::quad, "quad_broadcast", x);
  return detail::shuffle_from<T>(ex, int((ex.lane & ~3u) + (lane & 3u)));
}
template <class T>
MSLEMU_INLINE T quad_shuffle_xor(T x, ushort mask) {
  auto ex = detail::exchange(mslemu::Collective::quad, "quad_shuffle_xor", x);
  return detail::shuffle_from<T>(ex, int((ex.lane & ~3u) + ((ex.lane ^ mask) & 3u)));
}
template <class T>
MSLEMU_INLINE T quad_shuffle_down(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::quad, "quad_shuffle_down", x);
  uint32_t i = (ex.lane & 3u) + delta;
  return i < 4 ? detail::shuffle_from<T>(ex, int((ex.lane & ~3u) + i)) : x;
}
template <class T>
MSLEMU_INLINE T quad_shuffle_up(T x, ushort delta) {
  auto ex = detail::exchange(mslemu::Collective::quad, "quad_shuffle_up", x);
  int i = int(ex.lane & 3u) - delta;
  return i >= 0 ? detail::shuffle_from<T>(ex, int(ex.lane & ~3u) + i) : x;
}

// ---- simdgroup_matrix<T, Cols, Rows>: 8x8, two elements per lane in Apple's layout.
// Lane l holds row fm, columns fn and fn+1, where (as MLX's steel MMA fragments assume)
//   fm = (l / 4 & 4) + (l / 2 % 4),   fn = (l / 4 & 2) * 2 + (l % 2) * 2.
namespace detail {
constexpr int frag_row(uint32_t lane) {
  return int(((lane / 4) & 4) + ((lane / 2) % 4));
}
constexpr int frag_col(uint32_t lane) {
  return int(((lane / 4) & 2) * 2 + (lane % 2) * 2);
}
}  // namespace detail

namespace detail {
struct Frags {
  float a[2], b[2], c[2];
};
// D = A * B + C for the simdgroup, once (float accumulation: C, then fma in k order).
MSLEMU_UNCHECKED inline const float* matrix_product(const Exchange& ex) {
  float* D = reinterpret_cast<float*>(ex.shared);
  if (!*ex.shared_ready) {
    float A[8][8], B[8][8], C[8][8];
    for (uint32_t l = 0; l < kSimdWidth; l++) {
      Frags f;
      __builtin_memcpy(&f, ex.slot(l), sizeof f);
      const int r = frag_row(l), c0 = frag_col(l);
      for (int j = 0; j < 2; j++) {
        A[r][c0 + j] = f.a[j];
        B[r][c0 + j] = f.b[j];
        C[r][c0 + j] = f.c[j];
      }
    }
    for (int r = 0; r < 8; r++)
      for (int c = 0; c < 8; c++) {
        float acc = C[r][c];
        for (int k = 0; k < 8; k++) acc = __builtin_fmaf(A[r][k], B[k][c], acc);
        D[r * 8 + c] = acc;
      }
    *ex.shared_ready = true;
  }
  return D;
}
}  // namespace detail

template <class T, int Cols, int Rows = Cols>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "mslemu: only 8x8 simdgroup matrices are emulated");
  vec<T, 2> elems;

  simdgroup_matrix() = default;
  // MSL: a matrix with `d` on the diagonal and zeros elsewhere.
  explicit simdgroup_matrix(T d) {
    const uint32_t lane = mslemu::current_attrs->thread_index_in_simdgroup;
    const int r = detail::frag_row(lane), c = detail::frag_col(lane);
    elems[0] = r == c ? d : T(0);
    elems[1] = r == c + 1 ? d : T(0);
  }
  thread vec<T, 2>& thread_elements() {
    return elems;
  }
  const thread vec<T, 2>& thread_elements() const {
    return elems;
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows = Cols>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.elems = vec<T, 2>(value);
  return m;
}

// Element (r, c) of the 8x8 block at `origin` (x: column, y: row); transposed loads and
// stores exchange r and c. Each lane touches only its own two elements.
template <class T, class U>
void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, const U* src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  const uint32_t lane = mslemu::current_attrs->thread_index_in_simdgroup;
  const long r = detail::frag_row(lane), c0 = detail::frag_col(lane);
  for (int j = 0; j < 2; j++) {
    const long row = transpose_matrix ? c0 + j : r, col = transpose_matrix ? r : c0 + j;
    d.elems[j] = T(src[(long(matrix_origin.y) + row) * long(elements_per_row) + long(matrix_origin.x) + col]);
  }
}
template <class T, class U>
void simdgroup_store(const thread simdgroup_matrix<T, 8, 8>& a, U* dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  const uint32_t lane = mslemu::current_attrs->thread_index_in_simdgroup;
  const long r = detail::frag_row(lane), c0 = detail::frag_col(lane);
  for (int j = 0; j < 2; j++) {
    const long row = transpose_matrix ? c0 + j : r, col = transpose_matrix ? r : c0 + j;
    dst[(long(matrix_origin.y) + row) * long(elements_per_row) + long(matrix_origin.x) + col] = U(a.elems[j]);
  }
}

// d = a * b + c: one collective; each lane then computes its own two elements of d with
// float accumulation (products exact, summed in k order with fma).
template <class TD, class TA, class TB, class TC>
MSLEMU_INLINE void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d, const thread simdgroup_matrix<TA, 8, 8>& a,
                                   const thread simdgroup_matrix<TB, 8, 8>& b,
                                   const thread simdgroup_matrix<TC, 8, 8>& c) {
  detail::Frags mine{{float(a.elems[0]), float(a.elems[1])}, {float(b.elems[0]), float(b.elems[1])},
                     {float(c.elems[0]), float(c.elems[1])}};
  auto ex = detail::exchange(mslemu::Collective::matrix_multiply, "simdgroup_multiply_accumulate", mine);
  if (ex.active != 0xffffffffu) {
    // All 32 lanes hold a part of each matrix; a missing lane leaves them undefined.
    d.elems = detail::undefined_value<vec<TD, 2>>();
    return;
  }
  const float* D = detail::matrix_product(ex);
  const int r = detail::frag_row(ex.lane), c0 = detail::frag_col(ex.lane);
  for (int j = 0; j < 2; j++) d.elems[j] = TD(D[r * 8 + c0 + j]);
}
template <class TD, class TA, class TB>
MSLEMU_INLINE void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, const thread simdgroup_matrix<TA, 8, 8>& a,
                        const thread simdgroup_matrix<TB, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)));
}

// ---- atomics (relaxed ordering is all Metal offers for these) ----
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};
template <class T>
struct atomic {
  T value_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

namespace detail {
template <class T>
constexpr mslemu::AtomicType atomic_type() {
  if constexpr (std::is_same_v<T, float>) {
    return mslemu::AtomicType::f32;
  } else if constexpr (sizeof(T) == 8) {
    return std::is_signed_v<T> ? mslemu::AtomicType::i64 : mslemu::AtomicType::u64;
  } else {
    static_assert(sizeof(T) == 4 && std::is_integral_v<T>, "mslemu: atomics on int, uint, float, long, ulong");
    return std::is_signed_v<T> ? mslemu::AtomicType::i32 : mslemu::AtomicType::u32;
  }
}
template <class T>
uint64_t atomic_bits(T v) {
  if constexpr (sizeof(T) == 8) {
    return as_type<uint64_t>(v);
  } else {
    return as_type<uint32_t>(v);
  }
}
template <class T>
T atomic_value(uint64_t bits) {
  if constexpr (sizeof(T) == 8) {
    return as_type<T>(bits);
  } else {
    return as_type<T>(uint32_t(bits));
  }
}
template <class T>
MSLEMU_INLINE T atomic_apply(const volatile atomic<T>* obj, mslemu::AtomicOp op, T a, T b = T()) {
  return atomic_value<T>(mslemu::atomic_op(const_cast<atomic<T>*>(obj), op, atomic_type<T>(),
                                           atomic_bits(a), atomic_bits(b)));
}
}  // namespace detail

template <class T>
MSLEMU_INLINE void atomic_store_explicit(volatile atomic<T>* obj, std::type_identity_t<T> v, memory_order) {
  detail::atomic_apply<T>(obj, mslemu::AtomicOp::store, v);
}
template <class T>
MSLEMU_INLINE T atomic_load_explicit(const volatile atomic<T>* obj, memory_order) {
  return detail::atomic_apply<T>(obj, mslemu::AtomicOp::load, T());
}
template <class T>
MSLEMU_INLINE T atomic_exchange_explicit(volatile atomic<T>* obj, std::type_identity_t<T> v, memory_order) {
  return detail::atomic_apply<T>(obj, mslemu::AtomicOp::exchange, v);
}
template <class T>
MSLEMU_INLINE bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* obj, thread T* expected,
                                           std::type_identity_t<T> desired, memory_order, memory_order) {
  const T old = detail::atomic_apply<T>(obj, mslemu::AtomicOp::compare_exchange, *expected, desired);
  const bool ok = detail::atomic_bits(old) == detail::atomic_bits(*expected);
  *expected = old;
  return ok;
}
#define MSLEMU_ATOMIC_FETCH(name, op)                                                      \
  template <class T>                                                                       \
  MSLEMU_INLINE T atomic_fetch_##name##_explicit(volatile atomic<T>* obj, std::type_identity_t<T> v, memory_order) { \
    return detail::atomic_apply<T>(obj, mslemu::AtomicOp::op, v);                          \
  }
MSLEMU_ATOMIC_FETCH(add, add)
MSLEMU_ATOMIC_FETCH(sub, sub)
MSLEMU_ATOMIC_FETCH(and, and_)
MSLEMU_ATOMIC_FETCH(or, or_)
MSLEMU_ATOMIC_FETCH(xor, xor_)
MSLEMU_ATOMIC_FETCH(min, min)
MSLEMU_ATOMIC_FETCH(max, max)
#undef MSLEMU_ATOMIC_FETCH

// ---- os_log (Metal 3.2), as MLX's logging.h uses it: accepted, prints nothing ----
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... A>
  void log_debug(const char*, A...) const {}
  template <class... A>
  void log_info(const char*, A...) const {}
  template <class... A>
  void log_error(const char*, A...) const {}
};

}  // namespace metal

namespace mslemu {
// What a rewritten `threadgroup T name[...];` declaration binds to.
template <class T>
T* threadgroup_storage(uint32_t site, const char* name, int line) {
  return static_cast<T*>(threadgroup_variable(site, sizeof(T), alignof(T) < 16 ? 16 : alignof(T), name, line));
}
}  // namespace mslemu

// ---- Apple's SIMD builtins, as MLX's bf16_math.h calls them ----
#define MSLEMU_BUILTIN_FORWARD1(name) \
  template <class T>                  \
  MSLEMU_INLINE T __metal_##name(T x) { \
    return metal::name(x);            \
  }
MSLEMU_BUILTIN_FORWARD1(simd_sum)
MSLEMU_BUILTIN_FORWARD1(simd_product)
MSLEMU_BUILTIN_FORWARD1(simd_max)
MSLEMU_BUILTIN_FORWARD1(simd_min)
MSLEMU_BUILTIN_FORWARD1(simd_xor)
MSLEMU_BUILTIN_FORWARD1(simd_prefix_inclusive_sum)
MSLEMU_BUILTIN_FORWARD1(simd_prefix_exclusive_sum)
MSLEMU_BUILTIN_FORWARD1(simd_prefix_inclusive_product)
MSLEMU_BUILTIN_FORWARD1(simd_prefix_exclusive_product)
#undef MSLEMU_BUILTIN_FORWARD1
#define MSLEMU_BUILTIN_FORWARD2(name) \
  template <class T>                  \
  MSLEMU_INLINE T __metal_##name(T x, ushort k) { \
    return metal::name(x, k);         \
  }
MSLEMU_BUILTIN_FORWARD2(simd_broadcast)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle_down)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle_up)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle_xor)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle_rotate_down)
MSLEMU_BUILTIN_FORWARD2(simd_shuffle_rotate_up)
#undef MSLEMU_BUILTIN_FORWARD2
template <class T>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_down(T data, T filling, ushort delta, ushort modulo) {
  return metal::simd_shuffle_and_fill_down(data, filling, delta, modulo);
}
template <class T>
MSLEMU_INLINE T __metal_simd_shuffle_and_fill_up(T data, T filling, ushort delta, ushort modulo) {
  return metal::simd_shuffle_and_fill_up(data, filling, delta, modulo);
}
inline ushort __metal_get_simdgroup_size(ushort) {
  return ushort(mslemu::kSimdWidth);
}

// What the rewritten `threadgroup T name[...];` binds to (see tests/mslemu/cxx.py).
#define MSLEMU_THREADGROUP(name, site) \
  (*::mslemu::threadgroup_storage<::std::remove_reference_t<decltype(name)>>(site, #name, __LINE__))
