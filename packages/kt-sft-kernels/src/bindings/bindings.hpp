// Pieces shared by the binding files.
#pragma once
#include <nanobind/nanobind.h>

#include <memory>
#include <optional>
#include <vector>

#include "kt/runtime/pool_context.hpp"

namespace kt::bindings {

namespace nb = nanobind;

// The Python `ThreadPool` object.
struct PyThreadPool {
  std::shared_ptr<runtime::PoolContext> context;
};

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
void bind_amx_tuning(nb::module_& m);  // after bind_runtime (its _testing submodule)

}  // namespace kt::bindings
