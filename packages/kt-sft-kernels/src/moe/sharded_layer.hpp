// The NUMA tensor-parallel wrapper (DESIGN.md §3.4, ADR 0701): a layer with numa_shards = N > 1 is
// N ordinary MoELayers, shard s owning the intermediate slice [i0_s, i1_s) (multiples of 32): gate/up
// rows and down columns of that slice, packed by the shard's own pinned sub-pool (node-local by first
// touch). The layer's results are sums over the slices (out, dx, grad_w; dA_gu and dB_d through the
// r floats a pair of B_gu^T dgu and A_d h, summed over shards once) or slices themselves (dB_gu rows,
// dA_d columns). Shards on one node run each call as one call of shard 0's layer over all slices
// (MoELayer::forward_shards / backward_shards); shards on different nodes each combine their own rows
// into an fp32 partial that round 2 sums by tokens (ADR 0701).
// Reached only through MoELayer (layer.cpp), which validates every argument first.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"
#include "kt/moe/layer.hpp"

namespace kt::moe {

struct ShardedCache;  // what forward(save=true) keeps per shard (sharded_layer.cpp)

class ShardedLayer {
 public:
  // Plans the shards from the process topology and KT_SFT_NUMA; throws std::invalid_argument when
  // I cannot give every shard a multiple of 32.
  explicit ShardedLayer(const MoEConfig& config);
  ~ShardedLayer();

  void load_weights(const View* gate_up, const View* gate, const View* up, const View& down);
  // Quantized bases: each shard takes its slice of the whole layer's quantized arrays; read_quantized
  // gathers the slices back into whole arrays (bit-exact round trip).
  void load_quantized(const QuantViews& q);
  void read_quantized(const QuantViews& q);
  // Returns the shards' caches when save is true, nullptr otherwise.
  std::shared_ptr<ShardedCache> forward(const View& x, const View& ids, const View& weights, const View& out,
                                        const LoRAViews& lora, bool save);
  // x and lora: where the forward's x and LoRA arrays are now (the outer cache's views).
  void backward(const ShardedCache& cache, const View& x, const LoRAViews& lora, const View& grad_out,
                const View& grad_x, const View& grad_weights, const LoRAGradViews& lora_grads);
  std::vector<ShardInfo> report() const;
  std::vector<MemoryReport> memory_reports();  // each shard's MoELayer::memory_report()
  // Activation-cache bytes a forward(save=true) left in its shards (LoRA slices included).
  static std::size_t cache_bytes(const ShardedCache& cache);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The slices numa_shards=N gives intermediate I: N near-equal runs of `block`-row blocks (32; an int4
// base: its group_size, so down's groups along I never straddle two shards). Throws
// std::invalid_argument naming numa_shards and intermediate (and group_size) when I / block < N.
std::vector<std::pair<int, int>> shard_slices(int intermediate, int shards, int block = 32);

}  // namespace kt::moe
