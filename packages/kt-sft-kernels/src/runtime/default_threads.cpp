// The default thread count (include/kt/runtime/default_threads.hpp, ADR 0901).
#include "kt/runtime/default_threads.hpp"

#include <algorithm>
#include <cmath>

#include "kt/runtime/topology.hpp"

namespace kt::runtime {

int default_thread_count(int logical_cpus, int physical_cores) {
  const int logical = std::max(1, logical_cpus), physical = std::clamp(physical_cores, 1, logical);
  // A VM often shows its vCPUs as SMT siblings of fewer "cores" (2 vCPUs = 1 core x 2 threads): each
  // vCPU is usually a whole host thread there, and one thread per "core" would leave half the machine idle.
  if (physical < logical && physical >= kSmtMinCores) return physical;
  return logical;
}

namespace {

// What the rule is applied to: the affinity mask's logical CPUs, no more than the cgroup's CPU limit
// (a 1-CPU quota on a 2-CPU mask throttles a second thread instead of running it), and the physical
// cores the topology reader keeps (mask, SMT siblings and the same limit).
struct Counts {
  int logical, physical;
  bool cgroup_cut;
};

Counts usable_counts() {
  const Topology t = read_topology("/");
  int logical = std::max(1, static_cast<int>(t.affinity.size()));
  const int quota = t.cgroup_cpus > 0 ? std::max(1, static_cast<int>(std::ceil(t.cgroup_cpus - 1e-9))) : 0;
  const bool cut = quota > 0 && quota < logical;
  if (cut) logical = quota;
  return {logical, std::max(1, t.physical_cores()), cut};
}

}  // namespace

int default_thread_count() {
  const Counts c = usable_counts();
  return default_thread_count(c.logical, c.physical);
}

std::string default_thread_reason() {
  const Counts c = usable_counts();
  const int threads = default_thread_count(c.logical, c.physical);
  const std::string counts = std::to_string(c.logical) + " logical CPUs" + (c.cgroup_cut ? " (cgroup CPU limit)" : "") +
                             ", " + std::to_string(c.physical) + " physical cores";
  if (c.physical >= c.logical) return std::to_string(threads) + " (" + counts + ": no SMT siblings)";
  if (threads == c.physical)
    return std::to_string(threads) + " (" + counts + ": SMT machine with >= " + std::to_string(kSmtMinCores) +
           " cores, one thread per core)";
  return std::to_string(threads) + " (" + counts + ": fewer than " + std::to_string(kSmtMinCores) +
         " cores, every logical CPU)";
}

}  // namespace kt::runtime
