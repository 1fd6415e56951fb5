// Node-local memory without libnuma (ADR 0701): placement by first touch from pinned threads, and a
// preference set through the raw mbind(2) syscall where the kernel allows it (no link, no build flag).
#pragma once
#include <cstddef>

namespace kt::runtime {

class ThreadPool;

// Prefers `node` for the pages of [data, data + bytes) not yet faulted in (MPOL_PREFERRED; the
// range is widened to whole pages). False where the kernel refuses or lacks NUMA (e.g. seccomp,
// no CONFIG_NUMA): placement then rests on first touch alone.
bool prefer_node(void* data, std::size_t bytes, int node);

// Writes one byte of every page of [data, data + bytes) from the pool's threads, so each page is
// faulted in on the node of the thread that touched it (a pool pinned to one node: that node).
// The bytes written are zero.
void first_touch(ThreadPool& pool, void* data, std::size_t bytes);

// The node the page holding `address` lives on; -1 if unknown (no NUMA syscalls, page not present).
int node_of_address(const void* address);

}  // namespace kt::runtime
