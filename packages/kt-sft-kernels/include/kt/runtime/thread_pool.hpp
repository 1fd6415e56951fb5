// The library's own thread pool (DESIGN.md §3.3): the calling thread works too, workers spin
// briefly then sleep, no OpenMP. Work is split into tasks whose boundaries never depend on the
// number of threads, which is what makes every kernel bitwise deterministic across thread counts.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

namespace kt::runtime {

class ThreadPool {
 public:
  // threads = total workers including the caller; 0 = physical cores in sched_getaffinity.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;
  // Calls fn(task, thread_index) for every task in [0, num_tasks) and returns when all are done.
  // Tasks are handed out dynamically; thread_index is in [0, size()) (0 = the caller) and may be
  // used to index per-thread scratch. The first exception thrown by fn is rethrown here.
  void parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t task, int thread)>& fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

ThreadPool& default_pool();
int physical_cores_available();

}  // namespace kt::runtime
