// A small persistent thread pool for the CPU kernels. Kernels ask for a number of
// threads (a tuning parameter); the calling thread always takes part as worker 0.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace kernelevo {

// Logical cores this process may run on.
int available_cores();

// Runs body(task, worker) for task in [0, n_tasks) on up to n_threads workers
// (worker in [0, n_threads)); tasks are handed out dynamically. Returns when all are
// done; the first exception thrown by a task is rethrown here.
void parallel_for(int n_tasks, int n_threads,
                  const std::function<void(int task, int worker)>& body);

// A barrier for the members of one team (below). It spins briefly, then yields: the
// members run on their own cores, and waits between phases of a kernel are short.
class Barrier {
 public:
  explicit Barrier(int members) : members_(members) {}
  // Returns when all members have arrived; throws if another member failed.
  void wait();
  // Releases every waiter with an error (a member threw and will never arrive).
  void abort() { aborted_.store(true, std::memory_order_release); }

 private:
  const int members_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> phase_{0};
  std::atomic<bool> aborted_{false};
};

// Runs body(rank, size, barrier) on `size` workers at once (size <= n_threads; 1 when
// called from inside a pool task, where a team cannot be formed). Unlike parallel_for,
// the members run concurrently, so they may wait for each other at the barrier.
void parallel_team(int n_threads,
                   const std::function<void(int rank, int size, Barrier& barrier)>& body);

}  // namespace kernelevo
