// How long one AMX tile product takes on this core, by tile shape: TDPBSSD (int8) and TDPBF16PS (bf16)
// with four independent accumulators, with A configured to 16, 12, 8, 4, 1 rows (M) or B to 16, 8, 4, 1
// columns (N), alone and with four L1-resident tile loads per four products. Best of 31 runs of 100k
// groups (the shared VMs of the AMX machine are noisy; the minimum is the machine's rate). ADR 0603
// "Session 14" used it to ask whether a tail m-tile with fewer rows would run faster (≈ 20 %, no more).
//     g++ -O2 -mamx-tile -mamx-int8 -mamx-bf16 -o /tmp/amx_tile_probe benchmarks/cpp/amx_tile_probe.cpp
//     taskset -c 1 /tmp/amx_tile_probe        (or: bash ci/device.sh amx-probe)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

namespace {

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Tiles 0-3: C (m x nbytes), 4-5: A (m x 64 bytes), 6-7: B (16 x nbytes).
void configure(int m, int nbytes) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<std::uint8_t>(t < 6 ? m : 16);
    c.colsb[t] = static_cast<std::uint16_t>(t == 4 || t == 5 ? 64 : nbytes);
  }
  _tile_loadconfig(&c);
}

alignas(64) std::int8_t operands[8][1024];

// ns per tile product over `groups` groups of four products (and four tile loads when Loads).
template <bool Loads, bool Bf16>
double ns_per_product(int m, int nbytes, int groups) {
  configure(m, nbytes);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, operands[4], 64);
  _tile_loadd(5, operands[5], 64);
  _tile_loadd(6, operands[6], 64);
  _tile_loadd(7, operands[7], 64);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < groups; ++i) {  // the kernels' order: a tile is reloaded right after its last reader
    if constexpr (Loads) {
      _tile_loadd(4, operands[4], 64);
      _tile_loadd(6, operands[6], 64);
    }
    if constexpr (Bf16) _tile_dpbf16ps(0, 4, 6);
    else _tile_dpbssd(0, 4, 6);
    if constexpr (Loads) _tile_loadd(7, operands[7], 64);
    if constexpr (Bf16) _tile_dpbf16ps(1, 4, 7);
    else _tile_dpbssd(1, 4, 7);
    if constexpr (Loads) _tile_loadd(5, operands[5], 64);
    if constexpr (Bf16) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    } else {
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, operands[0], 64);  // the products' results are used
  const auto stop = std::chrono::steady_clock::now();
  _tile_release();
  return std::chrono::duration<double, std::nano>(stop - start).count() / (4.0 * groups);
}

template <bool Loads, bool Bf16>
double best(int m, int nbytes) {
  double b = 1e30;
  for (int run = 0; run < 31; ++run) {
    const double t = ns_per_product<Loads, Bf16>(m, nbytes, 100000);
    if (t < b) b = t;
  }
  return b;
}

void row(const char* what, int m, int nbytes) {
  std::printf("%-22s int8 %5.2f  int8+loads %5.2f  bf16 %5.2f  bf16+loads %5.2f\n", what, best<false, false>(m, nbytes),
              best<true, false>(m, nbytes), best<false, true>(m, nbytes), best<true, true>(m, nbytes));
}

}  // namespace

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::puts("amx_tile_probe: AMX tile data not permitted (no AMX on this CPU or kernel)");
    return 1;
  }
  std::memset(operands, 1, sizeof operands);
  ns_per_product<false, false>(16, 64, 2000000);  // warm-up
  std::puts("ns per tile product (best of 31 x 100k groups of 4 products, 4 independent accumulators)");
  char what[32];
  for (int m : {16, 12, 8, 4, 1}) {
    std::snprintf(what, sizeof what, "A rows %2d, B cols 16:", m);
    row(what, m, 64);
  }
  for (int n : {8, 4, 1}) {
    std::snprintf(what, sizeof what, "A rows 16, B cols %2d:", n);
    row(what, 16, 4 * n);
  }
  return 0;
}
