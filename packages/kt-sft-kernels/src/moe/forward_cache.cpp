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

}  // namespace kt::moe
