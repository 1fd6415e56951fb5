// The library's own thread pool (DESIGN.md §3.3): the calling thread works too, workers spin
// briefly then sleep, no OpenMP. Work is split into tasks whose boundaries never depend on the
// number of threads, which is what makes every kernel bitwise deterministic across thread counts.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace kt::runtime {

class ThreadPool {
 public:
  // threads = total workers including the caller; 0 = physical cores in sched_getaffinity.
  // pin = bind worker i to one logical CPU of the i-th physical core of the affinity mask (the
  // calling thread is never pinned: it belongs to the application).
  explicit ThreadPool(int threads = 0, bool pin = false);
  // A pool on exactly these logical CPUs (a NUMA shard's sub-pool): size() = cpus.size(); worker i
  // (i >= 1) is pinned to cpus[i]; thread 0 is the caller, which should run on cpus[0] (see
  // pin_current_thread). A CPU outside this process's affinity mask throws std::invalid_argument.
  explicit ThreadPool(const std::vector<int>& cpus);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;
  bool pinned() const;
  // The CPU each thread is meant for (index 0 = the caller's); empty for an unpinned pool.
  const std::vector<int>& cpus() const;
  // Each worker's affinity mask as the OS reports it now (pthread_getaffinity_np): entry i - 1 is
  // worker i. Lets tests verify the pinning.
  std::vector<std::vector<int>> worker_affinity() const;
  // Calls fn(task, thread_index) for every task in [0, num_tasks) and returns when all are done.
  // Tasks are handed out dynamically; thread_index is in [0, size()) (0 = the caller) and may be
  // used to index per-thread scratch. The first exception thrown by fn is rethrown here (tasks not
  // yet started are then skipped). Calls from several threads are serialized; a call from inside a
  // task of the same pool throws std::logic_error (it would deadlock). A pool created before fork()
  // throws std::runtime_error when used in the child.
  void parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t task, int thread)>& fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The process-wide pool, created at first use: KT_SFT_NUM_THREADS threads if that is set (0 or
// unset = the physical cores; an invalid value throws std::invalid_argument). After fork() the
// child gets a fresh one.
ThreadPool& default_pool();
int default_pool_threads();  // what KT_SFT_NUM_THREADS asks for (0 = physical cores)
// Logical CPUs in this thread's sched_getaffinity mask, ascending.
std::vector<int> affinity_cpus();
// Distinct (package, core) pairs among affinity_cpus() per /sys/devices/system/cpu/cpuN/topology
// (each CPU counts where the topology cannot be read), at most the cgroup CPU limit rounded up.
int physical_cores_available();
// Pins the calling thread to one CPU; false if the OS refused.
bool pin_current_thread(int cpu);
// The calling thread's affinity mask, ascending.
std::vector<int> current_thread_affinity();

}  // namespace kt::runtime
