#include "kt/runtime/memory.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// "<key>: <number> kB" lines of /proc/meminfo, in bytes. Parsed with stdio and strtoull, not iostreams:
// on the AMX + H200 VM, once NumPy 2.5 was imported, the iostream reading gave 0 for every field.
std::uint64_t meminfo_bytes(const char* key) {
  std::FILE* file = std::fopen("/proc/meminfo", "r");
  if (file == nullptr) return 0;
  const std::size_t key_length = std::strlen(key);
  char line[256];
  std::uint64_t bytes = 0;
  while (std::fgets(line, sizeof line, file) != nullptr) {
    if (std::strncmp(line, key, key_length) == 0 && line[key_length] == ':') {
      bytes = std::strtoull(line + key_length + 1, nullptr, 10) * 1024;
      break;
    }
  }
  std::fclose(file);
  return bytes;
}

// MemAvailable, or MemTotal where MemAvailable is absent or reads 0 (a zero reading is not a limit).
bool mem_available(std::uint64_t& bytes) {
  bytes = meminfo_bytes("MemAvailable");
  if (bytes == 0) bytes = meminfo_bytes("MemTotal");
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
