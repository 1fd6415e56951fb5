// The activation cache forward(save=true) leaves for backward, and its recycler (DESIGN.md §2).
#pragma once
#include <memory>
#include <mutex>

#include "buffer.hpp"
#include "kt/core/bf16.hpp"
#include "kt/moe/layer.hpp"
#include "routing.hpp"
#include "sharded_layer.hpp"

namespace kt::moe {

// The largest activation cache a layer's freed handles gave back, for its next forward(save=True):
// a fresh cache of T*k*2I bf16 (100 MB for Qwen3-30B-A3B at T = 4096) costs page faults on first touch
// on every call. At most one spare per layer, never more than the layer's own peak cache.
class CacheRecycler {
 public:
  void give(Buffer<bf16>& gu, Buffer<float>& ad, Buffer<float>& ax) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (gu.capacity() > gu_.capacity()) gu_.swap(gu);
    if (ad.capacity() > ad_.capacity()) ad_.swap(ad);
    if (ax.capacity() > ax_.capacity()) ax_.swap(ax);
  }
  std::size_t bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return gu_.capacity() * sizeof(bf16) + (ad_.capacity() + ax_.capacity()) * sizeof(float);
  }
  void take(Buffer<bf16>& gu, Buffer<float>& ad, Buffer<float>& ax) {
    const std::lock_guard<std::mutex> lock(mutex_);
    gu.swap(gu_);
    ad.swap(ad_);
    ax.swap(ax_);
  }

 private:
  std::mutex mutex_;
  Buffer<bf16> gu_;
  Buffer<float> ad_;
  Buffer<float> ax_;
};

class ForwardCache {
 public:
  std::shared_ptr<CacheRecycler> recycler;  // shared: the cache may outlive its layer
  const MoELayer* layer = nullptr;
  Routing routing;
  View x;          // caller memory; the binding's handle keeps its owner alive and re-points
  LoRAViews lora;  // these (rebind_cache_inputs) before the backward, as the storage may have moved
  int rank_gu = 0, rank_d = 0;
  Buffer<bf16> gu;   // [P, 2I]: gate|up pre-activations, rounded to bf16
  Buffer<float> ad;  // [P, r_d]: A_d h
  Buffer<float> ax;  // [P, r_gu]: A_gu x (the backward's dB_gu needs it; r_gu floats a pair)
  std::shared_ptr<ShardedCache> shards;  // numa_shards > 1: the shards' own caches (sharded_layer.cpp)
};

}  // namespace kt::moe
