// Round 0 of a sharded call on one node (sharded_layer.cpp, ADR 0701 "One-node cost"): what every
// shard's slice would otherwise compute in full for itself, because it does not depend on the slice:
// the tile packing of x (forward) / grad_out (backward) and the r floats a pair of A_gu x (forward) /
// B_d^T G (backward). Shard 0 fills one shared copy on the shards' one pool; then every shard's call
// reads it (PairRows::shared). Each chunk is computed by exactly the code that computed it inside
// the shard before, so the bits are the same.
#pragma once
#include "layer_internal.hpp"

namespace kt::moe {

struct RoundZero {
  Routing routing;                     // forward: the call's routing, built once (backward: the cache's)
  const Routing* route = nullptr;      // the routing the ranges below are of
  PackedRows packed;                   // x / grad_out packed, when `packs` (tiers that pack rows)
  bool packs = false;
  Buffer<float> lora_rows;             // [P, r]: A_gu x (forward) / B_d^T G (backward), when `lora`
  bool lora = false;
  std::vector<PairChunk> pair_chunks;  // the kPairChunk chunks the lora rows are computed in

  std::size_t bytes() const { return packed.bytes() + lora_rows.capacity() * sizeof(float); }
};

}  // namespace kt::moe
