// The activation cache: its deleter (gives the buffers back to the recycler) and the accessors the
// bindings use to match a backward with its forward.
#include "forward_cache.hpp"

namespace kt::moe {

void ForwardCacheDeleter::operator()(ForwardCache* cache) const {
  if (cache->recycler) cache->recycler->give(cache->gu, cache->ad, cache->ax);
  delete cache;
}

std::int64_t cache_tokens(const ForwardCache& cache) { return cache.routing.tokens; }
const MoELayer* cache_layer(const ForwardCache& cache) { return cache.layer; }
bool cache_has_lora_gate_up(const ForwardCache& cache) { return cache.rank_gu > 0; }
bool cache_has_lora_down(const ForwardCache& cache) { return cache.rank_d > 0; }

std::size_t cache_bytes(const ForwardCache& cache) {
  if (cache.shards) return ShardedLayer::cache_bytes(*cache.shards);
  const Routing& r = cache.routing;
  return cache.gu.capacity() * sizeof(bf16) + (cache.ad.capacity() + cache.ax.capacity()) * sizeof(float) +
         r.offsets.capacity() * sizeof(std::int64_t) + r.token.capacity() * sizeof(std::int32_t) +
         r.weight.capacity() * sizeof(float) + r.row_of_slot.capacity() * sizeof(std::int64_t) +
         r.active.capacity() * sizeof(int);
}

}  // namespace kt::moe
