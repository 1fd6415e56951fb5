// How many threads a pool gets when nobody says (ThreadPool(0), the default pool without
// KT_SFT_NUM_THREADS). ADR 0901: the logical CPUs of the affinity mask, except on a real SMT machine
// (sysfs shows SMT siblings and there are >= kSmtMinCores physical cores), where one thread per
// physical core wins (two AVX-512/AMX threads on one core share its units and only contend).
#pragma once
#include <string>

namespace kt::runtime {

inline constexpr int kSmtMinCores = 4;

// The rule, given the logical CPUs and the physical cores of the affinity mask.
int default_thread_count(int logical_cpus, int physical_cores);
// The rule on this process's affinity mask (cut to its cgroup CPU limit) and sysfs topology.
int default_thread_count();
// One line for reports: the count and which branch of the rule gave it.
std::string default_thread_reason();

}  // namespace kt::runtime
