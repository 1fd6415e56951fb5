// The amx tier: base-weight GEMMs on AMX-BF16 tiles (TDPBF16PS) -- int8 bases on AMX-INT8 tiles
// (TDPBSSD, amx_int8.cpp has its own notes) --, AVX-512 BF16 dot products for
//
// This header: the tier's design notes (below), the constants, tile session and vector helpers its files
// share, and the declarations that tie them together: packing.cpp (weights and activations),
// gemm_nt.cpp / gemm_nn.cpp (the AMX paths), small_m.cpp (AVX-512 BF16 dot products for few rows),
// table.cpp (the KernelTable entries).
// calls with very few rows (off by default), and the AVX-512 tiers' SwiGLU (simd_act.inl) and LoRA
// kernels (simd_lora_avx512.inl).
//
// ---- Packed weight layout (PackFormat::amx_bf16_tiles) ------------------------------------------
// W [R, C] (R, C multiples of 32) is cut into 16 x 32 tiles. Tile (rt, ct) holds rows 16rt..16rt+15,
// columns 32ct..32ct+31, at byte (rt * C/32 + ct) * 1024, as 16 rows of 64 bytes. Inside a tile row
// the eight 4-column groups (qwords) are stored in the order
//        0 4 1 5 2 6 3 7            (stored qword s holds columns 4*kPerm[s] .. 4*kPerm[s]+3)
// That one permutation lets the SAME tiles serve both products, with no transposed copy:
//
//  * gemm_nt, forward, C = A W^T (W [N, K], reduce over K): a W tile is the AMX "A" operand as it is
//    (tile rows = output columns n, 64 bytes = 32 reduction values). The activations are the "B"
//    operand: pack_a_nt stores each 16-token x 32-value block dword-transposed (VNNI: tile row p holds,
//    for each token, the bf16 pair at stored positions 2p, 2p+1 of W's permuted order). The tile
//    product is C^T (16 n x 16 tokens), transposed (16x16 fp32) on its way to C.
//
//  * gemm_nn, backward, C = A W (W [K, N] viewed as [rows = reduction, cols = outputs]): the
//    activations are the "A" operand (pack_a_nn: plain 16 x 32 row-major tiles). The "B" operand needs
//    W's rows q, q+1 interleaved column by column (VNNI). It is built on the fly, per 32-row x
//    32-column block, into a small stack buffer: VPUNPCKLWD / VPUNPCKHWD of stored rows q and q+1.
//    Those instructions work within 128-bit lanes; with the stored qword order above, lane L of a row
//    holds columns 4L..4L+3 and 16+4L..16+4L+3, so the "lo" result is columns 0..15 in order and
//    "hi" is columns 16..31: output columns need no fix-up.
//
// ---- Activation packings (pack_a_nt / pack_a_nn) -------------------------------------------------
// m >= small_m: ceil(m/16) x (k/32) tiles of 1 KB, tile (mt, kb) at (mt * k/32 + kb) * 1024; rows past
// m are zero. m < small_m: just the m row pointers (the dot-product path reads rows directly).
//
// ---- Blocking (AMX path) --------------------------------------------------------------------------
// Tiles 0..3 accumulate a 2 x 2 block of 16 x 16 fp32 results, 4..5 hold the weight-derived operands,
// 6..7 the activation tiles: per reduction step 4 tile loads feed 4 TDPBF16PS. Per m-block (up to
// 128 rows) the reduction runs in chunks of kc_steps tiles, chunk outermost, then output column
// pairs, then row pairs: a (chunk, column pair) of weight tiles (2 x kc_steps KB) stays in L1 while
// every row pair streams its activation tiles past it, and the chunk's activation tiles (<= 8 x
// kc_steps KB) stay in L1/L2 for every column pair. Between chunks the accumulators of each
// (column pair, row pair) wait in a per-thread spill buffer (exact fp32, so the result does not
// depend on kc_steps). The next (chunk, column pair) of weights is prefetched while the first row
// pair runs; the activation tiles a few steps ahead during the chunk's first column pair (they come
// from L3, packed by other threads; later column pairs find them cached).
//
// ---- Determinism ------------------------------------------------------------------------------------
// Every output element is one chain of TDPBF16PS (or VDPBF16PS) steps over the reduction in
// increasing order, started from zero and never split: results depend on m (which path runs) but not
// on the column range of the call, kc_steps, the m-block, or threads.
//
// Tile state: each GEMM call configures the tiles (LDTILECFG, all eight 16 rows x 64 bytes) on entry
// and releases them (TILERELEASE) on exit, so a foreign AMX user on the same thread (PyTorch's oneDNN
// on the calling thread) can neither break nor be broken by us. The Linux permission for tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM) is requested by src/runtime/cpu_features.cpp at feature detection,
// before this tier can become active; each thread checks it once before its first tile instruction.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "amx_ops.hpp"
#include "amx_tier.hpp"
#include "kt/moe/kernels.hpp"
#ifndef KT_AMX_EMULATE
#include "kt/runtime/cpu_features.hpp"
#endif

namespace kt::isa_amx {

using moe::KernelTable;
using moe::PackFormat;


constexpr int kTileBytes = 1024;
constexpr int kMBlockTiles = 16;  // 256 rows per m-block (layer.cpp calls with at most that)
constexpr int kPerm[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// VNNI row p of an NT activation tile holds the pair at stored positions 2p, 2p+1, i.e. the
// activation dword (column pair) 2 * kPerm[p / 2] + p % 2.
constexpr int dword_of_pair(int p) { return 2 * kPerm[p / 2] + p % 2; }

inline int kc_steps() { return std::clamp(tuning().kc_steps, 1, kMaxKcSteps); }
inline int small_m() { return std::max(1, tuning().small_m); }

inline std::size_t tile_offset(int tile_row, int tile_col, int tile_cols) {
  return (static_cast<std::size_t>(tile_row) * static_cast<std::size_t>(tile_cols) + static_cast<std::size_t>(tile_col)) *
         kTileBytes;
}

// ---- tile configuration and permission ---------------------------------------------------------------

constexpr TileConfig make_config() {
  TileConfig cfg;
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}
alignas(64) inline constexpr TileConfig kConfig = make_config();

inline void check_permission_once() {
#ifndef KT_AMX_EMULATE
  thread_local bool checked = false;
  if (checked) return;
  if (!runtime::cpu_features().amx_permitted) {
    char message[256];
    std::snprintf(message, sizeof message, "amx tier: AMX tile data is not permitted for this process (%s)",
                  runtime::cpu_features().amx_permission.c_str());
    throw std::runtime_error(message);
  }
  checked = true;
#endif
}

// Tiles configured for the lifetime of one GEMM call.
struct TileSession {
  TileSession() {
    check_permission_once();
    tile_config_load(kConfig);
  }
  ~TileSession() { tile_release(); }
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;
};

// Grow-only per-thread buffer for the row-pointer entries (gemm_nt / gemm_nn pack their rows here).
struct ThreadScratch {
  void* data = nullptr;
  std::size_t bytes = 0;
  ~ThreadScratch() { std::free(data); }
  void* ensure(std::size_t need) {
    if (need > bytes) {
      std::free(data);
      data = nullptr;
      bytes = 0;
      const std::size_t rounded = (need + 63) / 64 * 64;
      data = std::aligned_alloc(64, rounded);
      if (!data) throw std::bad_alloc();
      bytes = rounded;
    }
    return data;
  }
};

// ---- vector helpers ------------------------------------------------------------------------------------

// r[i] = row i of a 16 x 16 dword matrix  ->  r[j] = column j.
inline void transpose16(V* r) {
  V t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = v_unpacklo32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = v_unpackhi32(r[2 * i], r[2 * i + 1]);
  }
  V u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = v_unpacklo64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = v_unpackhi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = v_unpacklo64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = v_unpackhi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // u[4g + c], 128-bit lane L, holds rows 4g..4g+3 of column 4L + c.
  for (int c = 0; c < 4; ++c) {
    const V v0 = v_shuffle128<0x88>(u[c], u[4 + c]), v1 = v_shuffle128<0xdd>(u[c], u[4 + c]);
    const V v2 = v_shuffle128<0x88>(u[8 + c], u[12 + c]), v3 = v_shuffle128<0xdd>(u[8 + c], u[12 + c]);
    r[c] = v_shuffle128<0x88>(v0, v2);
    r[8 + c] = v_shuffle128<0xdd>(v0, v2);
    r[4 + c] = v_shuffle128<0x88>(v1, v3);
    r[12 + c] = v_shuffle128<0xdd>(v1, v3);
  }
}

// Lane j of the result = sum of the 16 fp32 lanes of acc[j], by a fixed pairwise tree. Clobbers acc.
inline V sum_lanes16(V* acc) {
  transpose16(acc);
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] = v_add_f32(acc[l], acc[l + width]);
  return acc[0];
}

inline V weight_qword_order() {
  alignas(64) std::uint64_t idx[8];
  for (int s = 0; s < 8; ++s) idx[s] = static_cast<std::uint64_t>(kPerm[s]);
  return v_load(idx);
}

// ---- tile streaming shared by the NT and NN paths -------------------------------------------------------

// Into L1, or into L2 only (more misses in flight per core: L2 tracks more of them than L1's fill buffers).
inline void prefetch_tile(const std::uint8_t* tile, bool to_l2 = false) {
  for (int line = 0; line < kTileBytes; line += 64) to_l2 ? prefetch_l2(tile + line) : prefetch_l1(tile + line);
}

// Two tile rows (one or two m-tiles, or the two W tile rows of a column pair) walked one tile per
// reduction step; null rows are skipped. Used to say what to prefetch.
struct TileStream {
  const std::uint8_t* row0 = nullptr;
  const std::uint8_t* row1 = nullptr;
  bool to_l2 = false;
  void prefetch(int step) const {
    const std::size_t off = static_cast<std::size_t>(step) * kTileBytes;
    if (row0) prefetch_tile(row0 + off, to_l2);
    if (row1) prefetch_tile(row1 + off, to_l2);
  }
};

// What one row pair prefetches while it runs its steps [s0, s1): its own activation tiles `ahead`
// steps on, continuing into `act_next` (the activation tiles the next row pair starts with) past s1;
// and, for the first row pair of a chunk, the weight tiles of the next chunk (w_next, step by step).
struct Prefetch {
  int ahead = 0;
  TileStream act_next, w_next;
};

inline void prefetch_step(const Prefetch& pf, const TileStream& act, int s, int s0, int s1) {
  if (pf.ahead > 0) {
    const int t = s + pf.ahead;
    if (t < s1) act.prefetch(t);
    else pf.act_next.prefetch(t - s1);
  }
  pf.w_next.prefetch(s - s0);
}

// Activation tiles of the row pair starting at m-tile mt (second row only if inside the m-block),
// from reduction step s on.
inline TileStream act_pair(const std::uint8_t* act, std::size_t panel, int mt, int mb_end, int s) {
  const std::uint8_t* base = act + static_cast<std::size_t>(mt) * panel + static_cast<std::size_t>(s) * kTileBytes;
  return {base, mt + 1 < mb_end ? base + panel : nullptr};
}

// Per-thread home of the accumulators between reduction chunks: one 4 KB slot per (column pair,
// row pair) of a call. Exact fp32, so chunking never changes a result.
inline thread_local ThreadScratch spill_store;

// ---- entries defined in one file of the tier and used by another --------------------------------------

Tuning& tuning();
std::size_t packed_bytes(int rows, int cols);                                    // packing.cpp
void pack_weights(const bf16* src, int rows, int cols, void* dst);
void unpack_weights(const void* packed, int rows, int cols, bf16* dst);
std::size_t packed_a_bytes(int m, int k);
void pack_a_nt(int m, const bf16* const* a, int k, void* dst);
void pack_a_nn(int m, const bf16* const* a, int k, void* dst);
// Below small_m() rows the activation "packing" is the row pointers themselves.
inline const bf16* const* row_pointers(const void* packed) { return static_cast<const bf16* const*>(packed); }
// A reduction of several segments (NUMA shards on one node): packed activations and weights of k each.
struct Segment {
  const std::uint8_t* act;
  const std::uint8_t* w;
  int k;
};
// add: c += the product (one fp32 add per element after the product is complete, so the result is
// bitwise c + what add = false writes) instead of c = the product.
void nt_amx(int m, const Segment* segs, int count, int n0, int n1, float* c, std::int64_t ldc,
            bool add = false);                                                   // gemm_nt.cpp
inline void nt_amx(int m, const std::uint8_t* act, const std::uint8_t* w, int k, int n0, int n1, float* c,
                   std::int64_t ldc, bool add = false) {
  const Segment one{act, w, k};
  nt_amx(m, &one, 1, n0, n1, c, ldc, add);
}
void nn_amx(int m, const Segment* segs, int count, int cols, int j0, int j1, float* c, std::int64_t ldc,
            bool add = false);                                                   // gemm_nn.cpp
inline void nn_amx(int m, const std::uint8_t* act, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
                   std::int64_t ldc, bool add = false) {
  const Segment one{act, w, k};
  nn_amx(m, &one, 1, cols, j0, j1, c, ldc, add);
}
void install_amx_int8(KernelTable& t);                                          // amx_int8.cpp
void nt_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int n0, int n1, float* c,
              std::int64_t ldc, bool add = false);                               // small_m.cpp
void nn_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
              std::int64_t ldc, bool add = false);

}  // namespace kt::isa_amx
