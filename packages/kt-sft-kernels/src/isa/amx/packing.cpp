// The amx tier's weight packing (tiles, amx_internal.hpp explains the layout) and activation packing.
#include "amx_internal.hpp"

namespace kt::isa_amx {

// ---- weight packing --------------------------------------------------------------------------------------

static void check_weight_dims(int rows, int cols) {
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

static void store_row_pointers(int m, const bf16* const* a, void* dst) { std::memcpy(dst, a, sizeof(const bf16*) * m); }

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

}  // namespace kt::isa_amx
