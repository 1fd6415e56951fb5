// Pieces shared by the binding files.
#pragma once
#include <nanobind/nanobind.h>

#include <memory>

#include "kt/runtime/pool_context.hpp"

namespace kt::bindings {

namespace nb = nanobind;

// The Python `ThreadPool` object.
struct PyThreadPool {
  std::shared_ptr<runtime::PoolContext> context;
};

// Waits for a job with the GIL released, then rethrows what the job threw.
void wait_and_rethrow(runtime::Job& job);

void bind_runtime(nb::module_& m);
void bind_moe(nb::module_& m);
void bind_profiler(nb::module_& m);

}  // namespace kt::bindings
