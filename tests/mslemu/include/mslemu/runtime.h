// The boundary between a kernel translation unit (MSL compiled as C++ against the
// emulation header, instrumented) and the runtime it links against (fibers, scheduler,
// memory checks, counters: csrc/runtime.cpp). Plain C++, no Metal names.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mslemu {

struct U3 {
  uint32_t x, y, z;
};

// The values of every [[attribute]] kernel parameter for the running GPU thread.
struct ThreadAttrs {
  U3 thread_position_in_grid;
  U3 thread_position_in_threadgroup;
  U3 threadgroup_position_in_grid;
  U3 threads_per_threadgroup;  // this threadgroup's size (smaller at a ragged grid edge)
  U3 dispatch_threads_per_threadgroup;  // the size requested at dispatch
  U3 threadgroups_per_grid;
  U3 threads_per_grid;
  U3 grid_origin;
  U3 grid_size;
  uint32_t thread_index_in_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;
  uint32_t thread_execution_width;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t dispatch_quadgroups_per_threadgroup;
};

// Set by the scheduler before it switches to a fiber.
extern thread_local const ThreadAttrs* current_attrs;

constexpr uint32_t kSimdWidth = 32;
// Bytes one lane may contribute to a collective (three 8x8 fragments of 2 floats fit).
constexpr uint32_t kSlotBytes = 64;

// What a collective is, for counters and error messages.
enum class Collective : uint32_t {
  reduce,           // simd_sum/product/min/max/and/or/xor
  prefix,           // simd_prefix_*
  shuffle,          // simd_shuffle*, simd_broadcast*
  vote,             // simd_all/any/ballot, simd_is_first, simd_active_threads_mask
  quad,             // quad_* (run simdgroup-wide here)
  matrix_multiply,  // simdgroup_multiply(_accumulate): one 8x8x8 MMA
};

// Scratch every lane of one collective shares: the first lane to resume computes a
// result all lanes need (a reduction, a matrix product) once.
constexpr uint32_t kSharedBytes = 256;

// A released collective: each participating lane's contribution, indexed by lane.
struct Exchange {
  const unsigned char* slots;  // kSimdWidth * kSlotBytes bytes
  uint32_t active;             // bit i set: lane i took part
  uint32_t lane;               // the calling lane
  unsigned char* shared;       // kSharedBytes
  bool* shared_ready;          // false until a lane has filled `shared`
  const void* slot(uint32_t l) const {
    return slots + l * kSlotBytes;
  }
  bool has(uint32_t l) const {
    return l < kSimdWidth && ((active >> l) & 1u);
  }
};

// Blocks the calling fiber until every live lane of its simdgroup has reached the same
// call (same call site); a lane elsewhere is a divergence error. `data` is copied to
// the caller's slot first.
Exchange simd_collective(Collective what, const char* name, const void* data, uint32_t nbytes);
void threadgroup_barrier(uint32_t mem_flags);
void simdgroup_barrier(uint32_t mem_flags);

// Storage of the kernel-scope `threadgroup` variable declared at `site` (the emulator
// rewrites each declaration into a call): shared by the threadgroup, fresh (poisoned,
// tracked as uninitialised) for every threadgroup.
void* threadgroup_variable(uint32_t site, size_t size, size_t align, const char* name, int line);

// Atomic read-modify-write on device or threadgroup memory, bounds-checked and counted.
enum class AtomicOp : uint32_t { load, store, exchange, compare_exchange, add, sub, and_, or_, xor_, min, max };
enum class AtomicType : uint32_t { i32, u32, f32, i64, u64 };
// compare_exchange: `a` is the expected value, `b` the desired one; returns the old value.
uint64_t atomic_op(void* p, AtomicOp op, AtomicType type, uint64_t a, uint64_t b);

}  // namespace mslemu
