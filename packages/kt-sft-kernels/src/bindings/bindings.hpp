// Pieces shared by the binding files.
#pragma once
#include <nanobind/nanobind.h>

#include <functional>
#include <memory>

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

// Waits for a job with the GIL released, then rethrows what the job threw.
void wait_and_rethrow(runtime::Job& job);

void bind_runtime(nb::module_& m);
void bind_moe(nb::module_& m);
void bind_profiler(nb::module_& m);

}  // namespace kt::bindings
