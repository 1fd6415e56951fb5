// Runtime bindings: ISA tiers, CPU features, build info, thread pools.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "bindings.hpp"
#include "kt/core/isa.hpp"
#include "kt/runtime/build_info.hpp"
#include "kt/runtime/cpu_features.hpp"
#include "kt/runtime/default_threads.hpp"
#include "kt/runtime/kernel_variant.hpp"
#include "kt/runtime/memory.hpp"

namespace kt::bindings {
namespace {

Isa parse_isa(const std::string& name) {
  const std::optional<Isa> isa = isa_from_name(name);
  if (!isa) throw std::invalid_argument("unknown ISA tier '" + name + "'; valid names: " + valid_isa_names());
  return *isa;
}

std::string name_of(Isa isa) { return std::string(isa_name(isa)); }

void warn(const std::string& message) {
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 2) != 0) throw nb::python_error();
}

// A KT_SFT_MAX_ISA above the hardware is reported once, as a warning, the first time Python asks
// for the tier.
void warn_env_cap_once() {
  static std::atomic<bool> warned{false};
  if (warned.load(std::memory_order_relaxed)) return;
  if (std::string(runtime::isa_cap_source()) != "KT_SFT_MAX_ISA") return;
  const std::string note = runtime::isa_cap_note();
  if (note.empty() || warned.exchange(true)) return;
  warn(note);
}

nb::dict cpu_features_dict() {
  const runtime::CpuFeatures& f = runtime::cpu_features();
  nb::dict d;
  d["vendor"] = f.vendor;
  d["brand"] = f.brand;
#define KT_FEATURE_ENTRY(name) d[#name] = f.name;
  KT_CPU_FEATURE_FLAGS(KT_FEATURE_ENTRY)
  KT_OS_FEATURE_FLAGS(KT_FEATURE_ENTRY)
#undef KT_FEATURE_ENTRY
  d["amx_permitted"] = f.amx_permitted;
  d["amx_permission"] = f.amx_permission;
  return d;
}

nb::dict build_info_dict() {
  nb::dict tiers;
  for (int i = 0; i < kIsaCount; ++i) {
    const Isa isa = static_cast<Isa>(i);
    nb::dict tier;
    tier["compiled"] = runtime::isa_compiled(isa);
    tier["flags"] = std::string(runtime::isa_compile_flags(isa));
    tiers[name_of(isa).c_str()] = tier;
  }
  nb::dict d;
  d["version"] = std::string(runtime::build_version());
  d["compiler"] = std::string(runtime::build_compiler());
  d["build_type"] = std::string(runtime::build_type());
  d["tiers"] = tiers;
  return d;
}

// Test hooks for the pool itself (tests/test_runtime.py); no kernel involved.
std::vector<int> run_counting(PyThreadPool& pool, std::int64_t num_tasks) {
  if (num_tasks < 0) throw std::invalid_argument("num_tasks must be >= 0");
  std::vector<std::atomic<int>> counts(static_cast<std::size_t>(num_tasks));
  for (auto& c : counts) c.store(0);
  std::atomic<bool> bad_thread{false};
  const int size = pool.context->pool->size();
  {
    nb::gil_scoped_release release;
    pool.context->pool->parallel_for(num_tasks, [&](std::int64_t task, int thread) {
      if (thread < 0 || thread >= size) bad_thread.store(true);
      counts[static_cast<std::size_t>(task)].fetch_add(1);
    });
  }
  if (bad_thread.load()) throw std::runtime_error("a task ran with a thread index outside [0, size)");
  std::vector<int> result;
  result.reserve(counts.size());
  for (auto& c : counts) result.push_back(c.load());
  return result;
}

void run_raising(PyThreadPool& pool, std::int64_t num_tasks, std::int64_t failing_task, const std::string& kind) {
  nb::gil_scoped_release release;
  pool.context->pool->parallel_for(num_tasks, [&](std::int64_t task, int) {
    if (task != failing_task) return;
    const std::string message = "task " + std::to_string(task) + " failed";
    if (kind == "value") throw std::invalid_argument(message);
    throw std::runtime_error(message);
  });
}

void run_nested(PyThreadPool& pool) {
  nb::gil_scoped_release release;
  runtime::ThreadPool& p = *pool.context->pool;
  p.parallel_for(2, [&p](std::int64_t, int) { p.parallel_for(2, [](std::int64_t, int) {}); });
}

}  // namespace

PyThreadPool make_pool(int threads, bool pin) { return PyThreadPool{runtime::make_pool_context(threads, pin)}; }

void wait_and_rethrow(runtime::Job& job) {
  {
    nb::gil_scoped_release release;
    job.wait();
  }
  if (std::exception_ptr error = job.error()) std::rethrow_exception(error);
}

void bind_runtime(nb::module_& m) {
  m.def("isa_names", [] {
    std::vector<std::string> names;
    for (int i = 0; i < kIsaCount; ++i) names.push_back(name_of(static_cast<Isa>(i)));
    return names;
  }, "All tier names, lowest first.");
  m.def("active_isa", [] {
    const Isa isa = runtime::active_isa();
    warn_env_cap_once();
    return name_of(isa);
  }, "The tier the next kernel call uses: min(best supported, cap).");
  m.def("best_isa", [] { return name_of(runtime::best_isa()); }, "The highest tier this build and CPU support.");
  m.def("isa_supported", [](const std::string& name) { return runtime::isa_supported(parse_isa(name)); },
        nb::arg("name"), "Whether the tier is compiled into this build and this CPU/OS can run it.");
  m.def("isa_compiled", [](const std::string& name) { return runtime::isa_compiled(parse_isa(name)); },
        nb::arg("name"), "Whether the tier's code is in this build.");
  m.def("set_max_isa", [](std::optional<std::string> name) {
    std::string note;
    const Isa active = runtime::set_max_isa(name ? std::optional<Isa>(parse_isa(*name)) : std::nullopt, &note);
    if (!note.empty()) warn(note);
    return name_of(active);
  }, nb::arg("name").none(),
     "Cap the tier (None: no cap); returns the tier now active. A cap above what this build and CPU "
     "support runs the best available and warns (RuntimeWarning).");
  m.def("isa_cap", [] {
    const std::optional<Isa> cap = runtime::isa_cap();
    return cap ? std::optional<std::string>(name_of(*cap)) : std::nullopt;
  }, "The cap in force, or None.");
  m.def("isa_cap_source", [] { return std::string(runtime::isa_cap_source()); },
        "Where the cap came from: 'none', 'KT_SFT_MAX_ISA' or 'set_max_isa'.");
  m.def("kernel_variant_names", &runtime::kernel_variant_names, "Kernel variants of the avx512_bf16 tier.");
  m.def("kernel_variant", [] { return std::string(runtime::kernel_variant_name(runtime::active_kernel_variant())); },
        "The variant the avx512_bf16 tier's next kernel call uses ('fma' or 'bf16dot').");
  m.def("set_kernel_variant", [](std::optional<std::string> name) {
    std::optional<runtime::KernelVariant> v;
    if (name) {
      v = runtime::kernel_variant_from_name(*name);
      if (!v) throw std::invalid_argument("set_kernel_variant: unknown variant '" + *name + "'; valid: fma, bf16dot (None: automatic)");
    }
    return std::string(runtime::kernel_variant_name(runtime::set_kernel_variant(v)));
  }, nb::arg("name").none(),
     "Force the avx512_bf16 tier's kernel variant (None: back to the automatic choice); returns the variant now active.");
  m.def("kernel_variant_source", [] { return std::string(runtime::kernel_variant_source()); },
        "Where the variant came from: 'cpu table', 'probe', 'KT_SFT_KERNEL_VARIANT' or 'set_kernel_variant'.");
  m.def("kernel_variant_reason", &runtime::kernel_variant_reason, "Why the automatic choice is what it is.");
  m.def("auto_kernel_variant", [] { return std::string(runtime::kernel_variant_name(runtime::auto_kernel_variant())); },
        "The automatic choice (CPU table, or probe for CPUs it does not know), whatever is forced.");
  m.def("bf16dot_probe_ratio", &runtime::bf16dot_probe_ratio,
        "VDPBF16PS FLOP rate over VFMADD231PS FLOP rate on this core, measured once (None: tier cannot run).");
  m.def("cpu_model", [] {
    const runtime::CpuModel c = runtime::cpu_model();
    nb::dict d;
    d["family"] = c.family;
    d["model"] = c.model;
    d["stepping"] = c.stepping;
    return d;
  }, "CPUID family, model and stepping (as /proc/cpuinfo shows them; 0 off x86).");
  m.def("cpu_features", &cpu_features_dict, "What CPUID/XGETBV report, and the AMX permission.");
  m.def("cpu_feature_names", [] {
#define KT_FEATURE_NAME(name) #name,
    return std::make_pair(std::vector<std::string>{KT_CPU_FEATURE_FLAGS(KT_FEATURE_NAME)},
                          std::vector<std::string>{KT_OS_FEATURE_FLAGS(KT_FEATURE_NAME)});
#undef KT_FEATURE_NAME
  }, "(CPU feature flags, OS state flags): the boolean keys of cpu_features(), for reports.");
  m.def("build_info", &build_info_dict, "Version, compiler, build type and the compiled tiers with their flags.");
  m.def("physical_cores", &runtime::physical_cores_available,
        "Physical cores among the CPUs this process may run on (sched_getaffinity).");
  m.def("affinity_cpus", &runtime::affinity_cpus, "Logical CPUs in this process's affinity mask.");
  m.def("default_thread_count", [](std::optional<int> logical_cpus, std::optional<int> physical_cores) {
    if (logical_cpus.has_value() != physical_cores.has_value())
      throw std::invalid_argument("default_thread_count: give both logical_cpus and physical_cores, or neither");
    if (logical_cpus && (*logical_cpus < 1 || *physical_cores < 1))
      throw std::invalid_argument("default_thread_count: logical_cpus and physical_cores must be >= 1");
    return logical_cpus ? runtime::default_thread_count(*logical_cpus, *physical_cores) : runtime::default_thread_count();
  }, nb::arg("logical_cpus").none() = nb::none(), nb::arg("physical_cores").none() = nb::none(),
     "Threads of a pool nobody sized (ADR 0901): the logical CPUs of the affinity mask, or one per physical "
     "core on an SMT machine with >= 4 cores. With arguments: the rule for those counts.");
  m.def("default_thread_reason", &runtime::default_thread_reason,
        "The default thread count and which branch of the rule gave it, for reports.");

  nb::class_<PyThreadPool>(m, "ThreadPool",
                           "A pool of worker threads; the thread making a call works too. Calls on one pool "
                           "run one at a time, in the order they were made.")
      .def("__init__",
           [](PyThreadPool* self, int threads, bool pin, std::optional<std::vector<int>> cpus,
              std::optional<int> node) {
             new (self) PyThreadPool(make_pool_from_args(threads, pin, cpus, node));
           },
           nb::arg("threads") = 0, nb::arg("pin") = false, nb::arg("cpus").none() = nb::none(),
           nb::arg("node").none() = nb::none(),
           "threads: total threads including the caller; 0 = default_thread_count(). "
           "pin: bind each worker to its own physical core. cpus: a pool of one thread per listed CPU, each "
           "pinned to its CPU (the pool's calling thread to the first). node: cpus = that NUMA node's "
           "physical cores (kt_sft_kernels.topology()).")
      .def_prop_ro("cpus", [](const PyThreadPool& p) { return p.context->pool->cpus(); },
                   "The CPU each thread is pinned to (index 0 = the calling thread); [] when unpinned.")
      .def("cpu_affinity", &pool_affinity,
           "Each thread's affinity mask as the OS reports it: [calling thread, worker 1, ...].")
      .def_prop_ro("threads", [](const PyThreadPool& p) { return p.context->pool->size(); })
      .def_prop_ro("pinned", [](const PyThreadPool& p) { return p.context->pool->pinned(); })
      .def_prop_ro("is_default", [](const PyThreadPool& p) { return p.context->owned == nullptr; })
      .def("__eq__", [](const PyThreadPool& a, const PyThreadPool& b) { return a.context == b.context; },
           nb::is_operator())
      .def("__hash__", [](const PyThreadPool& p) { return reinterpret_cast<std::uintptr_t>(p.context.get()); })
      .def("__repr__", [](const PyThreadPool& p) {
        return std::string("ThreadPool(threads=") + std::to_string(p.context->pool->size()) +
               (p.context->pool->pinned() ? ", pin=True" : "") + (p.context->owned ? "" : ", default") + ")";
      });

  m.def("default_pool", [] { return PyThreadPool{runtime::default_pool_context()}; },
        "The process-wide pool (KT_SFT_NUM_THREADS, else default_thread_count() threads), created at first use.");

  nb::module_ testing = m.def_submodule("_testing", "Hooks for the package's own tests.");
  testing.def("pool_run_counting", &run_counting, nb::arg("pool"), nb::arg("num_tasks"),
              "Runs num_tasks tasks; returns how many times each ran.");
  testing.def("pool_run_raising", &run_raising, nb::arg("pool"), nb::arg("num_tasks"), nb::arg("failing_task"),
              nb::arg("kind") = "runtime", "Runs tasks; task failing_task throws (RuntimeError or ValueError).");
  testing.def("available_memory", [] {
    const runtime::AvailableMemory available = runtime::available_memory();
    return std::make_pair(available.bytes, available.source);
  }, "(bytes, source): what the layer's up-front size check compares against (KT_SFT_TEST_MEM_LIMIT overrides).");
  testing.def("pool_run_nested", &run_nested, nb::arg("pool"), "Calls parallel_for from inside a task.");
}

}  // namespace kt::bindings
