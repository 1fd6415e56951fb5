// Topology bindings: kk.topology(), kk.shard_layout(), and ThreadPool's pinned construction
// (ThreadPool(cpus=...) / ThreadPool(node=...)) with its affinity read-back.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "kt/runtime/topology.hpp"

namespace kt::bindings {
namespace {

runtime::Topology topology_for(const std::optional<std::string>& root, const std::optional<std::vector<int>>& affinity) {
  if (!root && !affinity) return runtime::system_topology();
  if (affinity)
    for (int cpu : *affinity)
      if (cpu < 0) throw std::invalid_argument("affinity: CPU numbers must be >= 0, got " + std::to_string(cpu));
  return runtime::read_topology(root.value_or("/"), affinity ? &*affinity : nullptr);
}

nb::dict topology_dict(const std::optional<std::string>& root, const std::optional<std::vector<int>>& affinity) {
  const runtime::Topology t = topology_for(root, affinity);
  nb::list nodes;
  for (const runtime::NumaNode& n : t.nodes) {
    nb::dict node;
    node["id"] = n.id;
    node["cpus"] = n.cpus;
    node["cores"] = n.cores;
    nodes.append(node);
  }
  nb::dict d;
  d["root"] = t.root;
  d["from_sysfs"] = t.from_sysfs;
  d["machine_nodes"] = t.machine_nodes;
  d["affinity"] = t.affinity;
  d["cgroup_cpus"] = t.cgroup_cpus > 0 ? nb::cast(t.cgroup_cpus) : nb::none();
  d["cgroup_source"] = t.cgroup_source;
  d["physical_cores"] = t.physical_cores();
  d["nodes"] = nodes;
  return d;
}

std::vector<runtime::Shard> planned_shards(std::optional<int> shards, const std::optional<std::string>& numa,
                                           const std::optional<std::string>& root,
                                           const std::optional<std::vector<int>>& affinity) {
  const runtime::Topology t = topology_for(root, affinity);
  const runtime::NumaSetting setting = numa ? runtime::parse_numa_setting(*numa) : runtime::numa_setting_from_env();
  const int count = shards.value_or(runtime::auto_shard_count(t, setting));
  if (count < 1) throw std::invalid_argument("shards must be >= 1, got " + std::to_string(count));
  return runtime::plan_shards(t, count, setting);
}

nb::list shard_layout_list(std::optional<int> shards, const std::optional<std::string>& numa,
                           const std::optional<std::string>& root, const std::optional<std::vector<int>>& affinity) {
  nb::list out;
  for (const runtime::Shard& s : planned_shards(shards, numa, root, affinity)) {
    nb::dict shard;
    shard["nodes"] = s.nodes;
    shard["cpus"] = s.cpus;
    out.append(shard);
  }
  return out;
}

std::vector<int> node_cores(int node) {
  const runtime::Topology& t = runtime::system_topology();
  std::string known;
  for (const runtime::NumaNode& n : t.nodes) {
    if (n.id == node) return n.cores;
    known += (known.empty() ? "" : ", ") + std::to_string(n.id);
  }
  throw std::invalid_argument("node: " + std::to_string(node) + " is not a NUMA node with usable cores (nodes: " +
                              known + ")");
}

}  // namespace

PyThreadPool make_pinned_pool(const std::vector<int>& cpus) {
  auto context = std::make_shared<runtime::PoolContext>();
  context->owned = std::make_unique<runtime::ThreadPool>(cpus);
  context->pool = context->owned.get();
  // Thread 0 of the pool is whoever calls parallel_for: for Python pools, the executor thread.
  const int first = cpus.front();
  context->caller_pinned = true;
  wait_and_rethrow(*context->submit([first] { runtime::pin_current_thread(first); }));
  return PyThreadPool{std::move(context)};
}

PyThreadPool make_pool_from_args(int threads, bool pin, const std::optional<std::vector<int>>& cpus,
                                 std::optional<int> node) {
  if (cpus && node) throw std::invalid_argument("ThreadPool: give cpus or node, not both");
  if (!cpus && !node) return make_pool(threads, pin);
  const std::vector<int> chosen = cpus ? *cpus : node_cores(*node);
  if (chosen.empty()) throw std::invalid_argument("cpus: a pool needs at least one CPU");
  if (threads != 0 && threads != static_cast<int>(chosen.size()))
    throw std::invalid_argument("threads: " + std::to_string(threads) + " does not match the " +
                                std::to_string(chosen.size()) + " CPUs of the pool (leave threads=0)");
  return make_pinned_pool(chosen);
}

std::vector<std::vector<int>> pool_affinity(PyThreadPool& pool) {
  std::vector<int> caller;
  wait_and_rethrow(*pool.context->submit([&caller] { caller = runtime::current_thread_affinity(); }));
  std::vector<std::vector<int>> masks{caller};
  for (std::vector<int>& m : pool.context->pool->worker_affinity()) masks.push_back(std::move(m));
  return masks;
}

void bind_topology(nb::module_& m) {
  m.def("topology", &topology_dict, nb::arg("root").none() = nb::none(), nb::arg("affinity").none() = nb::none(),
        "NUMA nodes with the CPUs and physical cores this process may use (affinity mask, cgroup CPU limit). "
        "root/affinity: read another /sys tree or cut to another mask (tests); default: this process, read once.");
  m.def("shard_layout", &shard_layout_list, nb::arg("shards").none() = nb::none(),
        nb::arg("numa").none() = nb::none(), nb::arg("root").none() = nb::none(),
        nb::arg("affinity").none() = nb::none(),
        "The shards a layer with numa_shards=shards would use: a list of {nodes, cpus} (one thread per CPU). "
        "shards=None: the count KT_SFT_NUMA asks for ('auto' = one per node). numa: a KT_SFT_NUMA value to use "
        "instead of the environment's.");
  m.def(
      "shards_run_in_turn",
      [](std::optional<int> shards, const std::optional<std::string>& numa, const std::optional<std::string>& root,
         const std::optional<std::vector<int>>& affinity) {
        return runtime::shards_run_in_turn(planned_shards(shards, numa, root, affinity));
      },
      nb::arg("shards").none() = nb::none(), nb::arg("numa").none() = nb::none(), nb::arg("root").none() = nb::none(),
      nb::arg("affinity").none() = nb::none(),
      "Whether the shards of that layout run as one call on all their CPUs (all on the same nodes, "
      "unless KT_SFT_NUMA_SHARED_DOWN=0), rather than at once on pinned sub-pools (ADR 0701).");
  m.def("format_cpu_list", &runtime::format_cpu_list, nb::arg("cpus"), "[0, 1, 2, 5] -> '0-2,5'.");

}

}  // namespace kt::bindings
