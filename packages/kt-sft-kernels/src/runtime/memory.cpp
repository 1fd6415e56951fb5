#include "kt/runtime/memory.hpp"

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace kt::runtime {
namespace {

// The first number in a file ("max" and unreadable files give nothing).
bool read_number(const std::string& path, std::uint64_t& value) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word.empty() || word.find_first_not_of("0123456789") != std::string::npos) return false;
  value = std::strtoull(word.c_str(), nullptr, 10);
  return true;
}

// MemAvailable of /proc/meminfo, or MemTotal where MemAvailable reads as absent or 0 (seen on a
// memory-hot-plug VM whose MemAvailable read 0 while the process ran: a zero reading is not a limit).
// Each line is parsed on its own, so an unusual line cannot end the scan early.
bool mem_available(std::uint64_t& bytes) {
  std::ifstream in("/proc/meminfo");
  std::string line;
  std::uint64_t available = 0, total = 0;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    std::uint64_t kib = 0;
    if (!(fields >> key >> kib)) continue;
    if (key == "MemAvailable:") available = kib * 1024;
    if (key == "MemTotal:") total = kib * 1024;
  }
  bytes = available > 0 ? available : total;
  return bytes > 0;
}

// This process's cgroup v2 directory ("0::/path" in /proc/self/cgroup).
std::string cgroup_v2_dir() {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("0::", 0) == 0) return "/sys/fs/cgroup" + line.substr(3);
  return "/sys/fs/cgroup";
}

void take_min(AvailableMemory& m, std::uint64_t bytes, const char* source) {
  if (bytes < m.bytes) {
    m.bytes = bytes;
    m.source = source;
  }
}

void take_cgroup(AvailableMemory& m, const std::string& limit_path, const std::string& usage_path,
                 const char* source) {
  std::uint64_t limit = 0, usage = 0;
  if (!read_number(limit_path, limit) || !read_number(usage_path, usage)) return;
  take_min(m, limit > usage ? limit - usage : 0, source);
}

}  // namespace

AvailableMemory available_memory() {
  AvailableMemory m;
  if (const char* test_limit = std::getenv("KT_SFT_TEST_MEM_LIMIT"); test_limit && *test_limit) {
    m.bytes = std::strtoull(test_limit, nullptr, 10);
    m.source = "KT_SFT_TEST_MEM_LIMIT";
    return m;
  }
  std::uint64_t bytes = 0;
  if (mem_available(bytes)) take_min(m, bytes, "MemAvailable");
  const std::string v2 = cgroup_v2_dir();
  take_cgroup(m, v2 + "/memory.max", v2 + "/memory.current", "the cgroup v2 limit memory.max");
  take_cgroup(m, "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
              "the cgroup v1 limit memory.limit_in_bytes");
  return m;
}

}  // namespace kt::runtime
