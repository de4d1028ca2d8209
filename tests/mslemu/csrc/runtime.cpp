// The emulator's runtime: runs one dispatch of a kernel compiled from MSL.
//
// * Every GPU thread is a fiber with its own stack; every threadgroup runs on one OS
//   thread (several threadgroups run in parallel on `workers` OS threads).
// * A fiber runs until it reaches a scheduling point (threadgroup_barrier,
//   simdgroup_barrier, any SIMD collective) or ends. When no fiber can run, the
//   scheduler releases every simdgroup whose live lanes all wait at the same collective,
//   else the whole threadgroup if every thread waits at the same barrier, else it reports
//   the divergence or deadlock with each group's call site.
// * Fibers are resumed in forward, reverse or seeded random order, so a missing barrier
//   changes results between schedules.
// * Every load and store of the kernel calls one of the __tsan_* hooks below (GCC's
//   -fsanitize=thread instrumentation, no TSan library): device accesses are
//   bounds-checked per buffer and counted; threadgroup accesses are checked against the
//   declared variables, for reads of uninitialised bytes and for races (a read, or write,
//   of a byte another thread wrote, or read, since the last barrier that orders them).
// * Errors are written as JSON (call sites as return addresses, symbolized by Python)
//   and the process exits; a watchdog reports threads that stop making progress.
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__) || defined(MSLEMU_UCONTEXT)
#define MSLEMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#include "mslemu/runtime.h"

// The generated entry point (kernel translation unit): calls the kernel with the
// dispatch's buffers and the running thread's attribute values.
extern "C" void mslemu_kernel_thread(void* const* buffers);

namespace mslemu {

thread_local const ThreadAttrs* current_attrs = nullptr;

namespace {

constexpr int kExitKernelError = 3;
constexpr int kExitCrash = 4;
constexpr int kMaxChain = 6;
constexpr size_t kGuard = size_t(1) << 20;  // unmapped bytes around every device buffer
constexpr size_t kRedzone = 32;            // unallocated bytes after every threadgroup variable
constexpr uint32_t kMaxThreads = 1024;

// ---------------------------------------------------------------- error reporting

struct Chain {
  const void* pc[kMaxChain];
  int n = 0;
  bool operator==(const Chain& o) const {
    if (n != o.n) return false;
    for (int i = 0; i < n; i++)
      if (pc[i] != o.pc[i]) return false;
    return true;
  }
};

uintptr_t g_stack_lo = 0, g_stack_span = 0;  // all fiber stacks

// Return addresses from `frame` outwards (kernel code is compiled with frame pointers;
// a fiber's outermost frame has a null frame pointer). Only frames on fiber stacks.
__attribute__((noinline)) Chain chain_from(void* frame) {
  Chain c;
  void** fp = static_cast<void**>(frame);
  while (fp && reinterpret_cast<uintptr_t>(fp) - g_stack_lo < g_stack_span && c.n < kMaxChain) {
    void* ra = fp[1];
    if (!ra) break;
    c.pc[c.n++] = ra;
    void** next = static_cast<void**>(fp[0]);
    if (next <= fp) break;
    fp = next;
  }
  return c;
}

// Return address -> source-position id (sites.txt, written by build.py): calls the
// compiler duplicated or merged compare by where they are in the source.
std::vector<std::pair<uintptr_t, uintptr_t>> g_site_ids;

void load_site_ids() {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return;
  std::string path(exe, size_t(n));
  path = path.substr(0, path.rfind('/') + 1) + "sites.txt";
  FILE* f = fopen(path.c_str(), "r");
  if (!f) return;
  unsigned long pc, id;
  while (fscanf(f, "%lx %lu", &pc, &id) == 2) g_site_ids.emplace_back(pc, id);
  fclose(f);
  std::sort(g_site_ids.begin(), g_site_ids.end());
}

// The chain with every known return address replaced by its source-position id.
Chain site_key_uncached(const Chain& c) {
  Chain k = c;
  for (int i = 0; i < k.n; i++) {
    const uintptr_t pc = reinterpret_cast<uintptr_t>(k.pc[i]);
    auto it = std::lower_bound(g_site_ids.begin(), g_site_ids.end(), std::make_pair(pc, uintptr_t(0)));
    if (it != g_site_ids.end() && it->first == pc) k.pc[i] = reinterpret_cast<const void*>(it->second);
  }
  return k;
}

// Barriers and collectives are called from few sites, many times: remember the keys.
Chain site_key(const Chain& c) {
  struct Entry {
    Chain raw, key;
  };
  static thread_local Entry cache[64];
  Entry& e = cache[(reinterpret_cast<uintptr_t>(c.pc[0]) >> 2) & 63];
  if (!(e.raw == c) || e.raw.n == 0) {
    e.raw = c;
    e.key = site_key_uncached(c);
  }
  return e.key;
}

std::string chain_json(const Chain& c) {
  std::string s = "[";
  char buf[32];
  for (int i = 0; i < c.n; i++) {
    snprintf(buf, sizeof buf, "%s\"0x%lx\"", i ? "," : "", reinterpret_cast<unsigned long>(c.pc[i]));
    s += buf;
  }
  return s + "]";
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      o += '\\';
      o += ch;
    } else if (ch == '\n') {
      o += "\\n";
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      o += ' ';
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string g_response_prefix;
std::atomic<int> g_reporting{0};

// Only the first thread to fail reports (the process ends right after); others wait.
void claim_report() {
  if (g_reporting.exchange(1) != 0)
    for (;;) pause();
}

void write_error_file(const std::string& json) {
  const std::string path = g_response_prefix + ".error.json", tmp = path + ".tmp";
  if (FILE* f = fopen(tmp.c_str(), "w")) {
    fwrite(json.data(), 1, json.size(), f);
    fclose(f);
    rename(tmp.c_str(), path.c_str());
  }
}

// Writes <prefix>.error.json and ends the process. `message` may contain {site:N}, which
// Python replaces by the source location of sites[N].
[[noreturn]] void fail(const char* kind, const std::string& message, const std::vector<Chain>& sites,
                       const std::string& extra = "") {
  claim_report();
  std::string j = "{\"kind\":" + json_string(kind) + ",\"message\":" + json_string(message) + ",\"sites\":[";
  for (size_t i = 0; i < sites.size(); i++) j += (i ? "," : "") + chain_json(sites[i]);
  j += "]" + extra + "}\n";
  write_error_file(j);
  _exit(kExitKernelError);
}

// ---------------------------------------------------------------- dispatch state

enum class Role { input, output, meta };

struct Buffer {
  std::string name;
  Role role;
  size_t size = 0;
  size_t itemsize = 1;
  unsigned char* base = nullptr;
  bool initialized = false;  // inputs, and outputs given an init_value
  std::vector<std::atomic<uint8_t>>* read_flags = nullptr;
  std::vector<std::atomic<uint8_t>>* write_flags = nullptr;
};

struct Options {
  U3 grid{1, 1, 1}, group{1, 1, 1};
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  int workers = 1;
  long timeout_ms = 60000;
  bool race_check = true;
  size_t max_threadgroup_memory = 32768;
  size_t stack_bytes = 128 * 1024;
};

Options g_opt;
std::vector<Buffer> g_buffers;
std::vector<void*> g_buffer_ptrs;
uintptr_t g_dev_lo = 0, g_dev_span = 0;
std::vector<int32_t> g_chunk_owner;  // per MiB of the device region: buffer index, or -1 - previous buffer
uintptr_t g_tg_lo = 0, g_tg_span = 0;
U3 g_groups{1, 1, 1};

// ---------------------------------------------------------------- fibers

enum class State : uint8_t { runnable, barrier, simd_barrier, collective, done };

struct Fiber {
  void* sp = nullptr;
#ifdef MSLEMU_USE_UCONTEXT
  ucontext_t uc;
#endif
  ThreadAttrs attrs;
  uint32_t lid = 0, sg = 0, lane = 0;
  State state = State::runnable;
  Chain site;      // return addresses of the call it waits at (for reports)
  Chain site_key;  // the same call by source position (for comparisons)
  const char* site_name = "";
  Collective kind = Collective::reduce;
  uint32_t collectives = 0;  // completed collectives (picks the exchange buffer)
  unsigned char* stack = nullptr;
};

// Per byte of threadgroup memory: who last wrote and read it, in which barrier interval.
struct Shadow {
  uint16_t writer;  // 0: never written; lid + 1; kAtomicWriter
  uint16_t reader;  // 0: none this interval; lid + 1; kManyReaders
  uint16_t reader_sg;  // simdgroup of the readers, or kMixed
  uint32_t write_epoch, write_sg_epoch, read_epoch, read_sg_epoch;
  const void* write_pc;
  const void* read_pc;
};
constexpr uint16_t kAtomicWriter = 0xfffe, kManyReaders = 0xffff, kMixed = 0xffff;

struct TgVar {
  uint32_t site;
  size_t offset, size;
  const char* name;
  int line;
};

struct Counters {
  std::vector<uint64_t> read, written;
  uint64_t tg_read = 0, tg_written = 0, barriers = 0, simd_barriers = 0, collectives = 0, mma = 0, atomics = 0;
  size_t tg_memory = 0;
};

struct Worker {
  int index = 0;
  pthread_t thread{};
  std::vector<Fiber> fibers;
  unsigned char* stacks = nullptr;
  void* scheduler_sp = nullptr;
#ifdef MSLEMU_USE_UCONTEXT
  ucontext_t scheduler_uc;
#endif
  Fiber* current = nullptr;
  U3 group_pos{}, group_size{};
  uint32_t nthreads = 0, nsimd = 0;
  uint32_t epoch = 0;
  std::vector<uint32_t> sg_epoch;
  std::vector<unsigned char> slots;  // [simdgroup][parity][lane][kSlotBytes]
  std::vector<uint32_t> active;      // [simdgroup][parity]
  std::vector<unsigned char> shared;  // [simdgroup][parity][kSharedBytes]
  std::vector<uint8_t> shared_ready;  // [simdgroup][parity]
  unsigned char* arena = nullptr;
  size_t arena_capacity = 0, arena_used = 0, declared = 0;
  std::vector<uint8_t> allocated;
  std::vector<Shadow> shadow;
  std::vector<TgVar> vars;
  std::vector<int64_t> site_offset;
  std::mt19937_64 rng;
  Counters counters;
  std::vector<uint32_t> order;
  // For the watchdog: where the fiber was when it was interrupted.
  std::atomic<bool> interrupted{false};
  Chain interrupted_at;
  const void* last_pc = nullptr;  // the kernel's latest memory access or atomic
  volatile bool running = false;
};

thread_local Worker* tls_worker = nullptr;
std::vector<Worker*> g_workers;

#ifndef MSLEMU_USE_UCONTEXT
// switch_stack(save, load): push callee-saved registers and the FP control words, save
// the stack pointer to *save, continue on `load` (a stack saved the same way).
extern "C" void mslemu_switch_stack(void** save, void* load);
extern "C" void mslemu_fiber_trampoline();
asm(R"(
  .text
  .globl mslemu_switch_stack
  .type mslemu_switch_stack, @function
mslemu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mslemu_switch_stack, .-mslemu_switch_stack

  .globl mslemu_fiber_trampoline
  .type mslemu_fiber_trampoline, @function
mslemu_fiber_trampoline:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size mslemu_fiber_trampoline, .-mslemu_fiber_trampoline
)");
#endif

void fiber_main(void* arg);

void prepare_fiber(Fiber& f) {
  unsigned char* top = f.stack + g_opt.stack_bytes;
#ifdef MSLEMU_USE_UCONTEXT
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = g_opt.stack_bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(+[](unsigned hi, unsigned lo) {
                fiber_main(reinterpret_cast<void*>((uintptr_t(hi) << 32) | lo));
              }),
              2, unsigned(uintptr_t(&f) >> 32), unsigned(uintptr_t(&f) & 0xffffffffu));
  (void)top;
#else
  // The frame mslemu_switch_stack pops: FP control words, r15..r12, rbx, rbp (0: the end
  // of the frame-pointer chain) and the trampoline as return address.
  uintptr_t x = (reinterpret_cast<uintptr_t>(top) - 16) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(x);
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  s[-1] = reinterpret_cast<uint64_t>(&mslemu_fiber_trampoline);
  s[-2] = 0;                                          // rbp
  s[-3] = 0;                                          // rbx
  s[-4] = reinterpret_cast<uint64_t>(&fiber_main);    // r12
  s[-5] = reinterpret_cast<uint64_t>(&f);             // r13
  s[-6] = 0;                                          // r14
  s[-7] = 0;                                          // r15
  std::memcpy(&s[-8], csr, 8);
  f.sp = &s[-8];
#endif
}

void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
  current_attrs = &f.attrs;
#ifdef MSLEMU_USE_UCONTEXT
  swapcontext(&w.scheduler_uc, &f.uc);
#else
  mslemu_switch_stack(&w.scheduler_sp, f.sp);
#endif
  w.current = nullptr;
}

void yield_to_scheduler(Worker& w, Fiber& f) {
#ifdef MSLEMU_USE_UCONTEXT
  swapcontext(&f.uc, &w.scheduler_uc);
#else
  mslemu_switch_stack(&f.sp, w.scheduler_sp);
#endif
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  mslemu_kernel_thread(g_buffer_ptrs.data());
  f.state = State::done;
  yield_to_scheduler(*tls_worker, f);
  __builtin_trap();
}

// ---------------------------------------------------------------- descriptions

std::string u3(U3 v) {
  return format("(%u,%u,%u)", v.x, v.y, v.z);
}

std::string thread_desc(const Worker& w, const Fiber& f) {
  return format("thread %u (position %s in threadgroup %s, simdgroup %u lane %u)", f.lid,
                u3(f.attrs.thread_position_in_threadgroup).c_str(), u3(w.group_pos).c_str(), f.sg, f.lane);
}

// "0-31, 64-95"
std::string ranges(const std::vector<uint32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) j++;
    if (!s.empty()) s += ", ";
    s += ids[i] == ids[j] ? format("%u", ids[i]) : format("%u-%u", ids[i], ids[j]);
    i = j + 1;
  }
  return s;
}

const char* state_verb(State s) {
  switch (s) {
    case State::barrier:
      return "wait at threadgroup_barrier";
    case State::simd_barrier:
      return "wait at simdgroup_barrier";
    case State::collective:
      return "wait at";
    case State::done:
      return "have returned";
    default:
      return "wait for their turn (a thread runs until it reaches a barrier, a collective or its end)";
  }
}

// Groups the given threads by what they are doing; one line per group.
std::string describe_threads(const Worker& w, const std::vector<uint32_t>& lids, std::vector<Chain>& sites) {
  struct Group {
    State state;
    Chain site, key;
    const char* name;
    std::vector<uint32_t> ids;
  };
  std::vector<Group> groups;
  for (uint32_t lid : lids) {
    const Fiber& f = w.fibers[lid];
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.state == f.state && (f.state == State::done || g.key == f.site_key);
    });
    if (it == groups.end()) {
      groups.push_back({f.state, f.site, f.site_key, f.site_name, {lid}});
    } else {
      it->ids.push_back(lid);
    }
  }
  std::string s;
  for (auto& g : groups) {
    s += format("\n  threads %s %s", ranges(g.ids).c_str(), state_verb(g.state));
    if (g.state == State::collective) s += format(" %s", g.name);
    if (g.state != State::done && g.state != State::runnable) {
      s += format(" ({site:%zu})", sites.size());
      sites.push_back(g.site);
    }
  }
  return s;
}

// ---------------------------------------------------------------- scheduling

unsigned char* slot_base(Worker& w, uint32_t sg, uint32_t parity) {
  return w.slots.data() + (size_t(sg) * 2 + parity) * kSimdWidth * kSlotBytes;
}

// Releases what can proceed; reports an error when nothing can.
void resolve(Worker& w) {
  bool released = false;
  for (uint32_t s = 0; s < w.nsimd; s++) {
    const uint32_t first = s * kSimdWidth, last = std::min(first + kSimdWidth, w.nthreads);
    Fiber* lead = nullptr;
    bool uniform = true;
    uint32_t active = 0;
    for (uint32_t l = first; l < last; l++) {
      Fiber& f = w.fibers[l];
      if (f.state == State::done) continue;
      if (!lead) {
        lead = &f;
      } else if (f.state != lead->state || !(f.site_key == lead->site_key)) {
        uniform = false;
      }
      active |= 1u << (l - first);
    }
    if (!lead || !uniform) continue;
    if (lead->state == State::collective) {
      w.active[s * 2 + (lead->collectives & 1)] = active;
      w.shared_ready[s * 2 + (lead->collectives & 1)] = 0;
      if (lead->kind == Collective::matrix_multiply) {
        w.counters.mma++;
      } else {
        w.counters.collectives++;
      }
    } else if (lead->state == State::simd_barrier) {
      w.sg_epoch[s]++;
      w.counters.simd_barriers++;
    } else {
      continue;
    }
    for (uint32_t l = first; l < last; l++)
      if (w.fibers[l].state != State::done) w.fibers[l].state = State::runnable;
    released = true;
  }
  if (released) return;

  std::vector<uint32_t> waiting, exited;
  bool all_barrier = true, same_site = true;
  const Fiber* lead = nullptr;
  for (uint32_t l = 0; l < w.nthreads; l++) {
    const Fiber& f = w.fibers[l];
    if (f.state == State::done) {
      exited.push_back(l);
      continue;
    }
    waiting.push_back(l);
    if (f.state != State::barrier) all_barrier = false;
    if (!lead) {
      lead = &f;
    } else if (!(f.site_key == lead->site_key)) {
      same_site = false;
    }
  }
  if (all_barrier && same_site && exited.empty()) {
    for (auto& f : w.fibers)
      if (f.state == State::barrier) f.state = State::runnable;
    w.epoch++;
    for (auto& e : w.sg_epoch) e++;
    w.counters.barriers++;
    return;
  }
  std::vector<uint32_t> everyone(w.nthreads);
  for (uint32_t l = 0; l < w.nthreads; l++) everyone[l] = l;
  std::vector<Chain> sites;
  const std::string groups = describe_threads(w, everyone, sites);
  if (all_barrier && same_site) {
    fail("deadlock",
         format("deadlock in threadgroup %s: threads wait at a threadgroup_barrier that threads which "
                "returned never reach (the GPU hangs or misbehaves):",
                u3(w.group_pos).c_str()) + groups,
         sites);
  }
  bool collective_divergence = false;
  for (uint32_t l : waiting)
    if (w.fibers[l].state != State::barrier) collective_divergence = true;
  fail("divergence",
       format("divergent %s in threadgroup %s: all live threads of a %s must reach the same call:",
              collective_divergence ? "SIMD-group collective" : "threadgroup_barrier", u3(w.group_pos).c_str(),
              collective_divergence ? "simdgroup" : "threadgroup") +
           groups,
       sites);
}

void make_order(Worker& w) {
  w.order.clear();
  for (uint32_t l = 0; l < w.nthreads; l++)
    if (w.fibers[l].state == State::runnable) w.order.push_back(l);
  if (g_opt.schedule == 1) {
    std::reverse(w.order.begin(), w.order.end());
  } else if (g_opt.schedule == 2) {
    std::shuffle(w.order.begin(), w.order.end(), w.rng);
  }
}

void reset_threadgroup_memory(Worker& w) {
  std::fill(w.allocated.begin(), w.allocated.begin() + w.arena_used, 0);
  w.arena_used = 0;
  w.declared = 0;
  w.vars.clear();
  std::fill(w.site_offset.begin(), w.site_offset.end(), -1);
}

void run_threadgroup(Worker& w, U3 pos) {
  const U3 g = g_opt.group;
  U3 size{std::min(g.x, g_opt.grid.x - pos.x * g.x), std::min(g.y, g_opt.grid.y - pos.y * g.y),
          std::min(g.z, g_opt.grid.z - pos.z * g.z)};
  w.group_pos = pos;
  w.group_size = size;
  w.nthreads = size.x * size.y * size.z;
  w.nsimd = (w.nthreads + kSimdWidth - 1) / kSimdWidth;
  w.epoch = 0;
  w.sg_epoch.assign(w.nsimd, 0);
  w.rng.seed(g_opt.seed * 0x9e3779b97f4a7c15ull + (uint64_t(pos.z) << 42) + (uint64_t(pos.y) << 21) + pos.x);
  reset_threadgroup_memory(w);
  const uint32_t dispatch_threads = g.x * g.y * g.z;
  for (uint32_t lid = 0; lid < w.nthreads; lid++) {
    Fiber& f = w.fibers[lid];
    ThreadAttrs& a = f.attrs;
    const U3 t{lid % size.x, (lid / size.x) % size.y, lid / (size.x * size.y)};
    a.thread_position_in_threadgroup = t;
    a.threadgroup_position_in_grid = pos;
    a.thread_position_in_grid = {pos.x * g.x + t.x, pos.y * g.y + t.y, pos.z * g.z + t.z};
    a.threads_per_threadgroup = size;
    a.dispatch_threads_per_threadgroup = g;
    a.threadgroups_per_grid = g_groups;
    a.threads_per_grid = g_opt.grid;
    a.grid_size = g_opt.grid;
    a.grid_origin = {0, 0, 0};
    a.thread_index_in_threadgroup = lid;
    a.simdgroup_index_in_threadgroup = lid / kSimdWidth;
    a.thread_index_in_simdgroup = lid % kSimdWidth;
    a.simdgroups_per_threadgroup = w.nsimd;
    a.dispatch_simdgroups_per_threadgroup = (dispatch_threads + kSimdWidth - 1) / kSimdWidth;
    a.threads_per_simdgroup = kSimdWidth;
    a.thread_execution_width = kSimdWidth;
    a.quadgroup_index_in_threadgroup = lid / 4;
    a.thread_index_in_quadgroup = lid % 4;
    a.quadgroups_per_threadgroup = (w.nthreads + 3) / 4;
    a.dispatch_quadgroups_per_threadgroup = (dispatch_threads + 3) / 4;
    f.lid = lid;
    f.sg = lid / kSimdWidth;
    f.lane = lid % kSimdWidth;
    f.state = State::runnable;
    f.collectives = 0;
    f.site = f.site_key = Chain{};
    prepare_fiber(f);
  }
  for (;;) {
    make_order(w);
    for (uint32_t lid : w.order)
      if (w.fibers[lid].state == State::runnable) switch_to_fiber(w, w.fibers[lid]);
    bool all_done = true;
    for (uint32_t l = 0; l < w.nthreads; l++)
      if (w.fibers[l].state != State::done) all_done = false;
    if (all_done) break;
    resolve(w);
  }
  w.counters.tg_memory = std::max(w.counters.tg_memory, w.declared);
}

// ---------------------------------------------------------------- memory checks

const char* kAccess[2] = {"read", "write"};

long long floor_div(long long a, long long b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

[[noreturn]] void device_out_of_bounds(uintptr_t a, size_t n, bool write, void* frame) {
  // Name the buffer the address is in or nearest to.
  size_t b = 0, best = SIZE_MAX;
  for (size_t i = 0; i < g_buffers.size(); i++) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g_buffers[i].base), hi = lo + g_buffers[i].size;
    const size_t d = a < lo ? lo - a : (a >= hi ? a - hi : 0);
    if (d < best) {
      best = d;
      b = i;
    }
  }
  const Buffer& B = g_buffers[b];
  const long long rel = static_cast<long long>(a - reinterpret_cast<uintptr_t>(B.base));
  Worker& w = *tls_worker;
  std::vector<Chain> sites{chain_from(frame)};
  fail("out_of_bounds",
       format("out-of-bounds device %s of %zu bytes at byte offset %lld of buffer '%s' (%zu bytes, element %lld of "
              "%zu) by %s at {site:0}",
              kAccess[write], n, rel, B.name.c_str(), B.size, floor_div(rel, (long long)B.itemsize),
              B.size / B.itemsize, thread_desc(w, *w.current).c_str()),
       sites, format(",\"buffer\":%s,\"offset\":%lld,\"access\":\"%s\"", json_string(B.name).c_str(), rel, kAccess[write]));
}

void device_access(uintptr_t a, size_t n, bool write, void* frame) {
  const uintptr_t off = a - g_dev_lo;
  const int32_t b = g_chunk_owner[off >> 20];
  if (b < 0) device_out_of_bounds(a, n, write, frame);
  Buffer& B = g_buffers[b];
  const size_t rel = a - reinterpret_cast<uintptr_t>(B.base);
  if (rel + n > B.size) device_out_of_bounds(a, n, write, frame);
  Worker& w = *tls_worker;
  w.last_pc = static_cast<void**>(frame)[1];
  if (write) {
    w.counters.written[b] += n;
    for (size_t i = 0; i < n; i++) (*B.write_flags)[rel + i].store(1, std::memory_order_relaxed);
  } else {
    if (!B.initialized) {
      for (size_t i = 0; i < n; i++) {
        if (!(*B.write_flags)[rel + i].load(std::memory_order_relaxed)) {
          std::vector<Chain> sites{chain_from(frame)};
          fail("uninitialized",
               format("read of uninitialised output '%s' at byte offset %zu (element %zu), which no thread has "
                      "written (outputs start undefined unless init_value is given), by %s at {site:0}",
                      B.name.c_str(), rel + i, (rel + i) / B.itemsize, thread_desc(w, *w.current).c_str()),
               sites, format(",\"buffer\":%s", json_string(B.name).c_str()));
        }
      }
    }
    w.counters.read[b] += n;
    for (size_t i = 0; i < n; i++) (*B.read_flags)[rel + i].store(1, std::memory_order_relaxed);
  }
}

const TgVar* var_at(const Worker& w, size_t off) {
  const TgVar* best = nullptr;
  for (const auto& v : w.vars)
    if (v.offset <= off && (!best || v.offset > best->offset)) best = &v;
  return best;
}

std::string var_desc(const Worker& w, size_t off) {
  const TgVar* v = var_at(w, off);
  if (!v) return format("threadgroup memory offset %zu", off);
  return format("threadgroup variable '%s' (declared at line %d, %zu bytes) at byte %lld", v->name, v->line, v->size,
                static_cast<long long>(off - v->offset));
}

void threadgroup_access(uintptr_t a, size_t n, bool write, void* frame, bool atomic = false) {
  Worker& w = *tls_worker;
  const size_t off = a - reinterpret_cast<uintptr_t>(w.arena);
  if (a < reinterpret_cast<uintptr_t>(w.arena) || off + n > w.arena_capacity) {
    std::vector<Chain> sites{chain_from(frame)};
    fail("out_of_bounds", format("%s of another threadgroup's memory at {site:0}", kAccess[write]), sites);
  }
  Fiber& f = *w.current;
  w.last_pc = static_cast<void**>(frame)[1];
  for (size_t i = 0; i < n; i++) {
    if (!w.allocated[off + i]) {
      std::vector<Chain> sites{chain_from(frame)};
      const TgVar* v = var_at(w, off + i);
      fail("out_of_bounds",
           format("out-of-bounds threadgroup %s of %zu bytes: byte %zu past the end of threadgroup variable '%s' "
                  "(declared at line %d, %zu bytes) by %s at {site:0}",
                  kAccess[write], n, v ? off + i - v->offset - v->size : off + i, v ? v->name : "?", v ? v->line : 0,
                  v ? v->size : 0, thread_desc(w, f).c_str()),
           sites);
    }
  }
  if (write) {
    w.counters.tg_written += n;
  } else {
    w.counters.tg_read += n;
  }
  const uint16_t me = uint16_t(f.lid + 1);
  const uint32_t sg_epoch = w.sg_epoch[f.sg];
  // A byte last touched by thread u is ordered before this access when a barrier both
  // threads took part in came in between (a simdgroup_barrier orders a simdgroup).
  auto ordered = [&](uint16_t u_plus1, uint32_t epoch, uint32_t u_sg_epoch) {
    const uint32_t u_sg = uint32_t(u_plus1 - 1) / kSimdWidth;
    return u_sg == f.sg ? u_sg_epoch != sg_epoch : epoch != w.epoch;
  };
  for (size_t i = 0; i < n; i++) {
    Shadow& s = w.shadow[off + i];
    if (!write) {
      if (s.writer == 0) {
        std::vector<Chain> sites{chain_from(frame)};
        fail("uninitialized",
             format("read of uninitialised threadgroup memory: %s, never written in this threadgroup, by %s at {site:0}",
                    var_desc(w, off + i).c_str(), thread_desc(w, f).c_str()),
             sites);
      }
      if (g_opt.race_check && !atomic && s.writer != me && s.writer != kAtomicWriter &&
          !ordered(s.writer, s.write_epoch, s.write_sg_epoch)) {
        Chain wc;
        wc.pc[0] = s.write_pc;
        wc.n = 1;
        std::vector<Chain> sites{chain_from(frame), wc};
        fail("race",
             format("missing barrier: %s reads %s at {site:0}; thread %u wrote it at {site:1} and no barrier "
                    "between the two orders them",
                    thread_desc(w, f).c_str(), var_desc(w, off + i).c_str(), s.writer - 1u),
             sites);
      }
      if (s.reader == 0 || s.read_epoch != w.epoch) {
        s.reader = me;
        s.reader_sg = uint16_t(f.sg);
      } else if (s.reader != me) {
        if (s.reader_sg == f.sg && s.read_sg_epoch != sg_epoch) {
          s.reader = me;  // the earlier reads are ordered by a simdgroup_barrier
        } else {
          s.reader = kManyReaders;
          if (s.reader_sg != f.sg) s.reader_sg = kMixed;
        }
      }
      s.read_epoch = w.epoch;
      s.read_sg_epoch = sg_epoch;
      s.read_pc = static_cast<void**>(frame)[1];
    } else {
      if (g_opt.race_check && !atomic) {
        const bool waw = s.writer != 0 && s.writer != me && s.writer != kAtomicWriter &&
                         !ordered(s.writer, s.write_epoch, s.write_sg_epoch);
        const bool war = s.reader != 0 && s.reader != me && s.read_epoch == w.epoch &&
                         !(s.reader_sg == f.sg && s.read_sg_epoch != sg_epoch);
        if (waw || war) {
          Chain other;
          other.pc[0] = waw ? s.write_pc : s.read_pc;
          other.n = 1;
          std::vector<Chain> sites{chain_from(frame), other};
          fail("race",
               format("missing barrier: %s writes %s at {site:0}; %s %s it at {site:1} and no barrier between the two "
                      "orders them",
                      thread_desc(w, f).c_str(), var_desc(w, off + i).c_str(),
                      waw ? format("thread %u", s.writer - 1u).c_str()
                          : (s.reader == kManyReaders ? "other threads" : format("thread %u", s.reader - 1u).c_str()),
                      waw ? "wrote" : "read"),
               sites);
        }
      }
      s.writer = atomic ? kAtomicWriter : me;
      s.write_epoch = w.epoch;
      s.write_sg_epoch = sg_epoch;
      s.write_pc = static_cast<void**>(frame)[1];
      s.reader = 0;
    }
  }
}

inline void check_access(uintptr_t a, size_t n, bool write, void* frame) {
  if (a - g_dev_lo < g_dev_span) {
    device_access(a, n, write, frame);
  } else if (a - g_tg_lo < g_tg_span) {
    threadgroup_access(a, n, write, frame);
  }
}

}  // namespace

// ---------------------------------------------------------------- the kernel's calls

Exchange simd_collective(Collective what, const char* name, const void* data, uint32_t nbytes) {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
  const uint32_t parity = f.collectives & 1;
  unsigned char* base = slot_base(w, f.sg, parity);
  std::memcpy(base + f.lane * kSlotBytes, data, nbytes);
  f.state = State::collective;
  f.site = chain_from(__builtin_frame_address(0));
  f.site_key = site_key(f.site);
  f.site_name = name;
  f.kind = what;
  yield_to_scheduler(w, f);
  f.collectives++;
  const size_t k = size_t(f.sg) * 2 + parity;
  return Exchange{base, w.active[k], f.lane, w.shared.data() + k * kSharedBytes,
                  reinterpret_cast<bool*>(&w.shared_ready[k])};
}

void threadgroup_barrier(uint32_t) {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
  f.state = State::barrier;
  f.site = chain_from(__builtin_frame_address(0));
  f.site_key = site_key(f.site);
  f.site_name = "threadgroup_barrier";
  yield_to_scheduler(w, f);
}

void simdgroup_barrier(uint32_t) {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
  f.state = State::simd_barrier;
  f.site = chain_from(__builtin_frame_address(0));
  f.site_key = site_key(f.site);
  f.site_name = "simdgroup_barrier";
  yield_to_scheduler(w, f);
  f.collectives++;
}

void* threadgroup_variable(uint32_t site, size_t size, size_t align, const char* name, int line) {
  Worker& w = *tls_worker;
  if (site >= w.site_offset.size()) w.site_offset.resize(site + 1, -1);
  if (w.site_offset[site] >= 0) return w.arena + w.site_offset[site];
  const size_t off = (w.arena_used + align - 1) / align * align;
  w.declared += size;
  if (w.declared > g_opt.max_threadgroup_memory || off + size + kRedzone > w.arena_capacity) {
    std::vector<Chain> sites{chain_from(__builtin_frame_address(0))};
    fail("limit",
         format("threadgroup memory limit: declaring '%s' (line %d, %zu bytes) brings the threadgroup to %zu bytes; "
                "Metal allows %zu",
                name, line, size, w.declared, g_opt.max_threadgroup_memory),
         sites);
  }
  std::memset(w.arena + off, 0xff, size);  // NaN in every float format
  std::fill(w.allocated.begin() + off, w.allocated.begin() + off + size, 1);
  std::memset(static_cast<void*>(w.shadow.data() + off), 0, size * sizeof(Shadow));
  w.arena_used = off + size + kRedzone;
  w.site_offset[site] = int64_t(off);
  w.vars.push_back({site, off, size, name, line});
  return w.arena + off;
}

uint64_t atomic_op(void* p, AtomicOp op, AtomicType type, uint64_t a, uint64_t b) {
  const size_t n = (type == AtomicType::i64 || type == AtomicType::u64) ? 8 : 4;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  void* frame = __builtin_frame_address(0);
  Worker& w = *tls_worker;
  w.counters.atomics++;
  w.last_pc = static_cast<void**>(frame)[1];
  const bool writes = op != AtomicOp::load;
  if (addr - g_dev_lo < g_dev_span) {
    if (op != AtomicOp::store) device_access(addr, n, false, frame);
    if (writes) device_access(addr, n, true, frame);
  } else if (addr - g_tg_lo < g_tg_span) {
    if (op != AtomicOp::store) threadgroup_access(addr, n, false, frame, true);
    if (writes) threadgroup_access(addr, n, true, frame, true);
  }
  auto rmw = [&](auto* obj, auto conv) {
    using T = std::remove_pointer_t<decltype(obj)>;
    const T va = conv(a), vb = conv(b);
    T old;
    __atomic_load(obj, &old, __ATOMIC_RELAXED);
    for (;;) {
      T nv{};
      switch (op) {
        case AtomicOp::load:
          return old;
        case AtomicOp::store:
          __atomic_store(obj, const_cast<T*>(&va), __ATOMIC_RELAXED);
          return old;
        case AtomicOp::exchange:
          nv = va;
          break;
        case AtomicOp::compare_exchange:
          if (std::memcmp(&old, &va, sizeof(T)) != 0) return old;
          nv = vb;
          break;
        case AtomicOp::add:
          nv = T(old + va);
          break;
        case AtomicOp::sub:
          nv = T(old - va);
          break;
        case AtomicOp::min:
          nv = va < old ? va : old;
          break;
        case AtomicOp::max:
          nv = va > old ? va : old;
          break;
        default:
          if constexpr (std::is_integral_v<T>) {
            nv = op == AtomicOp::and_ ? T(old & va) : op == AtomicOp::or_ ? T(old | va) : T(old ^ va);
          }
          break;
      }
      if (__atomic_compare_exchange(obj, &old, &nv, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
    }
  };
  auto bits = [](auto v) {
    uint64_t r = 0;
    std::memcpy(&r, &v, sizeof v);
    return r;
  };
  switch (type) {
    case AtomicType::i32:
      return bits(rmw(static_cast<int32_t*>(p), [](uint64_t v) { return int32_t(uint32_t(v)); }));
    case AtomicType::u32:
      return bits(rmw(static_cast<uint32_t*>(p), [](uint64_t v) { return uint32_t(v); }));
    case AtomicType::f32:
      return bits(rmw(static_cast<float*>(p), [](uint64_t v) {
        float f;
        uint32_t u = uint32_t(v);
        std::memcpy(&f, &u, 4);
        return f;
      }));
    case AtomicType::i64:
      return bits(rmw(static_cast<int64_t*>(p), [](uint64_t v) { return int64_t(v); }));
    case AtomicType::u64:
      return bits(rmw(static_cast<uint64_t*>(p), [](uint64_t v) { return v; }));
  }
  return 0;
}

}  // namespace mslemu

// ---------------------------------------------------------------- instrumentation hooks

// GCC's -fsanitize=thread instrumentation (without its runtime library) calls these for
// every load and store of the kernel, reads and writes apart, never merged.
using mslemu::check_access;
#define MSLEMU_HOOKS(n)                                                    \
  extern "C" void __tsan_read##n(void* a) {                                \
    check_access(uintptr_t(a), n, false, __builtin_frame_address(0));      \
  }                                                                        \
  extern "C" void __tsan_write##n(void* a) {                               \
    check_access(uintptr_t(a), n, true, __builtin_frame_address(0));       \
  }                                                                        \
  extern "C" void __tsan_unaligned_read##n(void* a) {                      \
    check_access(uintptr_t(a), n, false, __builtin_frame_address(0));      \
  }                                                                        \
  extern "C" void __tsan_unaligned_write##n(void* a) {                     \
    check_access(uintptr_t(a), n, true, __builtin_frame_address(0));       \
  }
MSLEMU_HOOKS(1)
MSLEMU_HOOKS(2)
MSLEMU_HOOKS(4)
MSLEMU_HOOKS(8)
MSLEMU_HOOKS(16)
#undef MSLEMU_HOOKS
extern "C" void __tsan_read_range(void* a, size_t n) {
  check_access(uintptr_t(a), n, false, __builtin_frame_address(0));
}
extern "C" void __tsan_write_range(void* a, size_t n) {
  check_access(uintptr_t(a), n, true, __builtin_frame_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}

// ---------------------------------------------------------------- the dispatch

namespace mslemu {
namespace {

[[noreturn]] void usage_error(const std::string& what) {
  fprintf(stderr, "mslemu runtime: %s\n", what.c_str());
  exit(2);
}

std::vector<std::vector<std::atomic<uint8_t>>> g_flags;

// Parses the request (text header, then the input bytes) and lays out device memory:
// one reserved region, each buffer at a 1 MiB boundary after >= 1 MiB of unmapped guard.
void load_request(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) usage_error(std::string("cannot open request ") + path);
  char line[4096];
  struct Spec {
    std::string name;
    size_t size, itemsize;
    Role role;
    std::string init, fill;
  };
  std::vector<Spec> specs;
  while (fgets(line, sizeof line, f)) {
    char key[64] = {0};
    sscanf(line, "%63s", key);
    const std::string k = key;
    if (k == "end") break;
    if (k == "grid") {
      sscanf(line, "%*s %u %u %u", &g_opt.grid.x, &g_opt.grid.y, &g_opt.grid.z);
    } else if (k == "threadgroup") {
      sscanf(line, "%*s %u %u %u", &g_opt.group.x, &g_opt.group.y, &g_opt.group.z);
    } else if (k == "schedule") {
      sscanf(line, "%*s %d", &g_opt.schedule);
    } else if (k == "seed") {
      sscanf(line, "%*s %lu", &g_opt.seed);
    } else if (k == "workers") {
      sscanf(line, "%*s %d", &g_opt.workers);
    } else if (k == "timeout_ms") {
      sscanf(line, "%*s %ld", &g_opt.timeout_ms);
    } else if (k == "race_check") {
      int v = 1;
      sscanf(line, "%*s %d", &v);
      g_opt.race_check = v != 0;
    } else if (k == "max_threadgroup_memory") {
      sscanf(line, "%*s %zu", &g_opt.max_threadgroup_memory);
    } else if (k == "stack_bytes") {
      sscanf(line, "%*s %zu", &g_opt.stack_bytes);
    } else if (k == "buffer") {
      char name[256], role[16], init[16], fill[128] = "";
      Spec s;
      if (sscanf(line, "%*s %255s %zu %zu %15s %15s %127s", name, &s.size, &s.itemsize, role, init, fill) < 5)
        usage_error(std::string("bad buffer line: ") + line);
      s.name = name;
      s.role = std::string(role) == "in" ? Role::input : std::string(role) == "out" ? Role::output : Role::meta;
      s.init = init;
      s.fill = fill;
      specs.push_back(s);
    } else {
      usage_error("unknown request line: " + k);
    }
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  size_t total = kGuard;
  for (auto& s : specs) total += (std::max<size_t>(s.size, 1) + kGuard - 1) / kGuard * kGuard + kGuard;
  void* region = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (region == MAP_FAILED) usage_error("cannot reserve device memory");
  g_dev_lo = reinterpret_cast<uintptr_t>(region);
  g_dev_span = total;
  g_chunk_owner.assign(total >> 20, -1);
  g_flags = std::vector<std::vector<std::atomic<uint8_t>>>(specs.size() * 2);
  size_t pos = kGuard;
  for (size_t i = 0; i < specs.size(); i++) {
    const Spec& s = specs[i];
    const size_t span = (std::max<size_t>(s.size, 1) + kGuard - 1) / kGuard * kGuard;
    unsigned char* base = static_cast<unsigned char*>(region) + pos;
    if (s.size && mprotect(base, (s.size + page - 1) / page * page, PROT_READ | PROT_WRITE) != 0)
      usage_error("cannot map a device buffer");
    for (size_t c = pos >> 20; c < (pos + span) >> 20; c++) g_chunk_owner[c] = int32_t(i);
    for (size_t c = (pos + span) >> 20; c < (pos + span + kGuard) >> 20; c++) g_chunk_owner[c] = -1 - int32_t(i);
    Buffer b;
    b.name = s.name;
    b.role = s.role;
    b.size = s.size;
    b.itemsize = std::max<size_t>(s.itemsize, 1);
    b.base = base;
    b.initialized = s.init != "poison";
    g_flags[2 * i] = std::vector<std::atomic<uint8_t>>(s.size);
    g_flags[2 * i + 1] = std::vector<std::atomic<uint8_t>>(s.size);
    b.read_flags = &g_flags[2 * i];
    b.write_flags = &g_flags[2 * i + 1];
    if (s.init == "data") {
      if (s.size && fread(base, 1, s.size, f) != s.size) usage_error("short request data for " + s.name);
    } else if (s.init == "poison") {
      std::memset(base, 0xff, s.size);
    } else if (s.init == "fill") {
      // one element's bytes, hex
      std::vector<unsigned char> el;
      for (size_t k = 0; k + 1 < s.fill.size(); k += 2) el.push_back((unsigned char)strtoul(s.fill.substr(k, 2).c_str(), nullptr, 16));
      if (el.empty()) usage_error("fill without a value for " + s.name);
      for (size_t k = 0; k < s.size; k++) base[k] = el[k % el.size()];
    }
    g_buffers.push_back(std::move(b));
    g_buffer_ptrs.push_back(base);
    pos += span + kGuard;
  }
  fclose(f);
}

// ---------------------------------------------------------------- watchdog and crashes

std::atomic<int> g_interrupted{0};

void on_watchdog(int, siginfo_t*, void* uc) {
  Worker* w = tls_worker;
  if (w) {
    const ucontext_t* u = static_cast<const ucontext_t*>(uc);
    Chain c;
#ifdef __x86_64__
    c.pc[c.n++] = reinterpret_cast<const void*>(u->uc_mcontext.gregs[REG_RIP] + 1);
    Chain rest = chain_from(reinterpret_cast<void*>(u->uc_mcontext.gregs[REG_RBP]));
    for (int i = 0; i < rest.n && c.n < kMaxChain; i++) c.pc[c.n++] = rest.pc[i];
#endif
    if (c.n < kMaxChain && w->last_pc) c.pc[c.n++] = w->last_pc;
    w->interrupted_at = c;
    w->interrupted = true;
  }
  g_interrupted++;
  for (;;) pause();  // the main thread writes the report and exits
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV:
      return "SIGSEGV";
    case SIGBUS:
      return "SIGBUS";
    case SIGFPE:
      return "SIGFPE";
    case SIGILL:
      return "SIGILL";
    default:
      return "signal";
  }
}

void on_crash(int sig, siginfo_t* info, void* uc) {
  claim_report();
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  Chain c;
#ifdef __x86_64__
  const ucontext_t* u = static_cast<const ucontext_t*>(uc);
  c.pc[c.n++] = reinterpret_cast<const void*>(u->uc_mcontext.gregs[REG_RIP] + 1);
  Chain rest = chain_from(reinterpret_cast<void*>(u->uc_mcontext.gregs[REG_RBP]));
  for (int i = 0; i < rest.n && c.n < kMaxChain; i++) c.pc[c.n++] = rest.pc[i];
#else
  (void)uc;
#endif
  std::string what;
  if (sig == SIGFPE) {
    what = "integer division by zero (or overflow) at {site:0}";
  } else if (sig == SIGILL) {
    what = "trap at {site:0}: the compiler turns some undefined behaviour (e.g. a division by a constant zero) "
           "into a trap";
  } else if (addr - g_stack_lo < g_stack_span) {
    what = format("stack overflow of a GPU thread at {site:0}: the emulator gives each thread %zu bytes of stack",
                  g_opt.stack_bytes);
  } else if (addr - g_dev_lo < g_dev_span) {
    what = "access to unmapped device memory (outside every buffer) at {site:0}";
  } else {
    what = format("%s at address 0x%lx at {site:0}", signal_name(sig), static_cast<unsigned long>(addr));
  }
  Worker* w = tls_worker;
  if (w && w->current) what += " by " + thread_desc(*w, *w->current);
  write_error_file("{\"kind\":\"crash\",\"message\":" + json_string(what) + ",\"sites\":[" + chain_json(c) + "]}\n");
  _exit(kExitCrash);
}

void install_handlers() {
  struct sigaction sa{};
  sa.sa_sigaction = on_crash;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) sigaction(s, &sa, nullptr);
  struct sigaction wd{};
  wd.sa_sigaction = on_watchdog;
  wd.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGUSR2, &wd, nullptr);
}

void give_alt_stack() {
  static thread_local std::vector<unsigned char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
}

[[noreturn]] void report_timeout() {
  int signalled = 0;
  for (Worker* w : g_workers)
    if (w->running && pthread_kill(w->thread, SIGUSR2) == 0) signalled++;
  for (int i = 0; i < 200 && g_interrupted.load() < signalled; i++) usleep(5000);
  std::vector<Chain> sites;
  std::string msg = format("deadlock: no progress after %ld ms", g_opt.timeout_ms);
  for (Worker* w : g_workers) {
    if (!w->interrupted || !w->current) continue;
    msg += format("\n  %s is stuck at {site:%zu} (a loop that waits for something no thread will do)",
                  thread_desc(*w, *w->current).c_str(), sites.size());
    sites.push_back(w->interrupted_at);
    std::vector<uint32_t> others;
    for (uint32_t l = 0; l < w->nthreads; l++)
      if (&w->fibers[l] != w->current) others.push_back(l);
    if (!others.empty()) msg += "; in its threadgroup:" + describe_threads(*w, others, sites);
  }
  fail("deadlock", msg, sites);
}

void worker_main(Worker* w, const std::vector<U3>* groups, std::atomic<size_t>* next) {
  tls_worker = w;
  give_alt_stack();
  for (size_t i; (i = next->fetch_add(1)) < groups->size();) run_threadgroup(*w, (*groups)[i]);
  w->running = false;
}

void write_response(double seconds) {
  const std::string out_path = g_response_prefix + ".out";
  FILE* f = fopen(out_path.c_str(), "wb");
  if (!f) usage_error("cannot write outputs");
  for (auto& b : g_buffers)
    if (b.role == Role::output && b.size) fwrite(b.base, 1, b.size, f);
  fclose(f);
  Counters total;
  total.read.assign(g_buffers.size(), 0);
  total.written.assign(g_buffers.size(), 0);
  for (Worker* w : g_workers) {
    const Counters& c = w->counters;
    for (size_t i = 0; i < g_buffers.size(); i++) {
      total.read[i] += c.read[i];
      total.written[i] += c.written[i];
    }
    total.tg_read += c.tg_read;
    total.tg_written += c.tg_written;
    total.barriers += c.barriers;
    total.simd_barriers += c.simd_barriers;
    total.collectives += c.collectives;
    total.mma += c.mma;
    total.atomics += c.atomics;
    total.tg_memory = std::max(total.tg_memory, c.tg_memory);
  }
  std::string j = "{\"buffers\":[";
  for (size_t i = 0; i < g_buffers.size(); i++) {
    size_t ur = 0, uw = 0;
    for (size_t k = 0; k < g_buffers[i].size; k++) {
      ur += (*g_buffers[i].read_flags)[k].load(std::memory_order_relaxed);
      uw += (*g_buffers[i].write_flags)[k].load(std::memory_order_relaxed);
    }
    j += format("%s{\"read\":%lu,\"written\":%lu,\"unique_read\":%zu,\"unique_written\":%zu}", i ? "," : "",
                total.read[i], total.written[i], ur, uw);
  }
  const uint64_t ngroups = uint64_t(g_groups.x) * g_groups.y * g_groups.z;
  j += format(
      "],\"threadgroups\":%lu,\"threads\":%lu,\"threadgroup_memory\":%zu,\"threadgroup_bytes_read\":%lu,"
      "\"threadgroup_bytes_written\":%lu,\"threadgroup_barriers\":%lu,\"simdgroup_barriers\":%lu,"
      "\"simd_collectives\":%lu,\"mma\":%lu,\"atomics\":%lu,\"seconds\":%.6f}\n",
      ngroups, uint64_t(g_opt.grid.x) * g_opt.grid.y * g_opt.grid.z, total.tg_memory, total.tg_read,
      total.tg_written, total.barriers, total.simd_barriers, total.collectives, total.mma, total.atomics, seconds);
  const std::string stats_path = g_response_prefix + ".stats.json";
  FILE* s = fopen(stats_path.c_str(), "w");
  if (!s) usage_error("cannot write stats");
  fwrite(j.data(), 1, j.size(), s);
  fclose(s);
}

int run(int argc, char** argv) {
  if (argc != 3) usage_error("usage: <kernel> REQUEST RESPONSE_PREFIX");
  g_response_prefix = argv[2];
  load_request(argv[1]);
  load_site_ids();
  const U3 grid = g_opt.grid, g = g_opt.group;
  if (!grid.x || !grid.y || !grid.z || !g.x || !g.y || !g.z) usage_error("empty grid or threadgroup");
  // MLX dispatches min(threadgroup, grid) per dimension, with ragged edge threadgroups.
  g_opt.group = {std::min(g.x, grid.x), std::min(g.y, grid.y), std::min(g.z, grid.z)};
  const U3 tg = g_opt.group;
  if (uint64_t(tg.x) * tg.y * tg.z > kMaxThreads) usage_error("more than 1024 threads per threadgroup");
  g_groups = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  std::vector<U3> groups;
  for (uint32_t z = 0; z < g_groups.z; z++)
    for (uint32_t y = 0; y < g_groups.y; y++)
      for (uint32_t x = 0; x < g_groups.x; x++) groups.push_back({x, y, z});
  if (g_opt.schedule == 1) {
    std::reverse(groups.begin(), groups.end());
  } else if (g_opt.schedule == 2) {
    std::mt19937_64 rng(g_opt.seed);
    std::shuffle(groups.begin(), groups.end(), rng);
  }
  const int nworkers = int(std::max<size_t>(1, std::min<size_t>(size_t(std::max(1, g_opt.workers)), groups.size())));
  const uint32_t threads = tg.x * tg.y * tg.z;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  g_opt.stack_bytes = (g_opt.stack_bytes + page - 1) / page * page;
  const size_t stack_slot = g_opt.stack_bytes + page;  // a guard page below each stack
  const size_t arena_capacity = g_opt.max_threadgroup_memory * 2 + 64 * 1024;
  unsigned char* arenas = static_cast<unsigned char*>(
      mmap(nullptr, arena_capacity * nworkers, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  unsigned char* stacks = static_cast<unsigned char*>(mmap(nullptr, stack_slot * threads * nworkers,
                                                           PROT_READ | PROT_WRITE,
                                                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (arenas == MAP_FAILED || stacks == MAP_FAILED) usage_error("cannot allocate threadgroup memory or stacks");
  g_tg_lo = reinterpret_cast<uintptr_t>(arenas);
  g_tg_span = arena_capacity * nworkers;
  g_stack_lo = reinterpret_cast<uintptr_t>(stacks);
  g_stack_span = stack_slot * threads * nworkers;
  const uint32_t nsimd = (threads + kSimdWidth - 1) / kSimdWidth;
  for (int i = 0; i < nworkers; i++) {
    Worker* w = new Worker;
    w->index = i;
    w->fibers.resize(threads);
    for (uint32_t t = 0; t < threads; t++) {
      unsigned char* slot = stacks + (size_t(i) * threads + t) * stack_slot;
      mprotect(slot, page, PROT_NONE);
      w->fibers[t].stack = slot + page;
    }
    w->slots.assign(size_t(nsimd) * 2 * kSimdWidth * kSlotBytes, 0);
    w->active.assign(size_t(nsimd) * 2, 0);
    w->shared.assign(size_t(nsimd) * 2 * kSharedBytes, 0);
    w->shared_ready.assign(size_t(nsimd) * 2, 0);
    w->arena = arenas + size_t(i) * arena_capacity;
    w->arena_capacity = arena_capacity;
    w->allocated.assign(arena_capacity, 0);
    w->shadow.assign(arena_capacity, Shadow{});
    w->counters.read.assign(g_buffers.size(), 0);
    w->counters.written.assign(g_buffers.size(), 0);
    w->running = true;
    g_workers.push_back(w);
  }
  install_handlers();
  give_alt_stack();
  std::atomic<size_t> next{0};
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads_;
  for (Worker* w : g_workers) {
    threads_.emplace_back(worker_main, w, &groups, &next);
    g_workers[w->index]->thread = threads_.back().native_handle();
  }
  // The watchdog: every worker must finish within the timeout.
  const auto deadline = t0 + std::chrono::milliseconds(g_opt.timeout_ms);
  for (;;) {
    bool busy = false;
    for (Worker* w : g_workers) busy |= w->running;
    if (!busy) break;
    if (std::chrono::steady_clock::now() > deadline) report_timeout();
    usleep(1000);
  }
  for (auto& t : threads_) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_response(seconds);
  return 0;
}

}  // namespace
}  // namespace mslemu

int main(int argc, char** argv) {
  return mslemu::run(argc, argv);
}
