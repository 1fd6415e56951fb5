// Internal view of the amx tier for its C++ tests and self-test (tests/cpp/amx_*): the table, and
// the few knobs the self-test sweeps. Not part of the wheel's interface.
#pragma once
#include "kt/moe/kernels.hpp"

namespace kt::isa_amx {

const moe::KernelTable& kernel_table();

constexpr int kMaxKcSteps = 32;  // bounds kc_steps (amx_internal.hpp's B-tile buffers)

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
  // bf16 products: the weights of the next item(s) are requested all at once when an item starts,
  // not one reduction step per step (more misses in flight per thread, fewer prefetch slots later).
  bool weight_prefetch_burst = false;
  // The weights nothing prefetches (a call's first item(s) / pair(s) / row groups) are requested all
  // at once at the call's entry: bf16 NT and NN, int8 NT and the int8 strip build.
  bool weight_prefetch_first = false;
  // Int8 products (amx_int8.cpp). NN: the per-call VNNI strip build reads W 4 rows (a group) at a
  // time and prefetches the group this many ahead (0: off), into L1 or L2 only; optionally also an
  // extra L2 prefetch further ahead (0: off). L2: the device sweep (ADR 0603, round 3) measured the
  // int8 step at T = 512 7.8 % faster than with L1 prefetches (which compete with the tile loads for
  // the L1 fill buffers), neutral at T = 4096.
  int int8_strip_prefetch_groups = 4;
  bool int8_strip_prefetch_l2 = true;
  int int8_strip_far_groups = 0;
  // NT: the W pair (32 rows: two 16-row blocks of tiles) this many pairs ahead streams in during a
  // pair's first m-tile (0: off), into L2 or L1, a tile of each block per step; or all at once at the
  // pair's start.
  int int8_nt_prefetch_pairs = 1;
  bool int8_nt_prefetch_l2 = true;
  bool int8_nt_prefetch_burst = false;
};
// Process-wide; change it only while no kernel runs and before packing activations (small_m
// decides the packed layout). The wheel never changes it; the tests and benchmarks/tune_sweep.py do,
// through kt_sft_kernels._core._testing.set_amx_tuning (every knob but small_m: none of them can
// change a result, prefetches and loop orders over exact accumulations only).
Tuning& tuning();

}  // namespace kt::isa_amx
