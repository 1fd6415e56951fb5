// The default thread count (include/kt/runtime/default_threads.hpp, ADR 0901).
#include "kt/runtime/default_threads.hpp"

#include <algorithm>
#include <vector>

#include "kt/runtime/thread_pool.hpp"

namespace kt::runtime {

int default_thread_count(int logical_cpus, int physical_cores) {
  const int logical = std::max(1, logical_cpus), physical = std::clamp(physical_cores, 1, logical);
  // A VM often shows its vCPUs as SMT siblings of fewer "cores" (2 vCPUs = 1 core x 2 threads): each
  // vCPU is usually a whole host thread there, and one thread per "core" would leave half the machine idle.
  if (physical < logical && physical >= kSmtMinCores) return physical;
  return logical;
}

int default_thread_count() {
  return default_thread_count(static_cast<int>(affinity_cpus().size()), physical_cores_available());
}

std::string default_thread_reason() {
  const int logical = static_cast<int>(affinity_cpus().size()), physical = physical_cores_available();
  const int threads = default_thread_count(logical, physical);
  const std::string counts = std::to_string(logical) + " logical CPUs, " + std::to_string(physical) + " physical cores";
  if (physical >= logical) return std::to_string(threads) + " (" + counts + ": no SMT siblings)";
  if (threads == physical)
    return std::to_string(threads) + " (" + counts + ": SMT machine with >= " + std::to_string(kSmtMinCores) +
           " cores, one thread per core)";
  return std::to_string(threads) + " (" + counts + ": fewer than " + std::to_string(kSmtMinCores) +
         " cores, every logical CPU)";
}

}  // namespace kt::runtime
