// The amx tier's path for few rows: AVX-512 BF16 dot products straight from the rows and the tiles.
#include "amx_internal.hpp"

namespace kt::isa_amx {

// ---- small-m path: AVX-512 BF16 dot products straight from the rows -------------------------------------

constexpr int kDotPrefetchSteps = 8;  // weight tiles prefetched this many tiles ahead

// NT: MR rows x 8 weight rows per block; each (row, n) accumulator runs over the reduction in order,
// then sum_lanes16 reduces it by a fixed tree.
template <int MR>
void nt_small_rows(const bf16* const* a, const std::uint8_t* w, int k, int n0, int n1, float* c, std::int64_t ldc,
                   bool add) {
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
      for (int x = 16 * g; x < std::min(kAcc, 16 * g + 16); ++x) {
        float& out = c[(x / 8) * ldc + (n - n0) + x % 8];
        out = add ? out + sums[x - 16 * g] : sums[x - 16 * g];
      }
    }
  }
}

void nt_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int n0, int n1, float* c, std::int64_t ldc,
              bool add) {
  int i = 0;
  for (; i + 3 <= m; i += 3) nt_small_rows<3>(a + i, w, k, n0, n1, c + i * ldc, ldc, add);
  if (m - i == 2) nt_small_rows<2>(a + i, w, k, n0, n1, c + i * ldc, ldc, add);
  if (m - i == 1) nt_small_rows<1>(a + i, w, k, n0, n1, c + i * ldc, ldc, add);
}

// NN: MR rows x 32 columns; rows q, q+1 of W interleaved as in build_nn_tiles, the activation pair
// (a[q], a[q+1]) broadcast; each output column sums its reduction in order.
template <int MR>
void nn_small_rows(const bf16* const* a, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
                   std::int64_t ldc, bool add) {
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
      float* out = c + i * ldc + (j - j0);
      v_store(out, add ? v_add_f32(v_load(out), lo[i]) : lo[i]);
      v_store(out + 16, add ? v_add_f32(v_load(out + 16), hi[i]) : hi[i]);
    }
  }
}

void nn_small(int m, const bf16* const* a, const std::uint8_t* w, int k, int cols, int j0, int j1, float* c,
              std::int64_t ldc, bool add) {
  int i = 0;
  for (; i + 3 <= m; i += 3) nn_small_rows<3>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc, add);
  if (m - i == 2) nn_small_rows<2>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc, add);
  if (m - i == 1) nn_small_rows<1>(a + i, w, k, cols, j0, j1, c + i * ldc, ldc, add);
}

}  // namespace kt::isa_amx
