// Portable C++ stand-ins for amx_ops.hpp's tile operations, VDPBF16PS and prefetches, selected by
// -DKT_AMX_EMULATE in local test builds only (never in the wheel); the other vector operations come
// from SIMDe there. They follow the Intel SDM's operation pseudo-code: TDPBF16PS and VDPBF16PS
// (products exact in fp32, odd/even pair order as written there, bf16 inputs with DAZ; SIMDe's
// VDPBF16PS has neither), TDPBSSD (signed bytes, exact int32 sums with wrap-around). Tiles live in a
// per-thread register file, and every tile operation checks the shapes the real instruction would
// fault or misbehave on, so a layout or configuration mistake aborts the test instead of passing.
// What this cannot show: that the real wrappers encode the right instructions, the hardware's exact
// fp32 rounding, and speed.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

namespace kt::isa_amx {

inline constexpr bool kEmulated = true;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "AMX emulation: %s\n", what);
  std::abort();
}

inline float bf16_daz(std::uint16_t v) {
  if ((v & 0x7f80u) == 0) v &= 0x8000u;  // denormal input -> signed zero
  const std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct TileFile {
  TileConfig cfg;
  bool configured = false;
  alignas(64) std::uint8_t data[8][1024];
};

inline TileFile& tiles() {
  thread_local TileFile file;
  return file;
}

// Prefetch bookkeeping, for tests of the prefetch logic (it cannot change results): the cache lines
// prefetched so far, and how many lines tile loads read that had (not) been prefetched before.
struct PrefetchLog {
  std::unordered_set<std::uintptr_t> lines;
  long loaded_prefetched = 0, loaded_cold = 0;
  const void* watch_begin[2] = {};  // only loads (tile or vector) inside these ranges count
  const void* watch_end[2] = {};
};
inline PrefetchLog& prefetch_log() {
  thread_local PrefetchLog log;
  return log;
}
inline void note_load(const void* p, int bytes) {
  PrefetchLog& log = prefetch_log();
  bool watched = false;
  for (int r = 0; r < 2; ++r) watched = watched || (p >= log.watch_begin[r] && p < log.watch_end[r]);
  if (!watched) return;
  const auto first = reinterpret_cast<std::uintptr_t>(p) / 64, last = (reinterpret_cast<std::uintptr_t>(p) + bytes - 1) / 64;
  for (auto line = first; line <= last; ++line) {
    if (log.lines.count(line)) ++log.loaded_prefetched;
    else ++log.loaded_cold;
  }
}

inline void check_tile(int t) {
  const TileFile& f = tiles();
  if (!f.configured) fail("tile used before LDTILECFG");
  if (f.cfg.rows[t] == 0 || f.cfg.rows[t] > 16 || f.cfg.colsb[t] == 0 || f.cfg.colsb[t] > 64)
    fail("tile used with an invalid or unconfigured shape");
}

}  // namespace emu

// ---- tiles --------------------------------------------------------------------------------------

inline void tile_config_load(const TileConfig& cfg) {
  if (reinterpret_cast<std::uintptr_t>(&cfg) % 64) emu::fail("LDTILECFG operand not 64-byte aligned");
  if (cfg.palette != 1) emu::fail("palette must be 1");
  emu::TileFile& f = emu::tiles();
  f.cfg = cfg;
  f.configured = true;
  std::memset(f.data, 0, sizeof f.data);
}

inline void tile_release() {
  emu::TileFile& f = emu::tiles();
  f.configured = false;
  std::memset(f.data, 0, sizeof f.data);
}

template <int T>
inline void tile_zero() {
  static_assert(T >= 0 && T < 8);
  emu::check_tile(T);
  std::memset(emu::tiles().data[T], 0, 1024);
}

template <int T>
inline void tile_load(const void* base, std::int64_t stride) {
  static_assert(T >= 0 && T < 8);
  emu::check_tile(T);
  emu::TileFile& f = emu::tiles();
  std::memset(f.data[T], 0, 1024);
  for (int r = 0; r < f.cfg.rows[T]; ++r) {
    std::memcpy(f.data[T] + 64 * r, static_cast<const std::uint8_t*>(base) + r * stride, f.cfg.colsb[T]);
    emu::note_load(static_cast<const std::uint8_t*>(base) + r * stride, f.cfg.colsb[T]);
  }
}

template <int T>
inline void tile_store(void* base, std::int64_t stride) {
  static_assert(T >= 0 && T < 8);
  emu::check_tile(T);
  emu::TileFile& f = emu::tiles();
  for (int r = 0; r < f.cfg.rows[T]; ++r)
    std::memcpy(static_cast<std::uint8_t*>(base) + r * stride, f.data[T] + 64 * r, f.cfg.colsb[T]);
}

namespace emu {
// The tile file after the checks a tile product (C += A . B, 4-byte groups) faults or misbehaves on.
template <int C, int A, int B>
inline TileFile& product_tiles() {
  static_assert(C != A && C != B && A != B, "a tile product needs three distinct tiles");
  for (int t : {C, A, B}) check_tile(t);
  TileFile& f = tiles();
  const TileConfig& g = f.cfg;
  if (g.rows[C] != g.rows[A] || g.colsb[C] != g.colsb[B] || g.colsb[A] != 4 * g.rows[B])
    fail("tile product operand shapes do not match");
  return f;
}
}  // namespace emu

template <int C, int A, int B>
inline void tile_dpbf16ps() {
  emu::TileFile& f = emu::product_tiles<C, A, B>();
  const TileConfig& g = f.cfg;
  for (int m = 0; m < g.rows[C]; ++m) {
    float row[16];
    std::memcpy(row, f.data[C] + 64 * m, 64);
    const auto* a = reinterpret_cast<const std::uint16_t*>(f.data[A] + 64 * m);
    for (int k = 0; k < g.colsb[A] / 4; ++k) {
      const auto* b = reinterpret_cast<const std::uint16_t*>(f.data[B] + 64 * k);
      for (int n = 0; n < g.colsb[C] / 4; ++n) {
        row[n] += emu::bf16_daz(a[2 * k]) * emu::bf16_daz(b[2 * n]);
        row[n] += emu::bf16_daz(a[2 * k + 1]) * emu::bf16_daz(b[2 * n + 1]);
      }
    }
    std::memcpy(f.data[C] + 64 * m, row, 64);
  }
}

// tmm[C] += tmm[A] . tmm[B] (TDPBSSD): C int32 [rows x colsb/4], A int8 [rows x 4K], B VNNI [K x colsb].
template <int C, int A, int B>
inline void tile_dpbssd() {
  emu::TileFile& f = emu::product_tiles<C, A, B>();
  const TileConfig& g = f.cfg;
  for (int m = 0; m < g.rows[C]; ++m) {
    std::uint32_t row[16];  // unsigned: the instruction's int32 sums wrap around
    std::memcpy(row, f.data[C] + 64 * m, 64);
    const auto* a = reinterpret_cast<const std::int8_t*>(f.data[A] + 64 * m);
    for (int k = 0; k < g.colsb[A] / 4; ++k) {
      const auto* b = reinterpret_cast<const std::int8_t*>(f.data[B] + 64 * k);
      for (int n = 0; n < g.colsb[C] / 4; ++n)
        for (int i = 0; i < 4; ++i) row[n] += static_cast<std::uint32_t>(a[4 * k + i] * b[4 * n + i]);
    }
    std::memcpy(f.data[C] + 64 * m, row, 64);
  }
}

// ---- vectors ---------------------------------------------------------------------------------------

// fp32 lanes: acc[j] += a.bf16[2j+1] * b.bf16[2j+1], then += a.bf16[2j] * b.bf16[2j] (VDPBF16PS)
inline V v_dpbf16(V acc, V a, V b) {
  float sum[16];
  std::uint16_t x[32], y[32];
  std::memcpy(sum, &acc.r, 64);
  std::memcpy(x, &a.r, 64);
  std::memcpy(y, &b.r, 64);
  for (int j = 0; j < 16; ++j) {
    sum[j] += emu::bf16_daz(x[2 * j + 1]) * emu::bf16_daz(y[2 * j + 1]);
    sum[j] += emu::bf16_daz(x[2 * j]) * emu::bf16_daz(y[2 * j]);
  }
  V v;
  std::memcpy(&v.r, sum, 64);
  return v;
}

inline void note_vector_load(const void* p) { emu::note_load(p, 64); }
inline void prefetch_l1(const void* p) { emu::prefetch_log().lines.insert(reinterpret_cast<std::uintptr_t>(p) / 64); }
inline void prefetch_l2(const void* p) { prefetch_l1(p); }

}  // namespace kt::isa_amx
