// A small persistent thread pool for the CPU kernels. Kernels ask for a number of
// threads (a tuning parameter); the calling thread always takes part as worker 0.
#pragma once

#include <functional>

namespace kernelevo {

// Logical cores this process may run on.
int available_cores();

// Runs body(task, worker) for task in [0, n_tasks) on up to n_threads workers
// (worker in [0, n_threads)); tasks are handed out dynamically. Returns when all are
// done; the first exception thrown by a task is rethrown here.
void parallel_for(int n_tasks, int n_threads,
                  const std::function<void(int task, int worker)>& body);

}  // namespace kernelevo
