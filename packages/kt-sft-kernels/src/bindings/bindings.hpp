// Pieces shared by the binding files.
#pragma once
#include <nanobind/nanobind.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "kt/runtime/serial_executor.hpp"
#include "kt/runtime/thread_pool.hpp"

namespace kt::bindings {

namespace nb = nanobind;

// A thread pool as Python sees it: the pool plus the executor that serializes every call made on it
// (sync calls are an async call and a wait, so calls run in the order they were made).
struct PoolContext {
  std::unique_ptr<runtime::ThreadPool> owned;  // null for the process default pool
  runtime::ThreadPool* pool = nullptr;
  runtime::SerialExecutor executor;  // declared last: destroyed (drained, joined) before the pool

  // Queues work on the executor. Throws if called from the executor's own thread.
  std::shared_ptr<runtime::Job> submit(std::function<void()> work);
};

// The Python `ThreadPool` object.
struct PyThreadPool {
  std::shared_ptr<PoolContext> context;
};

std::shared_ptr<PoolContext> default_pool_context();

// ThreadPool(threads, pin) and the pinned forms ThreadPool(cpus=...) / ThreadPool(node=...)
// (bind_topology.cpp); pool_affinity: [caller thread's mask, worker 1's, ...] as the OS reports them.
PyThreadPool make_pool(int threads, bool pin);
PyThreadPool make_pool_from_args(int threads, bool pin, const std::optional<std::vector<int>>& cpus,
                                 std::optional<int> node);
std::vector<std::vector<int>> pool_affinity(PyThreadPool& pool);

// Waits for a job with the GIL released, then rethrows what the job threw.
void wait_and_rethrow(runtime::Job& job);

void bind_runtime(nb::module_& m);
void bind_moe(nb::module_& m);
void bind_profiler(nb::module_& m);
void bind_topology(nb::module_& m);

}  // namespace kt::bindings
