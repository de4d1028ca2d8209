#include "common/threadpool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
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

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int n_tasks, int n_threads, const std::function<void(int, int)>& body) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    grow(n_threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      n_tasks_ = n_tasks;
      next_task_.store(0);
      active_workers_ = n_threads - 1;
      pending_ = n_threads - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    inside_pool_worker = true;  // a nested parallel_for from a task runs serially
    work(0);
    inside_pool_worker = false;
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      int id = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    inside_pool_worker = true;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (id > active_workers_) continue;  // not needed for this region
      }
      work(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
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

  std::mutex run_mutex_, mutex_, error_mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int, int)>* body_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next_task_{0};
  int active_workers_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
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
