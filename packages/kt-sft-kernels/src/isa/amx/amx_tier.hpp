// Internal view of the amx tier for its C++ tests and self-test (tests/cpp/amx_*): the table, and
// the few knobs the self-test sweeps. Not part of the wheel's interface.
#pragma once
#include "kt/moe/kernels.hpp"

namespace kt::isa_amx {

const moe::KernelTable& kernel_table();

struct Tuning {
  int kc_steps = 8;       // reduction steps (32 values each) per cache block of the weight tiles
  // Calls with m < small_m take the AVX-512 dot-product path. 1 (never): on the AMX machine the
  // tile path was faster at every m >= 1 (`ci/device.sh amx-cpp`'s sweep measures it again).
  int small_m = 1;
  bool prefetch = true;   // software prefetch (weights one cache block ahead, activations below)
  int act_prefetch_steps = 4;  // activation tiles prefetched this many reduction steps ahead (0: off)
  // NT: an m-block whose activation panel is at most this big runs column pairs outermost, a bigger
  // one reduction chunks outermost (amx_internal.hpp, "Blocking").
  int nt_panel_in_l2_bytes = 1 << 20;
  // Weight tiles are prefetched this many (chunk, column) items ahead, into L1 or into L2 only.
  int weight_prefetch_items = 1;
  bool weight_prefetch_l2 = false;
  int nn_single_pair_kc_steps = 32;  // NN chunk when the m-block is one row pair (m <= 32)
};
// Process-wide; change it only while no kernel runs and before packing activations (small_m
// decides the packed layout). The wheel never changes it.
Tuning& tuning();

}  // namespace kt::isa_amx
