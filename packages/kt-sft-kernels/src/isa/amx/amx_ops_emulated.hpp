// Portable C++ stand-ins for amx_ops.hpp, selected by -DKT_AMX_EMULATE in local test builds only
// (never in the wheel). They follow the Intel SDM's operation pseudo-code: per-128-bit-lane unpacks,
// VSHUFI32X4 lane selection, VPERMQ, VDPBF16PS and TDPBF16PS (products exact in fp32, odd/even pair
// order as written there, bf16 inputs with DAZ). Tiles live in a per-thread register file, and every
// tile operation checks the shapes the real instruction would fault or misbehave on, so a layout or
// configuration mistake aborts the test instead of passing. What this cannot show: that the real
// wrappers encode the right instructions, the hardware's exact fp32 rounding, and speed.
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

template <int C, int A, int B>
inline void tile_dpbf16ps() {
  static_assert(C != A && C != B && A != B, "TDPBF16PS needs three distinct tiles");
  emu::check_tile(C);
  emu::check_tile(A);
  emu::check_tile(B);
  emu::TileFile& f = emu::tiles();
  const TileConfig& g = f.cfg;
  if (g.rows[C] != g.rows[A] || g.colsb[C] != g.colsb[B] || g.colsb[A] != 4 * g.rows[B])
    emu::fail("TDPBF16PS operand shapes do not match");
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

// ---- 512-bit vectors ----------------------------------------------------------------------------

struct alignas(64) V {
  std::uint32_t d[16];
  std::uint16_t w(int i) const { return static_cast<std::uint16_t>(d[i / 2] >> (16 * (i % 2))); }
  void set_w(int i, std::uint16_t x) {
    const int s = 16 * (i % 2);
    d[i / 2] = (d[i / 2] & ~(0xffffu << s)) | (static_cast<std::uint32_t>(x) << s);
  }
  std::uint64_t q(int i) const { return d[2 * i] | (static_cast<std::uint64_t>(d[2 * i + 1]) << 32); }
  void set_q(int i, std::uint64_t x) {
    d[2 * i] = static_cast<std::uint32_t>(x);
    d[2 * i + 1] = static_cast<std::uint32_t>(x >> 32);
  }
  float f(int i) const {
    float x;
    std::memcpy(&x, &d[i], 4);
    return x;
  }
  void set_f(int i, float x) { std::memcpy(&d[i], &x, 4); }
};

inline V v_load(const void* p) {
  emu::note_load(p, 64);
  V v;
  std::memcpy(v.d, p, 64);
  return v;
}
inline void v_store(void* p, V a) { std::memcpy(p, a.d, 64); }
inline V v_zero() { return V{}; }
inline V v_set1_u32(std::uint32_t x) {
  V v;
  for (auto& e : v.d) e = x;
  return v;
}

// VPUNPCK{L,H}WD: in each 128-bit lane, interleave words 0..3 (lo) or 4..7 (hi) of a and b.
inline V v_unpack16(V a, V b, int half) {
  V v;
  for (int lane = 0; lane < 4; ++lane)
    for (int i = 0; i < 4; ++i) {
      v.set_w(8 * lane + 2 * i, a.w(8 * lane + 4 * half + i));
      v.set_w(8 * lane + 2 * i + 1, b.w(8 * lane + 4 * half + i));
    }
  return v;
}
inline V v_unpacklo16(V a, V b) { return v_unpack16(a, b, 0); }
inline V v_unpackhi16(V a, V b) { return v_unpack16(a, b, 1); }

// VPUNPCK{L,H}DQ: in each lane, dwords 0..1 (lo) or 2..3 (hi) of a and b interleaved.
inline V v_unpack32(V a, V b, int half) {
  V v;
  for (int lane = 0; lane < 4; ++lane)
    for (int i = 0; i < 2; ++i) {
      v.d[4 * lane + 2 * i] = a.d[4 * lane + 2 * half + i];
      v.d[4 * lane + 2 * i + 1] = b.d[4 * lane + 2 * half + i];
    }
  return v;
}
inline V v_unpacklo32(V a, V b) { return v_unpack32(a, b, 0); }
inline V v_unpackhi32(V a, V b) { return v_unpack32(a, b, 1); }

// VPUNPCK{L,H}QDQ: in each lane, qword 0 (lo) or 1 (hi) of a, then of b.
inline V v_unpack64(V a, V b, int half) {
  V v;
  for (int lane = 0; lane < 4; ++lane) {
    v.set_q(2 * lane, a.q(2 * lane + half));
    v.set_q(2 * lane + 1, b.q(2 * lane + half));
  }
  return v;
}
inline V v_unpacklo64(V a, V b) { return v_unpack64(a, b, 0); }
inline V v_unpackhi64(V a, V b) { return v_unpack64(a, b, 1); }

// VSHUFI32X4: lanes 0,1 from a, lanes 2,3 from b, each chosen by two bits of Imm.
template <int Imm>
inline V v_shuffle128(V a, V b) {
  V v;
  for (int lane = 0; lane < 4; ++lane) {
    const V& src = lane < 2 ? a : b;
    const int from = (Imm >> (2 * lane)) & 3;
    for (int i = 0; i < 4; ++i) v.d[4 * lane + i] = src.d[4 * from + i];
  }
  return v;
}

// VPERMQ (permutexvar_epi64): qword i of the result is qword idx[i] & 7 of a.
inline V v_permute64(V a, V idx) {
  V v;
  for (int i = 0; i < 8; ++i) v.set_q(i, a.q(static_cast<int>(idx.q(i) & 7)));
  return v;
}

inline V v_dpbf16(V acc, V a, V b) {
  V v;
  for (int j = 0; j < 16; ++j) {
    float t = acc.f(j);
    t += emu::bf16_daz(a.w(2 * j + 1)) * emu::bf16_daz(b.w(2 * j + 1));
    t += emu::bf16_daz(a.w(2 * j)) * emu::bf16_daz(b.w(2 * j));
    v.set_f(j, t);
  }
  return v;
}

inline V v_add_f32(V a, V b) {
  V v;
  for (int j = 0; j < 16; ++j) v.set_f(j, a.f(j) + b.f(j));
  return v;
}

inline void prefetch_l1(const void* p) { emu::prefetch_log().lines.insert(reinterpret_cast<std::uintptr_t>(p) / 64); }
inline void prefetch_l2(const void* p) { prefetch_l1(p); }

}  // namespace kt::isa_amx
