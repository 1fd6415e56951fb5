// Topology discovery and shard layout (include/kt/runtime/topology.hpp). Plain POSIX I/O: this runs
// when the first pool or layer is made, and needs neither iostreams nor locales.
#include "kt/runtime/topology.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include "kt/runtime/thread_pool.hpp"

namespace kt::runtime {
namespace {

constexpr int kMaxCpu = 1 << 16;  // larger CPU numbers are taken for garbage

std::string join(const std::string& root, const std::string& path) {
  if (root.empty() || root == "/") return path;
  return (root.back() == '/' ? root.substr(0, root.size() - 1) : root) + path;
}

// Whole (small) file, or nullopt-like "" with ok = false.
bool read_text(const std::string& path, std::string& text) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  text.clear();
  char buf[4096];
  for (;;) {
    const ssize_t got = ::read(fd, buf, sizeof buf);
    if (got <= 0) break;
    text.append(buf, static_cast<std::size_t>(got));
    if (text.size() > (1u << 20)) break;
  }
  ::close(fd);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return true;
}

bool parse_int(const std::string& text, long long& value) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  value = std::strtoll(text.c_str(), &end, 10);
  return errno == 0 && end != text.c_str() && *end == '\0';
}

int read_int(const std::string& path) {
  std::string text;
  long long value = 0;
  if (!read_text(path, text) || !parse_int(text, value) || value < 0 || value > INT_MAX) return -1;
  return static_cast<int>(value);
}

bool is_dir(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return false;
  ::closedir(d);
  return true;
}

// ids of the "nodeN" entries of a directory, ascending.
std::vector<int> node_ids(const std::string& dir) {
  std::vector<int> ids;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ids;
  while (const dirent* entry = ::readdir(d)) {
    const std::string name = entry->d_name;
    long long id = 0;
    if (name.rfind("node", 0) == 0 && parse_int(name.substr(4), id) && id >= 0 && id < kMaxCpu)
      ids.push_back(static_cast<int>(id));
  }
  ::closedir(d);
  std::sort(ids.begin(), ids.end());
  return ids;
}

// CPU limit of one cgroup directory (v2 cpu.max or v1 cfs files); 0 = none there.
double cgroup_limit_in(const std::string& dir, std::string& source) {
  std::string text;
  if (read_text(dir + "/cpu.max", text)) {  // "max 100000" or "<quota> <period>"
    const std::size_t space = text.find(' ');
    long long quota = 0, period = 0;
    if (space != std::string::npos && parse_int(text.substr(0, space), quota) &&
        parse_int(text.substr(space + 1), period) && quota > 0 && period > 0) {
      source = dir + "/cpu.max";
      return static_cast<double>(quota) / static_cast<double>(period);
    }
    return 0;
  }
  long long quota = 0, period = 0;
  if (read_text(dir + "/cpu.cfs_quota_us", text) && parse_int(text, quota) && quota > 0 &&
      read_text(dir + "/cpu.cfs_period_us", text) && parse_int(text, period) && period > 0) {
    source = dir + "/cpu.cfs_quota_us";
    return static_cast<double>(quota) / static_cast<double>(period);
  }
  return 0;
}

// The smallest CPU limit on the way from the process's cgroup up to the hierarchy's root, for the
// v2 hierarchy and the v1 cpu controller. /proc/self/cgroup names the cgroup; inside a container
// that path may not exist in the mounted tree (the container's cgroup is the mount root), so the
// mount root is always looked at too.
double cgroup_cpu_limit(const std::string& root, std::string& source) {
  std::vector<std::pair<std::string, std::string>> hierarchies;  // (mount, cgroup path)
  std::string self;
  if (read_text(join(root, "/proc/self/cgroup"), self)) {
    std::size_t begin = 0;
    while (begin < self.size()) {
      std::size_t end = self.find('\n', begin);
      if (end == std::string::npos) end = self.size();
      const std::string line = self.substr(begin, end - begin);
      begin = end + 1;
      const std::size_t c1 = line.find(':'), c2 = c1 == std::string::npos ? c1 : line.find(':', c1 + 1);
      if (c2 == std::string::npos) continue;
      const std::string controllers = line.substr(c1 + 1, c2 - c1 - 1), path = line.substr(c2 + 1);
      if (line.rfind("0::", 0) == 0) {
        hierarchies.emplace_back("/sys/fs/cgroup", path);
      } else {
        const std::string padded = "," + controllers + ",";
        if (padded.find(",cpu,") == std::string::npos) continue;
        hierarchies.emplace_back("/sys/fs/cgroup/" + controllers, path);
        hierarchies.emplace_back("/sys/fs/cgroup/cpu", path);
      }
    }
  }
  hierarchies.emplace_back("/sys/fs/cgroup", "/");
  hierarchies.emplace_back("/sys/fs/cgroup/cpu", "/");
  double best = 0;
  for (const auto& [mount, path] : hierarchies) {
    std::string dir = path;
    for (;;) {  // the cgroup and each ancestor up to the mount root
      std::string where;
      const double limit = cgroup_limit_in(join(root, mount + (dir == "/" ? "" : dir)), where);
      if (limit > 0 && (best == 0 || limit < best)) {
        best = limit;
        source = where;
      }
      if (dir.empty() || dir == "/") break;
      const std::size_t slash = dir.rfind('/');
      dir = slash == 0 || slash == std::string::npos ? "/" : dir.substr(0, slash);
    }
  }
  return best;
}

// One logical CPU per (package, core) among cpus, in order; each CPU its own core where the
// topology files are missing.
std::vector<int> one_per_core(const std::string& root, const std::vector<int>& cpus) {
  std::vector<int> chosen;
  std::vector<std::pair<int, int>> seen;
  for (int cpu : cpus) {
    const std::string dir = join(root, "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/");
    const int package = read_int(dir + "physical_package_id"), core = read_int(dir + "core_id");
    if (package >= 0 && core >= 0) {
      const std::pair<int, int> key{package, core};
      if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
      seen.push_back(key);
    }
    chosen.push_back(cpu);
  }
  return chosen;
}

std::vector<int> intersect(const std::vector<int>& a, const std::vector<int>& sorted_b) {
  std::vector<int> out;
  for (int x : a)
    if (std::binary_search(sorted_b.begin(), sorted_b.end(), x)) out.push_back(x);
  return out;
}

// Drops cores until at most `budget` (>= 1) remain, always from the node with the most (so the nodes stay
// balanced), highest CPU first.
void apply_core_budget(std::vector<NumaNode>& nodes, int budget) {
  for (;;) {
    int total = 0;
    NumaNode* largest = nullptr;
    for (NumaNode& n : nodes) {
      total += static_cast<int>(n.cores.size());
      if (largest == nullptr || n.cores.size() >= largest->cores.size()) largest = &n;
    }
    if (total <= budget || largest == nullptr) break;
    largest->cores.pop_back();
  }
  // A node left without cores has nothing to run a shard on.
  nodes.erase(std::remove_if(nodes.begin(), nodes.end(), [](const NumaNode& n) { return n.cores.empty(); }),
              nodes.end());
}

}  // namespace

int Topology::physical_cores() const {
  int total = 0;
  for (const NumaNode& n : nodes) total += static_cast<int>(n.cores.size());
  return total;
}

std::vector<int> parse_cpu_list(const std::string& text, const std::string& what) {
  std::vector<int> cpus;
  const auto bad = [&](const std::string& why) -> std::invalid_argument {
    return std::invalid_argument(what + ": '" + text + "' is not a CPU list (" + why +
                                 "; expected e.g. '0-3,8,10-11')");
  };
  std::size_t begin = 0;
  if (text.empty()) throw bad("empty");
  while (begin <= text.size()) {
    std::size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(begin, end - begin);
    const std::size_t dash = item.find('-');
    long long lo = 0, hi = 0;
    const bool ok = dash == std::string::npos
                        ? parse_int(item, lo) && (hi = lo, true)
                        : parse_int(item.substr(0, dash), lo) && parse_int(item.substr(dash + 1), hi);
    if (!ok || lo < 0 || hi < lo || hi >= kMaxCpu) throw bad("bad item '" + item + "'");
    for (long long c = lo; c <= hi; ++c) cpus.push_back(static_cast<int>(c));
    begin = end + 1;
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

std::string format_cpu_list(const std::vector<int>& cpus) {
  std::string out;
  for (std::size_t i = 0; i < cpus.size();) {
    std::size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(cpus[i]);
    if (j > i) {
      out += '-';
      out += std::to_string(cpus[j]);
    }
    i = j + 1;
  }
  return out;
}

Topology read_topology(const std::string& root, const std::vector<int>* affinity) {
  Topology t;
  t.root = root.empty() ? "/" : root;
  t.affinity = affinity ? *affinity : affinity_cpus();
  std::sort(t.affinity.begin(), t.affinity.end());
  t.affinity.erase(std::unique(t.affinity.begin(), t.affinity.end()), t.affinity.end());

  const std::string node_dir = join(t.root, "/sys/devices/system/node");
  const std::vector<int> ids = is_dir(node_dir) ? node_ids(node_dir) : std::vector<int>{};
  t.from_sysfs = !ids.empty();
  t.machine_nodes = t.from_sysfs ? static_cast<int>(ids.size()) : 1;
  std::vector<int> assigned;
  for (int id : ids) {
    std::string text;
    NumaNode node;
    node.id = id;
    if (read_text(node_dir + "/node" + std::to_string(id) + "/cpulist", text) && !text.empty())
      node.cpus = intersect(parse_cpu_list(text, node_dir + "/node" + std::to_string(id) + "/cpulist"), t.affinity);
    assigned.insert(assigned.end(), node.cpus.begin(), node.cpus.end());
    if (!node.cpus.empty()) t.nodes.push_back(std::move(node));
  }
  // CPUs of the mask that no node lists (or no node directories at all): node 0 (or the first node).
  std::sort(assigned.begin(), assigned.end());
  std::vector<int> orphans;
  for (int cpu : t.affinity)
    if (!std::binary_search(assigned.begin(), assigned.end(), cpu)) orphans.push_back(cpu);
  if (!orphans.empty()) {
    if (t.nodes.empty()) t.nodes.push_back(NumaNode{ids.empty() ? 0 : ids.front(), {}, {}});
    NumaNode& first = t.nodes.front();
    first.cpus.insert(first.cpus.end(), orphans.begin(), orphans.end());
    std::sort(first.cpus.begin(), first.cpus.end());
  }
  for (NumaNode& node : t.nodes) node.cores = one_per_core(t.root, node.cpus);

  t.cgroup_cpus = cgroup_cpu_limit(t.root, t.cgroup_source);
  if (t.cgroup_cpus > 0) apply_core_budget(t.nodes, std::max(1, static_cast<int>(std::ceil(t.cgroup_cpus - 1e-9))));
  return t;
}

const Topology& system_topology() {
  static std::mutex mutex;
  static Topology* cached = nullptr;  // never destroyed: pools may outlive static destruction
  static pid_t cached_pid = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (cached == nullptr || cached_pid != ::getpid()) {
    cached = new Topology(read_topology("/"));  // a copy from before fork() is left behind
    cached_pid = ::getpid();
  }
  return *cached;
}

NumaSetting parse_numa_setting(const std::string& text) {
  NumaSetting s;
  s.text = text;
  std::string lower;
  for (char ch : text) lower += static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  if (lower.empty() || lower == "auto") return s;
  if (lower == "off") {
    s.mode = NumaSetting::Mode::off;
    return s;
  }
  long long count = 0;
  if (parse_int(text, count)) {
    if (count < 1 || count > 1024)
      throw std::invalid_argument("KT_SFT_NUMA='" + text + "': a shard count must be in [1, 1024]");
    s.mode = NumaSetting::Mode::count;
    s.count = static_cast<int>(count);
    return s;
  }
  s.mode = NumaSetting::Mode::lists;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    std::size_t end = text.find(';', begin);
    if (end == std::string::npos) end = text.size();
    s.lists.push_back(parse_cpu_list(text.substr(begin, end - begin),
                                     "KT_SFT_NUMA (expected 'auto', 'off', a shard count, or CPU lists "
                                     "separated by ';')"));
    begin = end + 1;
  }
  s.count = static_cast<int>(s.lists.size());
  return s;
}

NumaSetting numa_setting_from_env() {
  const char* env = std::getenv("KT_SFT_NUMA");
  return parse_numa_setting(env ? env : "");
}

int auto_shard_count(const Topology& topology, const NumaSetting& setting) {
  switch (setting.mode) {
    case NumaSetting::Mode::off: return 1;
    case NumaSetting::Mode::count:
    case NumaSetting::Mode::lists: return setting.count;
    case NumaSetting::Mode::automatic: break;
  }
  return std::max(1, static_cast<int>(topology.nodes.size()));
}

std::vector<Shard> plan_shards(const Topology& topology, int shards, const NumaSetting& setting) {
  if (shards < 1) throw std::invalid_argument("numa_shards must be >= 1, got " + std::to_string(shards));
  std::vector<Shard> out(static_cast<std::size_t>(shards));

  // The node each usable CPU belongs to.
  std::map<int, int> node_of;
  for (const NumaNode& n : topology.nodes)
    for (int cpu : n.cpus) node_of[cpu] = n.id;

  if (setting.mode == NumaSetting::Mode::lists && setting.count == shards) {
    for (int s = 0; s < shards; ++s) {
      Shard& shard = out[static_cast<std::size_t>(s)];
      shard.cpus = setting.lists[static_cast<std::size_t>(s)];
      for (int cpu : shard.cpus) {
        const auto it = node_of.find(cpu);
        if (it == node_of.end())
          throw std::invalid_argument("KT_SFT_NUMA: CPU " + std::to_string(cpu) +
                                      " is not one this process may use (affinity " +
                                      format_cpu_list(topology.affinity) + ")");
        shard.nodes.push_back(it->second);
      }
      std::sort(shard.nodes.begin(), shard.nodes.end());
      shard.nodes.erase(std::unique(shard.nodes.begin(), shard.nodes.end()), shard.nodes.end());
    }
    return out;
  }

  std::vector<NumaNode> nodes = topology.nodes;
  if (nodes.empty()) nodes.push_back(NumaNode{0, {0}, {0}});
  if (setting.mode == NumaSetting::Mode::off && nodes.size() > 1) {  // one pseudo-node of everything
    NumaNode all{nodes.front().id, {}, {}};
    for (const NumaNode& n : nodes) all.cores.insert(all.cores.end(), n.cores.begin(), n.cores.end());
    nodes = {all};
  }
  const int n = static_cast<int>(nodes.size());
  if (shards >= n) {
    for (int node = 0; node < n; ++node) {
      // Shards s with s*n/shards == node, i.e. the contiguous range [first, last).
      const int first = (node * shards + n - 1) / n, last = ((node + 1) * shards + n - 1) / n;
      const int m = last - first;
      const std::vector<int>& cores = nodes[static_cast<std::size_t>(node)].cores;
      const int c = static_cast<int>(cores.size());
      for (int j = 0; j < m; ++j) {
        Shard& shard = out[static_cast<std::size_t>(first + j)];
        if (setting.mode == NumaSetting::Mode::off) {
          for (const NumaNode& real : topology.nodes) shard.nodes.push_back(real.id);
        } else {
          shard.nodes = {nodes[static_cast<std::size_t>(node)].id};
        }
        if (c >= m) {
          shard.cpus.assign(cores.begin() + j * c / m, cores.begin() + (j + 1) * c / m);
        } else {
          shard.cpus = {cores[static_cast<std::size_t>(j % c)]};  // more shards than cores: they share
        }
      }
    }
  } else {
    for (int s = 0; s < shards; ++s) {
      Shard& shard = out[static_cast<std::size_t>(s)];
      for (int node = s * n / shards; node < (s + 1) * n / shards; ++node) {
        shard.nodes.push_back(nodes[static_cast<std::size_t>(node)].id);
        const std::vector<int>& cores = nodes[static_cast<std::size_t>(node)].cores;
        shard.cpus.insert(shard.cpus.end(), cores.begin(), cores.end());
      }
    }
  }
  return out;
}

bool shards_run_in_turn(const std::vector<Shard>& shards) {
  const char* env = std::getenv("KT_SFT_NUMA_SHARED_DOWN");
  if (env && std::string(env) == "0") return false;
  for (const Shard& s : shards)
    if (s.nodes != shards.front().nodes) return false;
  return true;
}

}  // namespace kt::runtime
