// The up-front size check of forward/backward (issue 16 item 8b): estimate what a call will allocate
// (its share of the grow-only workspace plus, for forward(save=True), the new activation cache) and
// compare it with the memory this process may still take, before allocating anything.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "kt/runtime/memory.hpp"
#include "layer_internal.hpp"

namespace kt::moe {
namespace {

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return text;
}

// The last reading of the available memory, less what calls were allowed to take since. A call that
// fits in a reading younger than kMaxAge is allowed without reading again: /proc/meminfo and the
// cgroup files cost tens of microseconds a call, which a tiny layer's call (~0.1-0.5 ms) feels. A
// fresh reading decides every refusal, so the budget can only delay a MemoryError by kMaxAge of
// other processes' growth, never raise a false one.
struct Budget {
  static constexpr std::chrono::milliseconds kMaxAge{100};
  std::mutex mutex;
  std::chrono::steady_clock::time_point read_at;
  std::uint64_t left = 0;
  bool valid = false;

  // True when `bytes` fits in a fresh enough reading (and then takes it off the budget).
  bool take(std::size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!valid || std::chrono::steady_clock::now() - read_at > kMaxAge || bytes > left) return false;
    left -= bytes;
    return true;
  }
  void reset(std::uint64_t available, std::size_t taken) {
    const std::lock_guard<std::mutex> lock(mutex);
    read_at = std::chrono::steady_clock::now();
    left = available > taken ? available - taken : 0;
    valid = true;
  }
};

Budget& budget() {
  static Budget b;
  return b;
}

bool test_limit_set() {
  const char* limit = std::getenv("KT_SFT_TEST_MEM_LIMIT");
  return limit != nullptr && *limit != '\0';
}

}  // namespace

// The fp32 per-pair rows of one token chunk (token_chunks.hpp: at most the row budget, unless one
// token's k rows exceed it), their chunk-row pointers and the call-row -> chunk-row map.
static std::size_t chunk_rows_bytes(const MoEConfig& c, std::int64_t T) {
  const auto rows = static_cast<std::size_t>(chunk_row_bound(T, c.top_k, c.hidden));
  const bool chunked = rows < static_cast<std::size_t>(T) * static_cast<std::size_t>(c.top_k);
  return rows * (4 * static_cast<std::size_t>(c.hidden) + (chunked ? 8 : 0)) +
         (chunked ? static_cast<std::size_t>(T) * static_cast<std::size_t>(c.top_k) * 4 : 0);
}

// One phase's activation packing of P pair rows of k values (amx-style tiers): at most two bytes a
// value (bf16, or int8's two digits) with k rounded up to 64, each GEMM call's rows rounded up to whole
// 16-row tiles (at most num_experts + P / kMaxChunkRows calls: chunk_rows), a scale row a call.
static std::size_t packing_bytes(const MoEConfig& c, std::size_t P, std::size_t k) {
  const std::size_t calls = static_cast<std::size_t>(c.num_experts) + P / kMaxChunkRows;
  return (P + 16 * calls) * ((k + 63) / 64 * 64 * 2 + 4) + 64 * calls;
}

// Upper bounds (P <= T*k routed pairs), in bytes, following the ensure() calls of layer_forward.cpp /
// layer_backward.cpp; the routing and the activation packing of the amx-style tiers (one buffer, sized
// for the widest phase input) included.
CallBytes forward_bytes(const MoEConfig& c, std::int64_t T, int rg, int rd, bool save, int threads) {
  const std::size_t P = static_cast<std::size_t>(T) * static_cast<std::size_t>(c.top_k);
  const std::size_t H = static_cast<std::size_t>(c.hidden), I = static_cast<std::size_t>(c.intermediate);
  const std::size_t routing = P * 24 + static_cast<std::size_t>(c.num_experts + 1) * 8;
  const std::size_t cached_per_pair = cache_bytes_per_pair(c, rg, rd);
  CallBytes b;
  b.workspace = static_cast<std::size_t>(T) * H * 2 /*xb*/ + P * (16 /*row pointers*/ + 2 * I /*hb*/) +
                packing_bytes(c, P, std::max(H, I)) + chunk_rows_bytes(c, T) +
                static_cast<std::size_t>(threads) * kTileFloats * 4 + (save ? 0 : P * cached_per_pair + routing);
  b.cache = save ? P * cached_per_pair + routing : 0;
  return b;
}

CallBytes backward_bytes(const MoEConfig& c, std::int64_t T, int rg, int rd, int threads) {
  const std::size_t P = static_cast<std::size_t>(T) * static_cast<std::size_t>(c.top_k);
  const std::size_t H = static_cast<std::size_t>(c.hidden), I = static_cast<std::size_t>(c.intermediate);
  const std::size_t i_blocks = static_cast<std::size_t>(blocks_of(c.intermediate, kWideBlock));
  CallBytes b;
  b.workspace = static_cast<std::size_t>(T) * H * 2 * 2 /*xb, gb*/ +
                P * (32 /*row pointers*/ + 2 * I /*hb*/ + 2 * 2 * I /*dgu*/ + 4 * static_cast<std::size_t>(rg + rd) +
                     4 * i_blocks + 4 /*gw*/) +
                packing_bytes(c, P, std::max(H, 2 * I)) + chunk_rows_bytes(c, T) +
                static_cast<std::size_t>(threads) * (kTileFloats + kWideBlock * 64) * 4;
  return b;
}

void check_call_memory(const char* what, const MoEConfig& c, std::int64_t T, const CallBytes& need,
                       std::size_t& reserved) {
  // The workspace only grows past what an earlier call already holds; the cache is always new.
  const std::size_t growth = need.workspace > reserved ? need.workspace - reserved : 0;
  const std::size_t total = growth + need.cache;
  if (total == 0) return;
  const bool testing = test_limit_set();  // tests change the limit between calls: always read it
  if (!testing && budget().take(total)) {
    reserved = std::max(reserved, need.workspace);
    return;
  }
  const runtime::AvailableMemory available = runtime::available_memory();
  if (total > available.bytes)
    throw MemoryError(std::string(what) + ": " + std::to_string(T) + " tokens with top_k=" + std::to_string(c.top_k) +
                      " need about " + gib(static_cast<double>(total)) + " (" + std::to_string(total) +
                      " bytes) more for the workspace" + (need.cache ? " and the activation cache" : "") + ", but only " +
                      gib(static_cast<double>(available.bytes)) + " (" + std::to_string(available.bytes) +
                      " bytes) are available (" + available.source +
                      "); pass fewer tokens per call (a smaller micro-batch size or sequence length)");
  if (!testing) budget().reset(available.bytes, total);
  reserved = std::max(reserved, need.workspace);
}

}  // namespace kt::moe
