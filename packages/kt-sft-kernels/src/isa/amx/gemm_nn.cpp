// The amx tier's NN product on tiles: C = A W (backward) from the same packed weights.
#include "amx_internal.hpp"

#include <vector>

namespace kt::isa_amx {

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
// between_steps(s) runs after step s's products are issued: the first row pair of an item builds
// the next item's B tiles there, so the vector unpacking overlaps the tile products in flight.
template <int MT, class Between>
inline void nn_steps(const std::uint8_t* bbuf, const std::uint8_t* a0, const std::uint8_t* a1, int steps,
                     const Prefetch* pf, Between&& between_steps) {
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
    between_steps(s);
  }
}

// C tile (16 rows x 16 columns, natural layout) -> c (add: added to it).
template <int T>
inline void store_nn_tile(float* c, std::int64_t ldc, int rows, bool add) {
  if (rows == 16 && !add) {
    tile_store<T>(c, ldc * static_cast<std::int64_t>(sizeof(float)));
    return;
  }
  alignas(64) float buf[256];
  tile_store<T>(buf, 64);
  if (add)
    for (int i = 0; i < rows; ++i) v_store(c + i * ldc, v_add_f32(v_load(c + i * ldc), v_load(buf + 16 * i)));
  else
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
inline void nn_output(float* c, std::int64_t ldc, int rows0, int rows1, bool add) {
  store_nn_tile<0>(c, ldc, rows0, add);
  store_nn_tile<1>(c + 16, ldc, rows0, add);
  if constexpr (MT == 2) {
    store_nn_tile<2>(c + 16 * ldc, ldc, rows1, add);
    store_nn_tile<3>(c + 16 * ldc + 16, ldc, rows1, add);
  }
}

// Items are (chunk, column tile), chunk outermost; an item's B tiles (built from the packed weights)
// serve every row pair of the m-block. They are built one item ahead, double-buffered, during the
// first row pair's products of the item before (software pipelining: with few rows per expert the
// building costs about as much as the products, and done up front it was not overlapped with them).
// Segments as in nt_amx: a chunk lies in one segment, the accumulators carry over between segments.
void nn_amx(int m, const Segment* segs, int count, int cols, int j0, int j1, float* c, std::int64_t ldc, bool add) {
  const TileSession session;
  const int tile_cols = cols / 32, m_tiles = (m + 15) / 16, col_tiles = (j1 - j0) / 32;
  const bool prefetch = tuning().prefetch;
  const int ahead = prefetch ? std::max(0, tuning().act_prefetch_steps) : 0;
  const int w_ahead = std::max(1, tuning().weight_prefetch_items);
  const bool w_to_l2 = tuning().weight_prefetch_l2, w_burst = tuning().weight_prefetch_burst;
  alignas(64) std::uint8_t bbufs[2][kMaxKcSteps * 2 * kTileBytes];
  // One segment's m-tile of activations: k / 32 steps of 1 KB.
  const auto panel = [&](int s) { return static_cast<std::size_t>(segs[s].k / 32) * kTileBytes; };
  struct Chunk {
    int seg, q0, q1;  // steps [q0, q1) of segs[seg]
  };
  thread_local std::vector<Chunk> chunk_list;  // per m-block; grows once per thread
  for (int mb = 0; mb < m_tiles; mb += kMBlockTiles) {
    const int mb_end = std::min(m_tiles, mb + kMBlockTiles);
    const int row_pairs = (mb_end - mb + 1) / 2;
    // One row pair: a larger chunk (fewer accumulator spills), at most what the B-tile buffer holds.
    const int kc = row_pairs > 1 ? kc_steps() : std::clamp(tuning().nn_single_pair_kc_steps, 1, kMaxKcSteps);
    chunk_list.clear();
    for (int s = 0; s < count; ++s)
      for (int q = 0; q < segs[s].k / 32; q += kc) chunk_list.push_back({s, q, std::min(segs[s].k / 32, q + kc)});
    const int chunks = static_cast<int>(chunk_list.size());
    auto* spill = static_cast<std::uint8_t*>(
        chunks > 1 ? spill_store.ensure(static_cast<std::size_t>(col_tiles * row_pairs) * 4 * kTileBytes) : nullptr);
    const int items = chunks * col_tiles;  // (chunk, column tile), chunk outermost
    const auto chunk_of = [&](int it) -> const Chunk& { return chunk_list[static_cast<std::size_t>(it / col_tiles)]; };
    const auto steps_of = [&](int it) { return chunk_of(it).q1 - chunk_of(it).q0; };
    const auto prefetch_item_step = [&](int it, int s, bool to_l2) {  // item it's weights of its step s
      const Chunk& ch = chunk_of(it);
      const int q = ch.q0 + s, ct = j0 / 32 + it % col_tiles;
      prefetch_tile(segs[ch.seg].w + tile_offset(2 * q, ct, tile_cols), to_l2);
      prefetch_tile(segs[ch.seg].w + tile_offset(2 * q + 1, ct, tile_cols), to_l2);
    };
    if (prefetch && tuning().weight_prefetch_first && mb == 0)  // the items no earlier item prefetches
      for (int it = 0; it < std::min(w_ahead, items); ++it)
        for (int s = 0; s < steps_of(it); ++s) prefetch_item_step(it, s, w_to_l2);
    // Step s of item `it` into its buffer; the weights of item it + w_ahead step s are prefetched
    // (or, with weight_prefetch_burst, all of them at step 0).
    const auto build_step = [&](int it, int s) {
      std::uint8_t* b = bbufs[it & 1] + static_cast<std::size_t>(s) * 2 * kTileBytes;
      const Chunk& ch = chunk_of(it);
      build_nn_tiles(segs[ch.seg].w, tile_cols, ch.q0 + s, j0 / 32 + it % col_tiles, b, b + kTileBytes);
      const int target = it + w_ahead;
      if (!prefetch || target >= items) return;
      if (!w_burst && s < steps_of(target)) prefetch_item_step(target, s, w_to_l2);
      if (w_burst && s == 0)
        for (int t = 0; t < steps_of(target); ++t) prefetch_item_step(target, t, w_to_l2);
    };
    for (int s = 0; s < steps_of(0); ++s) build_step(0, s);
    for (int i = 0; i < items; ++i) {
      const int ci = i % col_tiles, chunk = i / col_tiles;
      const Chunk& ch = chunk_of(i);
      const Segment& seg = segs[ch.seg];
      const std::size_t seg_panel = panel(ch.seg);
      const bool first = chunk == 0, last = chunk + 1 == chunks;
      const int j = j0 + 32 * ci;
      const std::uint8_t* bbuf = bbufs[i & 1];
      const int next_steps = i + 1 < items ? steps_of(i + 1) : 0;
      const auto build_next = [&](int s) {
        if (s < next_steps) build_step(i + 1, s);
      };
      const auto nothing = [](int) {};
      for (int rp = 0; rp < row_pairs; ++rp) {
        const int mt = mb + 2 * rp;
        Prefetch pf;  // weights were prefetched while the B tiles were built
        // As in nt_amx: the chunk's first column tile brings its activation tiles in, the very last
        // row pair of the chunk starts on the next chunk's.
        const bool chunk_end = ci + 1 == col_tiles && rp + 1 == row_pairs && !last;
        if (ci == 0 || chunk_end) pf.ahead = ahead;
        if (ci == 0 && rp + 1 < row_pairs) pf.act_next = act_pair(seg.act, seg_panel, mt + 2, mb_end, ch.q0);
        if (chunk_end) {
          const Chunk& next = chunk_list[static_cast<std::size_t>(chunk + 1)];
          pf.act_next = act_pair(segs[next.seg].act, panel(next.seg), mb, mb_end, next.q0);
        }
        std::uint8_t* sp = spill ? spill + static_cast<std::size_t>(ci * row_pairs + rp) * 4 * kTileBytes : nullptr;
        const std::uint8_t* a0 =
            seg.act + static_cast<std::size_t>(mt) * seg_panel + static_cast<std::size_t>(ch.q0) * kTileBytes;
        float* out = c + static_cast<std::int64_t>(16 * mt) * ldc + (j - j0);
        const int rows0 = std::min(16, m - 16 * mt), rows1 = std::min(16, m - 16 * mt - 16);
        const Prefetch* p = pf.ahead ? &pf : nullptr;
        if (mt + 1 < mb_end) {
          nn_load_accumulators<2>(sp, first);
          if (rp == 0) nn_steps<2>(bbuf, a0, a0 + seg_panel, ch.q1 - ch.q0, p, build_next);
          else nn_steps<2>(bbuf, a0, a0 + seg_panel, ch.q1 - ch.q0, p, nothing);
          if (last) nn_output<2>(out, ldc, rows0, rows1, add);
          else nn_spill_accumulators<2>(sp);
        } else {
          nn_load_accumulators<1>(sp, first);
          if (rp == 0) nn_steps<1>(bbuf, a0, nullptr, ch.q1 - ch.q0, p, build_next);
          else nn_steps<1>(bbuf, a0, nullptr, ch.q1 - ch.q0, p, nothing);
          if (last) nn_output<1>(out, ldc, rows0, 0, add);
          else nn_spill_accumulators<1>(sp);
        }
      }
      for (int s = ch.q1 - ch.q0; s < next_steps; ++s) build_step(i + 1, s);  // a next item with more steps
    }
  }
}

}  // namespace kt::isa_amx
