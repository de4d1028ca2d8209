// A CPU emulator for kernelevo's CUDA kernels (tests only; DESIGN.md describes the same
// idea for Metal). Each GPU thread of a block runs as a fiber on one OS thread; every
// barrier and warp collective is a scheduling point. The kernel source is the exact text
// MLX's cuda_kernel would compile, with MLX's prelude replaced by this file.
//
// What it checks beyond the result: fibers released in forward, reverse or random order
// (exposes missing barriers), shared memory poisoned with NaN bytes, cp.async copies that
// land only at the cp.async.wait_group that covers them (exposes a read before the wait),
// a guard page after every buffer and after shared memory, barriers reached by only part
// of a block or warp (reported as a deadlock), and full-warp masks on every collective.
#pragma once
#define KE_EMULATOR 1

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) alignas(n)

// ---- 16-bit floating-point types (bit-exact round-to-nearest-even) -------------------

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if (std::isnan(f)) {
    b.x = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.x = static_cast<unsigned short>(u >> 16);
  }
  return b;
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __expf(float x) { return std::exp(x); }

// ---- the runtime ---------------------------------------------------------------------

namespace ke_emu {

struct U3 {
  unsigned x = 0, y = 0, z = 0;
};

enum class Wait { none, block, warp, done };

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  U3 tid;
  int lane = 0, warp = 0;
  Wait wait = Wait::none;
  std::vector<Copy> open;                 // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited for
};

constexpr size_t kStack = 256 * 1024;
constexpr int kWords = 12;  // 64-bit words a lane puts into one warp collective

struct State {
  U3 grid, block, block_idx;
  unsigned char* smem = nullptr;
  std::vector<Fiber> fibers;
  std::vector<int> warp_arrived;
  int block_arrived = 0;
  uint64_t xchg[1024][kWords];
  ucontext_t scheduler;
  Fiber* cur = nullptr;
  void (*body)(void**) = nullptr;
  void** args = nullptr;
  std::string error;
};

inline State& st() {
  static State* s = new State();
  return *s;
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

inline void yield() {
  State& s = st();
  swapcontext(&s.cur->ctx, &s.scheduler);
}

inline void syncthreads() {
  State& s = st();
  s.block_arrived++;
  if (s.block_arrived == static_cast<int>(s.fibers.size())) {
    s.block_arrived = 0;
    for (auto& f : s.fibers)
      if (f.wait == Wait::block) f.wait = Wait::none;
  } else {
    s.cur->wait = Wait::block;
    yield();
  }
}

inline void warp_sync() {
  State& s = st();
  Fiber& me = *s.cur;
  int& arrived = s.warp_arrived[me.warp];
  arrived++;
  if (arrived == 32) {
    arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = s.fibers[me.warp * 32 + l];
      if (f.wait == Wait::warp) f.wait = Wait::none;
    }
  } else {
    me.wait = Wait::warp;
    yield();
  }
}

inline uint64_t* my_slot() { return st().xchg[st().cur->warp * 32 + st().cur->lane]; }
inline uint64_t* lane_slot(int lane) { return st().xchg[st().cur->warp * 32 + lane]; }

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("warp collective with a partial mask");
}

inline void trampoline() {
  State& s = st();
  try {
    s.body(s.args);
  } catch (const std::exception& e) {  // must not unwind out of a fiber
    s.error = e.what();
  }
  s.cur->wait = Wait::done;
  swapcontext(&s.cur->ctx, &s.scheduler);
}

// Memory with a PROT_NONE page right after its end: an overrun faults at once.
inline void* guarded_alloc(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t rounded = (bytes + 15) / 16 * 16;
  size_t span = (rounded + page - 1) / page * page;
  auto* base = static_cast<unsigned char*>(
      mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) fail("mmap failed");
  mprotect(base + span, page, PROT_NONE);
  return base + span - rounded;
}

inline void guarded_free(void* p, size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t rounded = (bytes + 15) / 16 * 16;
  size_t span = (rounded + page - 1) / page * page;
  auto* base = static_cast<unsigned char*>(p) + rounded - span;
  munmap(base, span + page);
}

// Runs one block: fibers released in `order` (0 forward, 1 reverse, 2 random).
inline void run_block(int order, std::mt19937& rng) {
  State& s = st();
  const int n = static_cast<int>(s.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.wait = Wait::none;
    f.open.clear();
    f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::vector<int> seq(n);
  for (int i = 0; i < n; ++i) seq[i] = order == 1 ? n - 1 - i : i;
  for (;;) {
    if (order == 2) std::shuffle(seq.begin(), seq.end(), rng);
    bool ran = false, live = false;
    for (int i : seq) {
      Fiber& f = s.fibers[i];
      if (f.wait == Wait::done) continue;
      live = true;
      if (f.wait != Wait::none) continue;
      s.cur = &f;
      swapcontext(&s.scheduler, &f.ctx);
      if (!s.error.empty()) fail(s.error);
      ran = true;
    }
    if (!live) break;
    if (!ran) {
      int at_block = 0, at_warp = 0, done = 0;
      for (auto& f : s.fibers) {
        at_block += f.wait == Wait::block;
        at_warp += f.wait == Wait::warp;
        done += f.wait == Wait::done;
      }
      fail("deadlock: " + std::to_string(at_block) + " threads at __syncthreads, " +
           std::to_string(at_warp) + " at a warp collective, " + std::to_string(done) +
           " exited (a barrier not reached by the whole block or warp)");
    }
  }
  for (auto& f : s.fibers)
    if (!f.open.empty() || !f.groups.empty()) fail("cp.async copies never waited for");
}

}  // namespace ke_emu

#define threadIdx (ke_emu::st().cur->tid)
#define blockIdx (ke_emu::st().block_idx)
#define blockDim (ke_emu::st().block)
#define gridDim (ke_emu::st().grid)
#define __syncthreads() ke_emu::syncthreads()
#define __syncwarp(...) ke_emu::warp_sync()
#define KE_DYNAMIC_SMEM(name) unsigned char* name = ke_emu::st().smem

template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8);
  ke_emu::check_mask(mask);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  ke_emu::my_slot()[0] = bits;
  ke_emu::warp_sync();
  int lane = ke_emu::st().cur->lane;
  int src = (lane ^ lane_mask);
  if ((src / width) != (lane / width)) src = lane;
  T out;
  std::memcpy(&out, ke_emu::lane_slot(src), sizeof(T));
  ke_emu::warp_sync();
  return out;
}

template <class T> T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  static_assert(sizeof(T) <= 8);
  ke_emu::check_mask(mask);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  ke_emu::my_slot()[0] = bits;
  ke_emu::warp_sync();
  int lane = ke_emu::st().cur->lane;
  int src = (lane / width) * width + (src_lane % width);
  T out;
  std::memcpy(&out, ke_emu::lane_slot(src), sizeof(T));
  ke_emu::warp_sync();
  return out;
}

// float2 as CUDA declares it (8-byte aligned), for paired f32 stores.
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---- the entry points the test harness calls (tests/cudaemu/harness.py) --------------

extern "C" void ke_emu_call(void** args);  // the generated translation unit defines it

extern "C" void* ke_emu_alloc(long bytes) { return ke_emu::guarded_alloc(static_cast<size_t>(bytes)); }
extern "C" void ke_emu_free(void* p, long bytes) { ke_emu::guarded_free(p, static_cast<size_t>(bytes)); }

// Runs the kernel over a grid of gx * gy * gz blocks of bx * by * bz threads; blocks in
// order (0), reverse (1) or random (2) order, and fibers within a block likewise.
extern "C" int ke_emu_run(void** args, int gx, int gy, int gz, int bx, int by, int bz,
                          long smem_bytes, int order, unsigned seed, char* err, int err_len) {
  using namespace ke_emu;
  State& s = st();
  unsigned char* smem = nullptr;
  const size_t smem_size = static_cast<size_t>(smem_bytes > 0 ? smem_bytes : 16);
  try {
    const int n = bx * by * bz;
    if (n <= 0 || n > 1024 || n % 32) fail("block of " + std::to_string(n) + " threads: need whole warps, at most 1024");
    s.error.clear();
    s.grid = U3{unsigned(gx), unsigned(gy), unsigned(gz)};
    s.block = U3{unsigned(bx), unsigned(by), unsigned(bz)};
    if (s.fibers.size() < static_cast<size_t>(n)) {
      size_t old = s.fibers.size();
      s.fibers.resize(n);
      for (size_t i = old; i < s.fibers.size(); ++i) s.fibers[i].stack = static_cast<char*>(guarded_alloc(kStack));
    }
    std::vector<Fiber> keep(s.fibers.begin() + n, s.fibers.end());
    s.fibers.resize(n);
    for (int i = 0; i < n; ++i) {
      Fiber& f = s.fibers[i];
      f.tid = U3{unsigned(i % bx), unsigned((i / bx) % by), unsigned(i / (bx * by))};
      f.lane = i % 32;
      f.warp = i / 32;
    }
    s.warp_arrived.assign(n / 32, 0);
    s.block_arrived = 0;
    smem = static_cast<unsigned char*>(guarded_alloc(smem_size));
    s.smem = smem;
    s.body = [](void** a) { ke_emu_call(a); };
    s.args = args;
    std::vector<U3> blocks;
    for (int z = 0; z < gz; ++z)
      for (int y = 0; y < gy; ++y)
        for (int x = 0; x < gx; ++x) blocks.push_back(U3{unsigned(x), unsigned(y), unsigned(z)});
    std::mt19937 rng(seed);
    if (order == 1) std::reverse(blocks.begin(), blocks.end());
    if (order == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (const U3& b : blocks) {
      std::memset(smem, 0xff, smem_size);  // NaN in every float format
      s.block_idx = b;
      run_block(order, rng);
    }
    s.fibers.insert(s.fibers.end(), keep.begin(), keep.end());
    guarded_free(smem, smem_size);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

namespace cooperative_groups {}  // MLX's wrapper names it
