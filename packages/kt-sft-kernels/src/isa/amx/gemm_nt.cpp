// The amx tier's NT product on tiles: C = A W^T (forward), blocked as amx_internal.hpp explains.
#include "amx_internal.hpp"

#include <vector>

namespace kt::isa_amx {

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

// C^T tile (16 columns n x 16 tokens, as stored by TILESTORED) -> rows of c (add: added to them).
inline void transpose_to_rows(const float* tile, float* c, std::int64_t ldc, int rows, bool add) {
  V r[16];
  for (int i = 0; i < 16; ++i) r[i] = v_load(tile + 16 * i);
  transpose16(r);
  if (add)
    for (int i = 0; i < rows; ++i) v_store(c + i * ldc, v_add_f32(v_load(c + i * ldc), r[i]));
  else
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
inline void nt_output(float* c, std::int64_t ldc, int rows0, int rows1, bool add) {
  alignas(64) float buf[4][256];
  spill_accumulators<MT>(reinterpret_cast<std::uint8_t*>(buf));
  transpose_to_rows(buf[0], c, ldc, rows0, add);
  transpose_to_rows(buf[2], c + 16, ldc, rows0, add);
  if constexpr (MT == 2) {
    transpose_to_rows(buf[1], c + 16 * ldc, ldc, rows1, add);
    transpose_to_rows(buf[3], c + 16 * ldc + 16, ldc, rows1, add);
  }
}

// A reduction chunk of one segment: steps [kb0, kb1) of segs[seg].
struct Chunk {
  int seg, kb0, kb1;
};

// The loop order (file header, "Blocking"): with the column pair outermost instead, every column
// pair re-streamed the whole activation panel, which for long reductions (DeepSeek-V3: 128 rows x
// 7168 = 1.8 MB) no longer fits L2. A block of one row pair has nothing to share: one chunk (a
// segment).
// Segments (NUMA shards on one node): the reduction is the segments' reductions one after another,
// each with its own packed activations and weights; a chunk never spans two, and the accumulators
// carry over from one segment to the next exactly as from one chunk to the next, so the sum is one
// chain per output element, written once.
void nt_amx(int m, const Segment* segs, int count, int n0, int n1, float* c, std::int64_t ldc, bool add) {
  const TileSession session;
  const int m_tiles = (m + 15) / 16, col_pairs = (n1 - n0) / 32;
  const bool prefetch = tuning().prefetch;
  const int ahead = prefetch ? std::max(0, tuning().act_prefetch_steps) : 0;
  const int w_ahead = std::max(1, tuning().weight_prefetch_items);
  const bool w_to_l2 = tuning().weight_prefetch_l2, w_burst = tuning().weight_prefetch_burst;
  // One segment's tile rows: k / 32 reduction steps of 1 KB (a 16-row tile row of W or of the activations).
  const auto panel = [&](int s) { return static_cast<std::size_t>(segs[s].k / 32) * kTileBytes; };
  std::size_t panels = 0;
  for (int s = 0; s < count; ++s) panels += panel(s);
  thread_local std::vector<Chunk> chunk_list;  // per m-block; grows once per thread
  for (int mb = 0; mb < m_tiles; mb += kMBlockTiles) {
    const int mb_end = std::min(m_tiles, mb + kMBlockTiles);
    const int row_pairs = (mb_end - mb + 1) / 2;
    chunk_list.clear();
    for (int s = 0; s < count; ++s) {
      const int k_steps = segs[s].k / 32, kc = row_pairs > 1 ? kc_steps() : k_steps;
      for (int kb = 0; kb < k_steps; kb += kc) chunk_list.push_back({s, kb, std::min(k_steps, kb + kc)});
    }
    const int chunks = static_cast<int>(chunk_list.size());
    // Column pairs outermost while the block's activation panels stay in L2 (each column pair re-reads
    // them from there, and a column pair's accumulators stay in L1); chunks outermost beyond that.
    const bool chunk_outer =
        static_cast<std::size_t>(mb_end - mb) * panels > static_cast<std::size_t>(tuning().nt_panel_in_l2_bytes);
    auto* spill = static_cast<std::uint8_t*>(
        chunks > 1 ? spill_store.ensure(static_cast<std::size_t>(col_pairs * row_pairs) * 4 * kTileBytes) : nullptr);
    struct Item {
      int cp, chunk;
    };
    const auto item = [&](int i) {  // i-th (column pair, chunk) in execution order
      return chunk_outer ? Item{i % col_pairs, i / col_pairs} : Item{i / chunks, i % chunks};
    };
    const auto item_weights = [&](int i) {  // item i's two W tile rows from its first step
      const Item it = item(i);
      const Chunk& ch = chunk_list[static_cast<std::size_t>(it.chunk)];
      const std::uint8_t* row0 = segs[ch.seg].w + static_cast<std::size_t>((n0 + 32 * it.cp) / 16) * panel(ch.seg) +
                                 ch.kb0 * std::size_t{kTileBytes};
      return TileStream{row0, row0 + panel(ch.seg), w_to_l2};
    };
    if (prefetch && tuning().weight_prefetch_first && mb == 0)  // the items no earlier item prefetches
      for (int i = 0; i < std::min(w_ahead, col_pairs * chunks); ++i) {
        const Chunk& ch = chunk_list[static_cast<std::size_t>(item(i).chunk)];
        for (int s = 0; s < ch.kb1 - ch.kb0; ++s) item_weights(i).prefetch(s);
      }
    for (int i = 0; i < col_pairs * chunks; ++i) {
      const auto [cp, chunk] = item(i);
      const Chunk& ch = chunk_list[static_cast<std::size_t>(chunk)];
      const Segment& seg = segs[ch.seg];
      const std::size_t seg_panel = panel(ch.seg);
      const int kb0 = ch.kb0, kb1 = ch.kb1;
      const bool first = chunk == 0, last = chunk + 1 == chunks;
      const int n = n0 + 32 * cp;
      // The two W tile rows of this column pair are contiguous (2 * panel bytes); the next pair follows.
      const std::uint8_t* w0 = seg.w + static_cast<std::size_t>(n / 16) * seg_panel;
      const std::uint8_t* w1 = w0 + seg_panel;
      const bool more = i + 1 < col_pairs * chunks;
      const auto [next_cp, next_chunk] = item(more ? i + 1 : i);
      const Chunk& next_ch = chunk_list[static_cast<std::size_t>(next_chunk)];
      for (int rp = 0; rp < row_pairs; ++rp) {
        const int mt = mb + 2 * rp;
        Prefetch pf;
        // Activation tiles come from L3 (packed by other threads) on a column pair's first visit of
        // a chunk: prefetched a few steps ahead then, into the next row pair or the next item's.
        if (cp == 0 || (rp + 1 == row_pairs && more && next_cp == 0)) pf.ahead = ahead;
        if (rp + 1 < row_pairs) pf.act_next = act_pair(seg.act, seg_panel, mt + 2, mb_end, kb0);
        else if (more) pf.act_next = act_pair(segs[next_ch.seg].act, panel(next_ch.seg), mb, mb_end, next_ch.kb0);
        if (prefetch && rp == 0 && i + w_ahead < col_pairs * chunks) {  // a later item's weights, step by step
          pf.w_next = item_weights(i + w_ahead);
          if (w_burst) {  // or all at once
            for (int s = kb0; s < kb1; ++s) pf.w_next.prefetch(s - kb0);
            pf.w_next = {};
          }
        }
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(cp * row_pairs + rp) * 4 * kTileBytes : nullptr;
        const std::uint8_t* a0 = seg.act + static_cast<std::size_t>(mt) * seg_panel;
        float* out = c + static_cast<std::int64_t>(16 * mt) * ldc + (n - n0);
        const int rows0 = std::min(16, m - 16 * mt), rows1 = std::min(16, m - 16 * mt - 16);
        const Prefetch* p = pf.ahead || pf.w_next.row0 ? &pf : nullptr;
        if (mt + 1 < mb_end) {
          load_accumulators<2>(sp, first);
          nt_steps<2>(w0, w1, a0, a0 + seg_panel, kb0, kb1, p);
          if (last) nt_output<2>(out, ldc, rows0, rows1, add);
          else spill_accumulators<2>(sp);
        } else {
          load_accumulators<1>(sp, first);
          nt_steps<1>(w0, w1, a0, nullptr, kb0, kb1, p);
          if (last) nt_output<1>(out, ldc, rows0, 0, add);
          else spill_accumulators<1>(sp);
        }
      }
    }
  }
}

}  // namespace kt::isa_amx
