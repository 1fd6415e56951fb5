// How much memory this process may still take, for the layer's up-front size check (issue 16 item
// 8b): a call whose workspace and activation cache exceed it raises MemoryError before allocating,
// instead of allocating until the OOM killer comes.
#pragma once
#include <cstdint>
#include <string>

namespace kt::runtime {

struct AvailableMemory {
  std::uint64_t bytes = UINT64_MAX;  // UINT64_MAX: nothing could be read (no limit known)
  std::string source;                // what set `bytes`: "MemAvailable", "cgroup v2 memory.max", ...
};

// min(MemAvailable of /proc/meminfo, cgroup limit - usage (v2 memory.max - memory.current, or v1
// memory.limit_in_bytes - memory.usage_in_bytes)). The environment variable KT_SFT_TEST_MEM_LIMIT
// (bytes), when set, replaces the reading: tests use it to check the MemoryError without really
// allocating tens of GB. Read at every call (a few small file reads; the layer's size check reuses a
// reading for up to 100 ms, src/moe/memory_check.cpp).
AvailableMemory available_memory();

}  // namespace kt::runtime
