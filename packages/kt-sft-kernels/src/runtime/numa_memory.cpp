// Raw NUMA memory-policy syscalls (include/kt/runtime/numa_memory.hpp). The syscall numbers come from
// <sys/syscall.h>; where the platform has none, every call reports "unknown" and placement falls
// back to first touch.
#include "kt/runtime/numa_memory.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <sys/syscall.h>
#include <unistd.h>

#include "kt/runtime/thread_pool.hpp"

namespace kt::runtime {
namespace {

constexpr int kMpolPreferred = 1;        // <linux/mempolicy.h> MPOL_PREFERRED
constexpr unsigned kMpolFNode = 1u << 0;  // MPOL_F_NODE
constexpr unsigned kMpolFAddr = 1u << 1;  // MPOL_F_ADDR
constexpr int kMaxNodes = 1024;           // node mask bits passed to the kernel

std::size_t page_size() {
  static const std::size_t size = [] {
    const long s = ::sysconf(_SC_PAGESIZE);
    return s > 0 ? static_cast<std::size_t>(s) : std::size_t{4096};
  }();
  return size;
}

}  // namespace

bool prefer_node(void* data, std::size_t bytes, int node) {
#if defined(SYS_mbind)
  if (data == nullptr || bytes == 0 || node < 0 || node >= kMaxNodes) return false;
  const std::uintptr_t page = page_size();
  const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(data) & ~(page - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + bytes + page - 1) & ~(page - 1);
  unsigned long mask[kMaxNodes / (8 * sizeof(unsigned long))] = {};
  mask[static_cast<std::size_t>(node) / (8 * sizeof(unsigned long))] |= 1ul << (node % (8 * sizeof(unsigned long)));
  return ::syscall(SYS_mbind, begin, end - begin, kMpolPreferred, mask, kMaxNodes + 1, 0u) == 0;
#else
  (void)data, (void)bytes, (void)node;
  return false;
#endif
}

void first_touch(ThreadPool& pool, void* data, std::size_t bytes) {
  if (data == nullptr || bytes == 0) return;
  auto* base = static_cast<unsigned char*>(data);
  const std::size_t page = page_size();
  constexpr std::size_t kPagesPerTask = 64;
  const std::size_t pages = (bytes + page - 1) / page;
  const auto tasks = static_cast<std::int64_t>((pages + kPagesPerTask - 1) / kPagesPerTask);
  pool.parallel_for(tasks, [&](std::int64_t task, int) {
    const std::size_t first = static_cast<std::size_t>(task) * kPagesPerTask;
    const std::size_t last = std::min(pages, first + kPagesPerTask);
    for (std::size_t p = first; p < last; ++p) {
      const std::size_t at = p * page;
      const std::size_t len = std::min(page, bytes - at);
      std::memset(base + at, 0, len);
    }
  });
}

int node_of_address(const void* address) {
#if defined(SYS_get_mempolicy)
  int node = -1;
  if (::syscall(SYS_get_mempolicy, &node, nullptr, 0ul, address, kMpolFNode | kMpolFAddr) != 0) return -1;
  return node;
#else
  (void)address;
  return -1;
#endif
}

}  // namespace kt::runtime
