#include "common/threadpool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kernelevo {

int available_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

namespace {

thread_local bool inside_pool_worker = false;

// How long a helper (or the caller, waiting for the helpers) spins before it sleeps in the
// kernel. A sleeping thread is woken through the scheduler, and on a virtual machine through
// the hypervisor (an idle vCPU is halted): tens of microseconds per call, more or less
// depending on how the host's halt polling has adapted to the recent past, so a team that
// sleeps between the calls of a model's layers flips between a fast and a slow state for
// seconds at a time. Spinning a little longer than the gap between consecutive calls keeps
// the team awake through a forward pass; past that, it sleeps (no core is held while the
// program does something else). KERNELEVO_SPIN_US overrides it (0: always sleep).
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* text = std::getenv("KERNELEVO_SPIN_US");
    long us = 200;
    if (text != nullptr && *text != '\0') {
      char* end = nullptr;
      long parsed = std::strtol(text, &end, 10);
      if (end != text && *end == '\0' && parsed >= 0) us = std::min(parsed, 1000000L);
    }
    return static_cast<int64_t>(us) * 1000;
  }();
  return ns;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void pause() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Waits until `value` differs from `old`: spins for spin_ns(), yielding the core now and
// then (to a thread that needs it more), then sleeps on the futex.
template <typename T>
void await_change(const std::atomic<T>& value, T old) {
  if (value.load(std::memory_order_acquire) != old) return;
  const int64_t limit = spin_ns();
  if (limit > 0) {
    const int64_t start = now_ns();
    for (int spins = 1;; ++spins) {
      pause();
      if (value.load(std::memory_order_acquire) != old) return;
      if ((spins & 255) == 0) {
        if (now_ns() - start > limit) break;
        if ((spins & 4095) == 0) std::this_thread::yield();
      }
    }
  }
  while (value.load(std::memory_order_acquire) == old) value.wait(old, std::memory_order_acquire);
}

class Pool {
 public:
  ~Pool() {
    stopping_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int n_tasks, int n_threads, const std::function<void(int, int)>& body) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    grow(n_threads - 1);
    body_ = &body;
    n_tasks_ = n_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    pending_.store(n_threads - 1, std::memory_order_relaxed);
    // Publishes everything above to the helper that claims a slot (and so reads it).
    slots_.store(n_threads - 1, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();  // (no system call when no helper sleeps)
    inside_pool_worker = true;  // a nested parallel_for from a task runs serially
    work(0);
    inside_pool_worker = false;
    for (int left = pending_.load(std::memory_order_acquire); left != 0;
         left = pending_.load(std::memory_order_acquire)) {
      await_change(pending_, left);
    }
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      threads_.emplace_back([this, seen = generation_.load()] { loop(seen); });
    }
  }

  // A helper takes part in a region by claiming one of its slots; the slot is its worker
  // index (1..n_threads-1). One that was late for a region, and sees the next one's slots
  // before its generation, takes part in that next one: the region's fields were written
  // before its slots.
  void loop(uint32_t seen) {
    inside_pool_worker = true;
    for (;;) {
      await_change(generation_, seen);
      seen = generation_.load(std::memory_order_acquire);
      if (stopping_.load(std::memory_order_acquire)) return;
      const int slot = slots_.fetch_sub(1, std::memory_order_acq_rel);
      if (slot <= 0) continue;  // not needed for this region
      work(slot);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }

  void work(int worker) {
    for (;;) {
      int task = next_task_.fetch_add(1);
      if (task >= n_tasks_) return;
      try {
        (*body_)(task, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(n_tasks_);  // stop handing out work
      }
    }
  }

  std::mutex run_mutex_, error_mutex_;
  std::vector<std::thread> threads_;
  // Written by the caller before slots_, read by the helpers that claim a slot: the region's
  // claimants are done (pending_ == 0) before the next region writes them again.
  const std::function<void(int, int)>* body_ = nullptr;
  int n_tasks_ = 0;
  std::exception_ptr error_;
  std::atomic<int> next_task_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> slots_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stopping_{false};
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers may outlive static teardown
  return *instance;
}

}  // namespace

void Barrier::wait() {
  if (members_ == 1) return;
  const uint64_t phase = phase_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == members_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    phase_.fetch_add(1, std::memory_order_acq_rel);
    return;
  }
  for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
    if (aborted_.load(std::memory_order_acquire)) {
      throw std::runtime_error("a member of the thread team failed");
    }
    if (spins < 4000) {
#if defined(__x86_64__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

void parallel_team(int n_threads,
                   const std::function<void(int rank, int size, Barrier& barrier)>& body) {
  const int size = inside_pool_worker ? 1 : std::max(1, n_threads);
  Barrier barrier(size);
  if (size == 1) {
    body(0, 1, barrier);
    return;
  }
  // Every task blocks at its first barrier until all have started, so no worker can take
  // two of them: each of the `size` tasks runs on its own worker.
  std::exception_ptr first_error;
  std::mutex error_mutex;
  pool().run(size, size, [&](int rank, int) {
    try {
      body(rank, size, barrier);
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!first_error) first_error = std::current_exception();
      }
      barrier.abort();  // after recording: the waiters' own errors come second
    }
  });
  if (first_error) std::rethrow_exception(first_error);
}

void parallel_for(int n_tasks, int n_threads,
                  const std::function<void(int, int)>& body) {
  n_threads = std::max(1, std::min(n_threads, n_tasks));
  if (n_threads == 1 || inside_pool_worker) {
    for (int t = 0; t < n_tasks; ++t) body(t, 0);
    return;
  }
  pool().run(n_tasks, n_threads, body);
}

}  // namespace kernelevo
