// CPU / NUMA topology and the shard layout built on it (DESIGN.md §3.4 TP wrapper; ADR 0701).
//
// What the process may use = the NUMA nodes of /sys/devices/system/node, each cut down to the CPUs
// of the process's affinity mask (sched_getaffinity), then to one logical CPU per physical core
// (SMT siblings from /sys/devices/system/cpu/cpuN/topology), then to the cgroup CPU limit (v2
// cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us). A machine without /sys/devices/system/node is
// one node. Every reader takes a root directory so tests can point it at a fake /sys tree.
#pragma once
#include <string>
#include <vector>

namespace kt::runtime {

struct NumaNode {
  int id = 0;
  std::vector<int> cpus;   // usable logical CPUs of the node (node ∩ affinity), ascending
  std::vector<int> cores;  // one logical CPU per physical core among `cpus`, after the cgroup limit
};

struct Topology {
  std::string root = "/";      // where /sys and /proc were read
  bool from_sysfs = false;     // false: no node directories, one synthetic node 0
  int machine_nodes = 1;       // nodes sysfs lists (with or without usable CPUs)
  std::vector<int> affinity;   // the affinity mask the layout was cut to
  double cgroup_cpus = 0;      // CPU limit quota / period; 0 = no limit
  std::string cgroup_source;   // the file the limit came from ("" = none)
  std::vector<NumaNode> nodes; // nodes with at least one usable core, by id

  int physical_cores() const;  // sum of the nodes' cores
};

// Reads the topology under `root` ("/" = this machine). affinity: the CPUs to cut to; null = this
// process's sched_getaffinity mask.
Topology read_topology(const std::string& root = "/", const std::vector<int>* affinity = nullptr);
// This process's topology, read once (and again in a child after fork()).
const Topology& system_topology();

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; throws std::invalid_argument (naming `what`) on bad text.
std::vector<int> parse_cpu_list(const std::string& text, const std::string& what);
std::string format_cpu_list(const std::vector<int>& cpus);

// KT_SFT_NUMA (docs/environment.md):
//   unset, "" or "auto"  one shard per NUMA node that has usable cores
//   "off"                one shard over all usable cores (NUMA ignored)
//   "N" (integer >= 1)   N shards laid out over the nodes (see plan_shards)
//   "0-3;4-7"            explicit shards, one CPU list each (';'-separated); threads = listed CPUs
struct NumaSetting {
  enum class Mode { automatic, off, count, lists };
  Mode mode = Mode::automatic;
  int count = 0;
  std::vector<std::vector<int>> lists;
  std::string text;  // as given ("" = unset)
};
NumaSetting parse_numa_setting(const std::string& text);  // throws std::invalid_argument naming KT_SFT_NUMA
NumaSetting numa_setting_from_env();                      // KT_SFT_NUMA, read on every call

// One shard: the CPUs its threads are pinned to (cpus[0] drives it), the node(s) they belong to.
struct Shard {
  std::vector<int> nodes;  // node ids covered, ascending (first = the node its memory prefers)
  std::vector<int> cpus;   // one thread per entry, in order; may repeat across shards (too few cores)
};

// The number of shards the setting asks for on this topology ("auto" = nodes with cores).
int auto_shard_count(const Topology& topology, const NumaSetting& setting);

// Lays out `shards` shards (>= 1) over the topology:
//   explicit lists in the setting with exactly `shards` entries: those CPUs.
//   "off": the nodes are merged into one before splitting.
//   shards >= nodes: shard s lives on node s*nodes/shards; the shards of a node split its cores
//     into contiguous, near-equal ranges (a node with fewer cores than shards: they share cores).
//   shards < nodes: shard s gets nodes [s*nodes/shards, (s+1)*nodes/shards), all their cores.
std::vector<Shard> plan_shards(const Topology& topology, int shards, const NumaSetting& setting);

// Whether a layer's shards at these places run in turn on all of their CPUs, each call one call over
// all the shards (ADR 0701, "Execution"): they all cover the same nodes (one shard trivially), unless
// KT_SFT_NUMA_SHARED_DOWN=0 (read on every call) keeps the concurrent form with pinned sub-pools.
bool shards_run_in_turn(const std::vector<Shard>& shards);

}  // namespace kt::runtime
