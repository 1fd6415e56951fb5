// The amx tier: base-weight GEMMs on AMX-BF16 tiles (TDPBF16PS), AVX-512 BF16 dot products for
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

#include "../common/generic_kernels.inl"
#ifndef KT_AMX_EMULATE  // the emulated test build keeps the generic SwiGLU (it tests the GEMMs)
#include "../common/vec_avx512.inl"
#include "../common/simd_act.inl"
#include "../common/simd_lora_avx512.inl"
#endif

Tuning& tuning() {
  static Tuning knobs;
  return knobs;
}

namespace {

constexpr int kTileBytes = 1024;
constexpr int kMBlockTiles = 16;  // 256 rows per m-block (layer.cpp calls with at most that)
constexpr int kMaxKcSteps = 32;  // bounds the stack buffers below
constexpr int kPerm[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// VNNI row p of an NT activation tile holds the pair at stored positions 2p, 2p+1, i.e. the
// activation dword (column pair) 2 * kPerm[p / 2] + p % 2.
constexpr int dword_of_pair(int p) { return 2 * kPerm[p / 2] + p % 2; }

int kc_steps() { return std::clamp(tuning().kc_steps, 1, kMaxKcSteps); }
int small_m() { return std::max(1, tuning().small_m); }

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
alignas(64) constexpr TileConfig kConfig = make_config();

void check_permission_once() {
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

// ---- weight packing --------------------------------------------------------------------------------------

void check_weight_dims(int rows, int cols) {
  if (rows <= 0 || cols <= 0 || rows % 32 || cols % 32) {
    // snprintf, not std::to_string: inline library templates instantiated here would be compiled with
    // this tier's -m flags and could be picked by the linker for every other caller.
    char message[160];
    std::snprintf(message, sizeof message,
                  "amx tier: packed weights need rows and cols that are positive multiples of 32, got %d x %d",
                  rows, cols);
    throw std::invalid_argument(message);
  }
}

std::size_t packed_bytes(int rows, int cols) {
  check_weight_dims(rows, cols);
  return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) * sizeof(bf16);
}

void pack_weights(const bf16* src, int rows, int cols, void* dst) {
  check_weight_dims(rows, cols);
  const int tile_cols = cols / 32;
  auto* out = static_cast<std::uint8_t*>(dst);
  for (int rt = 0; rt < rows / 16; ++rt)
    for (int ct = 0; ct < tile_cols; ++ct) {
      std::uint8_t* tile = out + tile_offset(rt, ct, tile_cols);
      for (int r = 0; r < 16; ++r) {
        const bf16* row = src + static_cast<std::size_t>(16 * rt + r) * static_cast<std::size_t>(cols) + 32 * ct;
        for (int s = 0; s < 8; ++s) std::memcpy(tile + 64 * r + 8 * s, row + 4 * kPerm[s], 8);
      }
    }
}

void unpack_weights(const void* packed, int rows, int cols, bf16* dst) {
  check_weight_dims(rows, cols);
  const int tile_cols = cols / 32;
  const auto* in = static_cast<const std::uint8_t*>(packed);
  for (int rt = 0; rt < rows / 16; ++rt)
    for (int ct = 0; ct < tile_cols; ++ct) {
      const std::uint8_t* tile = in + tile_offset(rt, ct, tile_cols);
      for (int r = 0; r < 16; ++r) {
        bf16* row = dst + static_cast<std::size_t>(16 * rt + r) * static_cast<std::size_t>(cols) + 32 * ct;
        for (int s = 0; s < 8; ++s) std::memcpy(row + 4 * kPerm[s], tile + 64 * r + 8 * s, 8);
      }
    }
}

// ---- activation packing ----------------------------------------------------------------------------------

std::size_t packed_a_bytes(int m, int k) {
  if (m <= 0) return 0;
  if (m < small_m()) return (static_cast<std::size_t>(m) * sizeof(const bf16*) + 63) / 64 * 64;
  return static_cast<std::size_t>((m + 15) / 16 * 16) * static_cast<std::size_t>(k) * sizeof(bf16);
}

void store_row_pointers(int m, const bf16* const* a, void* dst) { std::memcpy(dst, a, sizeof(const bf16*) * m); }
const bf16* const* row_pointers(const void* packed) { return static_cast<const bf16* const*>(packed); }

void pack_a_nt(int m, const bf16* const* a, int k, void* dst) {
  if (m <= 0) return;
  if (m < small_m()) return store_row_pointers(m, a, dst);
  const int k_steps = k / 32;
  auto* out = static_cast<std::uint8_t*>(dst);
  for (int mt = 0; mt < (m + 15) / 16; ++mt)
    for (int kb = 0; kb < k_steps; ++kb) {
      V rows[16];
      for (int i = 0; i < 16; ++i) rows[i] = 16 * mt + i < m ? v_load(a[16 * mt + i] + 32 * kb) : v_zero();
      transpose16(rows);  // rows[d] = activation dword d of the 16 tokens
      std::uint8_t* tile = out + tile_offset(mt, kb, k_steps);
      for (int p = 0; p < 16; ++p) v_store(tile + 64 * p, rows[dword_of_pair(p)]);
    }
}

void pack_a_nn(int m, const bf16* const* a, int k, void* dst) {
  if (m <= 0) return;
  if (m < small_m()) return store_row_pointers(m, a, dst);
  const int k_steps = k / 32;
  auto* out = static_cast<std::uint8_t*>(dst);
  for (int mt = 0; mt < (m + 15) / 16; ++mt)
    for (int kb = 0; kb < k_steps; ++kb) {
      std::uint8_t* tile = out + tile_offset(mt, kb, k_steps);
      for (int i = 0; i < 16; ++i) v_store(tile + 64 * i, 16 * mt + i < m ? v_load(a[16 * mt + i] + 32 * kb) : v_zero());
    }
}

// ---- AMX path: NT ------------------------------------------------------------------------------------

// Accumulator tiles 0..3 <-> spill buffer (4 KB, tile-major).
template <int MT>
inline void load_accumulators(const std::uint8_t* spill, bool zero) {
  if (zero) {
    tile_zero<0>();
    tile_zero<2>();
    if constexpr (MT == 2) {
      tile_zero<1>();
      tile_zero<3>();
    }
  } else {
    tile_load<0>(spill, 64);
    tile_load<2>(spill + 2 * kTileBytes, 64);
    if constexpr (MT == 2) {
      tile_load<1>(spill + kTileBytes, 64);
      tile_load<3>(spill + 3 * kTileBytes, 64);
    }
  }
}

template <int MT>
inline void spill_accumulators(std::uint8_t* spill) {
  tile_store<0>(spill, 64);
  tile_store<2>(spill + 2 * kTileBytes, 64);
  if constexpr (MT == 2) {
    tile_store<1>(spill + kTileBytes, 64);
    tile_store<3>(spill + 3 * kTileBytes, 64);
  }
}

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

// C^T tile (16 columns n x 16 tokens, as stored by TILESTORED) -> rows of c.
inline void transpose_to_rows(const float* tile, float* c, std::int64_t ldc, int rows) {
  V r[16];
  for (int i = 0; i < 16; ++i) r[i] = v_load(tile + 16 * i);
  transpose16(r);
  for (int i = 0; i < rows; ++i) v_store(c + i * ldc, r[i]);
}

// One row pair (MT = 1 or 2 m-tiles) x one column pair over reduction steps [kb0, kb1). Loads are
// interleaved with the products so that a tile register is reloaded right after its last reader
// issues (tile registers are not renamed), overlapping the load with the remaining products.
template <int MT>
inline void nt_steps(const std::uint8_t* w0, const std::uint8_t* w1, const std::uint8_t* a0, const std::uint8_t* a1,
                     int kb0, int kb1, const Prefetch* pf) {
  const TileStream act{a0, MT == 2 ? a1 : nullptr};
  for (int kb = kb0; kb < kb1; ++kb) {
    const std::size_t off = static_cast<std::size_t>(kb) * kTileBytes;
    if (pf) prefetch_step(*pf, act, kb, kb0, kb1);
    tile_load<4>(w0 + off, 64);
    tile_load<6>(a0 + off, 64);
    tile_dpbf16ps<0, 4, 6>();
    if constexpr (MT == 2) {
      tile_load<7>(a1 + off, 64);
      tile_dpbf16ps<1, 4, 7>();
    }
    tile_load<5>(w1 + off, 64);
    tile_dpbf16ps<2, 5, 6>();
    if constexpr (MT == 2) tile_dpbf16ps<3, 5, 7>();
  }
}

// All accumulators are stored before the first transpose reads them back: vector loads cannot take
// their data from tile stores still in flight, so the wait is paid once, not per tile.
template <int MT>
inline void nt_output(float* c, std::int64_t ldc, int rows0, int rows1) {
  alignas(64) float buf[4][256];
  spill_accumulators<MT>(reinterpret_cast<std::uint8_t*>(buf));
  transpose_to_rows(buf[0], c, ldc, rows0);
  transpose_to_rows(buf[2], c + 16, ldc, rows0);
  if constexpr (MT == 2) {
    transpose_to_rows(buf[1], c + 16 * ldc, ldc, rows1);
    transpose_to_rows(buf[3], c + 16 * ldc + 16, ldc, rows1);
  }
}

// Activation tiles of the row pair starting at m-tile mt (second row only if inside the m-block),
// from reduction step s on.
inline TileStream act_pair(const std::uint8_t* act, std::size_t panel, int mt, int mb_end, int s) {
  const std::uint8_t* base = act + static_cast<std::size_t>(mt) * panel + static_cast<std::size_t>(s) * kTileBytes;
  return {base, mt + 1 < mb_end ? base + panel : nullptr};
}

// Per-thread home of the accumulators between reduction chunks: one 4 KB slot per (column pair,
// row pair) of a call. Exact fp32, so chunking never changes a result.
thread_local ThreadScratch spill_store;

// The loop order (file header, "Blocking"): with the column pair outermost instead, every column
// pair re-streamed the whole activation panel, which for long reductions (DeepSeek-V3: 128 rows x
// 7168 = 1.8 MB) no longer fits L2. A block of one row pair has nothing to share: one chunk.
void nt_amx(int m, const std::uint8_t* act, const std::uint8_t* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  const TileSession session;
  const int k_steps = k / 32, m_tiles = (m + 15) / 16, col_pairs = (n1 - n0) / 32;
  const bool prefetch = tuning().prefetch;
  const int ahead = prefetch ? std::max(0, tuning().act_prefetch_steps) : 0;
  const int w_ahead = std::max(1, tuning().weight_prefetch_items);
  const bool w_to_l2 = tuning().weight_prefetch_l2;
  const std::size_t panel = static_cast<std::size_t>(k_steps) * kTileBytes;  // one 16-row tile row
  for (int mb = 0; mb < m_tiles; mb += kMBlockTiles) {
    const int mb_end = std::min(m_tiles, mb + kMBlockTiles);
    const int row_pairs = (mb_end - mb + 1) / 2;
    const int kc = row_pairs > 1 ? kc_steps() : k_steps;
    const int chunks = (k_steps + kc - 1) / kc;
    // Column pairs outermost while the block's activation panel stays in L2 (each column pair re-reads
    // it from there, and a column pair's accumulators stay in L1); chunks outermost beyond that.
    const bool chunk_outer =
        static_cast<std::size_t>(mb_end - mb) * panel > static_cast<std::size_t>(tuning().nt_panel_in_l2_bytes);
    auto* spill = static_cast<std::uint8_t*>(
        chunks > 1 ? spill_store.ensure(static_cast<std::size_t>(col_pairs * row_pairs) * 4 * kTileBytes) : nullptr);
    struct Item {
      int cp, chunk;
    };
    const auto item = [&](int i) {  // i-th (column pair, chunk) in execution order
      return chunk_outer ? Item{i % col_pairs, i / col_pairs} : Item{i / chunks, i % chunks};
    };
    for (int i = 0; i < col_pairs * chunks; ++i) {
      const auto [cp, chunk] = item(i);
      const int kb0 = chunk * kc, kb1 = std::min(k_steps, kb0 + kc);
      const bool first = kb0 == 0, last = kb1 == k_steps;
      const int n = n0 + 32 * cp;
      // The two W tile rows of this column pair are contiguous (2 * panel bytes); the next pair follows.
      const std::uint8_t* w0 = w + static_cast<std::size_t>(n / 16) * panel;
      const std::uint8_t* w1 = w0 + panel;
      const bool more = i + 1 < col_pairs * chunks;
      const auto [next_cp, next_chunk] = item(more ? i + 1 : i);
      for (int rp = 0; rp < row_pairs; ++rp) {
        const int mt = mb + 2 * rp;
        Prefetch pf;
        // Activation tiles come from L3 (packed by other threads) on a column pair's first visit of
        // a chunk: prefetched a few steps ahead then, into the next row pair or the next item's.
        if (cp == 0 || (rp + 1 == row_pairs && more && next_cp == 0)) pf.ahead = ahead;
        if (rp + 1 < row_pairs) pf.act_next = act_pair(act, panel, mt + 2, mb_end, kb0);
        else if (more) pf.act_next = act_pair(act, panel, mb, mb_end, next_chunk * kc);
        if (prefetch && rp == 0 && i + w_ahead < col_pairs * chunks) {  // a later item's weights, step by step
          const Item target = item(i + w_ahead);
          const std::uint8_t* next_w =
              w + static_cast<std::size_t>((n0 + 32 * target.cp) / 16) * panel + target.chunk * kc * std::size_t{kTileBytes};
          pf.w_next = {next_w, next_w + panel, w_to_l2};
        }
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(cp * row_pairs + rp) * 4 * kTileBytes : nullptr;
        const std::uint8_t* a0 = act + static_cast<std::size_t>(mt) * panel;
        float* out = c + static_cast<std::int64_t>(16 * mt) * ldc + (n - n0);
        const int rows0 = std::min(16, m - 16 * mt), rows1 = std::min(16, m - 16 * mt - 16);
        const Prefetch* p = pf.ahead || pf.w_next.row0 ? &pf : nullptr;
        if (mt + 1 < mb_end) {
          load_accumulators<2>(sp, first);
          nt_steps<2>(w0, w1, a0, a0 + panel, kb0, kb1, p);
          if (last) nt_output<2>(out, ldc, rows0, rows1);
          else spill_accumulators<2>(sp);
        } else {
          load_accumulators<1>(sp, first);
          nt_steps<1>(w0, w1, a0, nullptr, kb0, kb1, p);
          if (last) nt_output<1>(out, ldc, rows0, 0);
          else spill_accumulators<1>(sp);
        }
      }
    }
  }
}

// ---- AMX path: NN ------------------------------------------------------------------------------------

// VNNI "B" tiles of W rows [32 qs, 32 qs + 32) x columns [32 ct, 32 ct + 32): lo = columns 0..15,
// hi = 16..31, each 16 rows (row pairs) x 16 dwords.
inline void build_nn_tiles(const std::uint8_t* w, int tile_cols, int qs, int ct, std::uint8_t* lo, std::uint8_t* hi) {
  for (int half = 0; half < 2; ++half) {
    const std::uint8_t* tile = w + tile_offset(2 * qs + half, ct, tile_cols);
    for (int p = 0; p < 8; ++p) {
      const V x = v_load(tile + 128 * p), y = v_load(tile + 128 * p + 64);
      v_store(lo + 64 * (8 * half + p), v_unpacklo16(x, y));
      v_store(hi + 64 * (8 * half + p), v_unpackhi16(x, y));
    }
  }
}

// One row pair over `steps` reduction steps of the B tiles in bbuf; loads interleaved as in nt_steps.
template <int MT>
inline void nn_steps(const std::uint8_t* bbuf, const std::uint8_t* a0, const std::uint8_t* a1, int steps,
                     const Prefetch* pf) {
  const TileStream act{a0, MT == 2 ? a1 : nullptr};
  for (int s = 0; s < steps; ++s) {
    const std::uint8_t* b = bbuf + static_cast<std::size_t>(s) * 2 * kTileBytes;
    const std::size_t off = static_cast<std::size_t>(s) * kTileBytes;
    if (pf) prefetch_step(*pf, act, s, 0, steps);
    tile_load<6>(a0 + off, 64);
    tile_load<4>(b, 64);
    tile_dpbf16ps<0, 6, 4>();
    tile_load<5>(b + kTileBytes, 64);
    tile_dpbf16ps<1, 6, 5>();
    if constexpr (MT == 2) {
      tile_load<7>(a1 + off, 64);
      tile_dpbf16ps<2, 7, 4>();
      tile_dpbf16ps<3, 7, 5>();
    }
  }
}

// C tile (16 rows x 16 columns, natural layout) -> c.
template <int T>
inline void store_nn_tile(float* c, std::int64_t ldc, int rows) {
  if (rows == 16) {
    tile_store<T>(c, ldc * static_cast<std::int64_t>(sizeof(float)));
    return;
  }
  alignas(64) float buf[256];
  tile_store<T>(buf, 64);
  for (int i = 0; i < rows; ++i) std::memcpy(c + i * ldc, buf + 16 * i, 64);
}

// NN accumulators: tile 0 = (m0, lo), 1 = (m0, hi), 2 = (m1, lo), 3 = (m1, hi).
template <int MT>
inline void nn_load_accumulators(const std::uint8_t* spill, bool zero) {
  if (zero) {
    tile_zero<0>();
    tile_zero<1>();
    if constexpr (MT == 2) {
      tile_zero<2>();
      tile_zero<3>();
    }
  } else {
    tile_load<0>(spill, 64);
    tile_load<1>(spill + kTileBytes, 64);
    if constexpr (MT == 2) {
      tile_load<2>(spill + 2 * kTileBytes, 64);
      tile_load<3>(spill + 3 * kTileBytes, 64);
    }
  }
}

template <int MT>
inline void nn_spill_accumulators(std::uint8_t* spill) {
  tile_store<0>(spill, 64);
  tile_store<1>(spill + kTileBytes, 64);
  if constexpr (MT == 2) {
    tile_store<2>(spill + 2 * kTileBytes, 64);
    tile_store<3>(spill + 3 * kTileBytes, 64);
  }
}

template <int MT>
inline void nn_output(float* c, std::int64_t ldc, int rows0, int rows1) {
  store_nn_tile<0>(c, ldc, rows0);
  store_nn_tile<1>(c + 16, ldc, rows0);
  if constexpr (MT == 2) {
    store_nn_tile<2>(c + 16 * ldc, ldc, rows1);
    store_nn_tile<3>(c + 16 * ldc + 16, ldc, rows1);
  }
}

void nn_amx(int m, const std::uint8_t* act, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
            std::int64_t ldc) {
  const TileSession session;
  const int q_steps = k / 32, tile_cols = cols / 32, m_tiles = (m + 15) / 16, col_tiles = (j1 - j0) / 32;
  const bool prefetch = tuning().prefetch;
  const int ahead = prefetch ? std::max(0, tuning().act_prefetch_steps) : 0;
  const int w_ahead = std::max(1, tuning().weight_prefetch_items);
  const bool w_to_l2 = tuning().weight_prefetch_l2;
  alignas(64) std::uint8_t bbuf[kMaxKcSteps * 2 * kTileBytes];
  const std::size_t panel = static_cast<std::size_t>(q_steps) * kTileBytes;  // one m-tile of activations
  for (int mb = 0; mb < m_tiles; mb += kMBlockTiles) {
    const int mb_end = std::min(m_tiles, mb + kMBlockTiles);
    const int row_pairs = (mb_end - mb + 1) / 2;
    // One row pair: a larger chunk (fewer accumulator spills), at most what the B-tile buffer holds.
    const int kc = row_pairs > 1 ? kc_steps() : std::clamp(tuning().nn_single_pair_kc_steps, 1, kMaxKcSteps);
    auto* spill = static_cast<std::uint8_t*>(
        kc < q_steps ? spill_store.ensure(static_cast<std::size_t>(col_tiles * row_pairs) * 4 * kTileBytes) : nullptr);
    const int items = (q_steps + kc - 1) / kc * col_tiles;  // (chunk, column tile), chunk outermost
    for (int i = 0; i < items; ++i) {
      const int ci = i % col_tiles, qs0 = i / col_tiles * kc, qs1 = std::min(q_steps, qs0 + kc);
      const bool first = qs0 == 0, last = qs1 == q_steps;
      const int j = j0 + 32 * ci, ct = j / 32;
      // The weights of a later item (weight_prefetch_items on): step qs of this chunk prefetches
      // step qs - qs0 of that one.
      const int target = i + w_ahead;
      const int target_q0 = target / col_tiles * kc, target_ct = j0 / 32 + target % col_tiles;
      for (int qs = qs0; qs < qs1; ++qs) {
        std::uint8_t* b = bbuf + static_cast<std::size_t>(qs - qs0) * 2 * kTileBytes;
        build_nn_tiles(w, tile_cols, qs, ct, b, b + kTileBytes);
        const int next = target_q0 + (qs - qs0);
        if (prefetch && target < items && next < q_steps) {
          prefetch_tile(w + tile_offset(2 * next, target_ct, tile_cols), w_to_l2);
          prefetch_tile(w + tile_offset(2 * next + 1, target_ct, tile_cols), w_to_l2);
        }
      }
      for (int rp = 0; rp < row_pairs; ++rp) {
        const int mt = mb + 2 * rp;
        Prefetch pf;  // weights were prefetched while the B tiles were built
        // As in nt_amx: the chunk's first column tile brings its activation tiles in, the very last
        // row pair of the chunk starts on the next chunk's.
        const bool chunk_end = ci + 1 == col_tiles && rp + 1 == row_pairs && !last;
        if (ci == 0 || chunk_end) pf.ahead = ahead;
        if (ci == 0 && rp + 1 < row_pairs) pf.act_next = act_pair(act, panel, mt + 2, mb_end, qs0);
        if (chunk_end) pf.act_next = act_pair(act, panel, mb, mb_end, qs1);
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(ci * row_pairs + rp) * 4 * kTileBytes : nullptr;
        const std::uint8_t* a0 = act + static_cast<std::size_t>(mt) * panel + static_cast<std::size_t>(qs0) * kTileBytes;
        float* out = c + static_cast<std::int64_t>(16 * mt) * ldc + (j - j0);
        const int rows0 = std::min(16, m - 16 * mt), rows1 = std::min(16, m - 16 * mt - 16);
        if (mt + 1 < mb_end) {
          nn_load_accumulators<2>(sp, first);
          nn_steps<2>(bbuf, a0, a0 + panel, qs1 - qs0, pf.ahead ? &pf : nullptr);
          if (last) nn_output<2>(out, ldc, rows0, rows1);
          else nn_spill_accumulators<2>(sp);
        } else {
          nn_load_accumulators<1>(sp, first);
          nn_steps<1>(bbuf, a0, nullptr, qs1 - qs0, pf.ahead ? &pf : nullptr);
          if (last) nn_output<1>(out, ldc, rows0, 0);
          else nn_spill_accumulators<1>(sp);
        }
      }
    }
  }
}

// ---- small-m path: AVX-512 BF16 dot products straight from the rows -------------------------------------

constexpr int kDotPrefetchSteps = 8;  // weight tiles prefetched this many tiles ahead

// NT: MR rows x 8 weight rows per block; each (row, n) accumulator runs over the reduction in order,
// then sum_lanes16 reduces it by a fixed tree.
template <int MR>
void nt_small_rows(const bf16* const* a, const std::uint8_t* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  const int k_steps = k / 32;
  const std::size_t panel = static_cast<std::size_t>(k_steps) * kTileBytes;
  const V order = weight_qword_order();
  const bool prefetch = tuning().prefetch;
  constexpr int kAcc = MR * 8, kGroups = (kAcc + 15) / 16;
  for (int n = n0; n < n1; n += 8) {
    const std::uint8_t* rows = w + static_cast<std::size_t>(n / 16) * panel + static_cast<std::size_t>(n % 16) * 64;
    V acc[kGroups * 16];
    for (V& v : acc) v = v_zero();
    for (int kb = 0; kb < k_steps; ++kb) {
      V av[MR];
      for (int i = 0; i < MR; ++i) av[i] = v_permute64(v_load(a[i] + 32 * kb), order);
      const std::uint8_t* tile_rows = rows + static_cast<std::size_t>(kb) * kTileBytes;
      if (prefetch)
        for (int r = 0; r < 8; ++r) prefetch_l1(tile_rows + static_cast<std::size_t>(kDotPrefetchSteps) * kTileBytes + 64 * r);
      for (int r = 0; r < 8; ++r) {
        const V wv = v_load(tile_rows + 64 * r);
        for (int i = 0; i < MR; ++i) acc[8 * i + r] = v_dpbf16(acc[8 * i + r], av[i], wv);
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      alignas(64) float sums[16];
      v_store(sums, sum_lanes16(acc + 16 * g));
      for (int x = 16 * g; x < std::min(kAcc, 16 * g + 16); ++x) c[(x / 8) * ldc + (n - n0) + x % 8] = sums[x - 16 * g];
    }
  }
}

void nt_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int n0, int n1, float* c, std::int64_t ldc) {
  int i = 0;
  for (; i + 3 <= m; i += 3) nt_small_rows<3>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (m - i == 2) nt_small_rows<2>(a + i, w, k, n0, n1, c + i * ldc, ldc);
  if (m - i == 1) nt_small_rows<1>(a + i, w, k, n0, n1, c + i * ldc, ldc);
}

// NN: MR rows x 32 columns; rows q, q+1 of W interleaved as in build_nn_tiles, the activation pair
// (a[q], a[q+1]) broadcast; each output column sums its reduction in order.
template <int MR>
void nn_small_rows(const bf16* const* a, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
                   std::int64_t ldc) {
  const int tile_cols = cols / 32;
  const bool prefetch = tuning().prefetch;
  for (int j = j0; j < j1; j += 32) {
    const int ct = j / 32;
    V lo[MR], hi[MR];
    for (int i = 0; i < MR; ++i) lo[i] = hi[i] = v_zero();
    for (int q = 0; q < k; q += 2) {
      const std::uint8_t* row = w + tile_offset(q / 16, ct, tile_cols) + static_cast<std::size_t>(q % 16) * 64;
      if (prefetch && q % 16 == 0 && q / 16 + kDotPrefetchSteps < k / 16)
        prefetch_tile(w + tile_offset(q / 16 + kDotPrefetchSteps, ct, tile_cols));
      const V x = v_load(row), y = v_load(row + 64);
      const V wl = v_unpacklo16(x, y), wh = v_unpackhi16(x, y);
      for (int i = 0; i < MR; ++i) {
        std::uint32_t pair;
        std::memcpy(&pair, a[i] + q, sizeof pair);
        const V s = v_set1_u32(pair);
        lo[i] = v_dpbf16(lo[i], s, wl);
        hi[i] = v_dpbf16(hi[i], s, wh);
      }
    }
    for (int i = 0; i < MR; ++i) {
      v_store(c + i * ldc + (j - j0), lo[i]);
      v_store(c + i * ldc + (j - j0) + 16, hi[i]);
    }
  }
}

void nn_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
              std::int64_t ldc) {
  int i = 0;
  for (; i + 3 <= m; i += 3) nn_small_rows<3>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
  if (m - i == 2) nn_small_rows<2>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
  if (m - i == 1) nn_small_rows<1>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc);
}

// ---- table entries -----------------------------------------------------------------------------------------

void gemm_nt_packed(int m, const void* a, const void* w, int /*rows*/, int k, int n0, int n1, float* c,
                    std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  const auto* wb = static_cast<const std::uint8_t*>(w);
  if (m < small_m()) return nt_small(m, row_pointers(a), wb, k, n0, n1, c, ldc);
  nt_amx(m, static_cast<const std::uint8_t*>(a), wb, k, n0, n1, c, ldc);
}

void gemm_nn_packed(int m, const void* a, const void* w, int k, int cols, int j0, int j1, float* c,
                    std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  const auto* wb = static_cast<const std::uint8_t*>(w);
  if (m < small_m()) return nn_small(m, row_pointers(a), wb, k, cols, j0, j1, c, ldc);
  nn_amx(m, static_cast<const std::uint8_t*>(a), wb, k, cols, j0, j1, c, ldc);
}

thread_local ThreadScratch row_packing;

void gemm_nt_rows(int m, const bf16* const* a, const void* w, int rows, int k, int n0, int n1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || n1 <= n0) return;
  if (m < small_m()) return nt_small(m, a, static_cast<const std::uint8_t*>(w), k, n0, n1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nt(m, a, k, packed);
  gemm_nt_packed(m, packed, w, rows, k, n0, n1, c, ldc);
}

void gemm_nn_rows(int m, const bf16* const* a, const void* w, int k, int cols, int j0, int j1, float* c,
                  std::int64_t ldc) {
  if (m <= 0 || j1 <= j0) return;
  if (m < small_m()) return nn_small(m, a, static_cast<const std::uint8_t*>(w), k, cols, j0, j1, c, ldc);
  void* packed = row_packing.ensure(packed_a_bytes(m, k));
  pack_a_nn(m, a, k, packed);
  gemm_nn_packed(m, packed, w, k, cols, j0, j1, c, ldc);
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = generic_table(Isa::amx);
    t.format = PackFormat::amx_bf16_tiles;
    t.packed_bytes = packed_bytes;
    t.pack = pack_weights;
    t.unpack = unpack_weights;
    t.gemm_nt = gemm_nt_rows;
    t.gemm_nn = gemm_nn_rows;
    t.packed_a_bytes = packed_a_bytes;
    t.pack_a_nt = pack_a_nt;
    t.pack_a_nn = pack_a_nn;
    t.gemm_nt_packed = gemm_nt_packed;
    t.gemm_nn_packed = gemm_nn_packed;
#ifndef KT_AMX_EMULATE
    t.silu_mul = simd_silu_mul;  // the SIMD tiers' one sigmoid, as in avx512_bf16
    t.silu_mul_bwd = simd_silu_mul_bwd;
    install_simd_lora(t);  // LoRA: simd_lora_avx512.inl
#endif
    return t;
  }();
  return table;
}

}  // namespace kt::isa_amx
