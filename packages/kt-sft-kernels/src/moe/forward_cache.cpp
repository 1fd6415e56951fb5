// The activation cache: its deleter (gives the buffers back to the recycler) and the accessors the
// bindings use to match a backward with its forward.
#include "forward_cache.hpp"

#include <stdexcept>
#include <string>

#include "kt/moe/validate.hpp"

namespace kt::moe {

void ForwardCacheDeleter::operator()(ForwardCache* cache) const {
  if (cache->recycler) cache->recycler->give(cache->gu, cache->ad, cache->ax);
  delete cache;
}

std::int64_t cache_tokens(const ForwardCache& cache) { return cache.routing.tokens; }
const MoELayer* cache_layer(const ForwardCache& cache) { return cache.layer; }
const View& cache_x(const ForwardCache& cache) { return cache.x; }
const LoRAViews& cache_lora(const ForwardCache& cache) { return cache.lora; }

void rebind_cache_inputs(ForwardCache& cache, const View& x, const LoRAViews& lora) {
  constexpr const char* since = "the forward that saved it";
  check_unchanged(cache.x, x, "x", since);
  const View* before[4] = {&cache.lora.a_gu, &cache.lora.b_gu, &cache.lora.a_d, &cache.lora.b_d};
  const View* now[4] = {&lora.a_gu, &lora.b_gu, &lora.a_d, &lora.b_d};
  const char* names[4] = {"a_gu", "b_gu", "a_d", "b_d"};
  for (int i = 0; i < 4; ++i) {
    if (static_cast<bool>(*before[i]) != static_cast<bool>(*now[i]))
      throw std::invalid_argument(std::string(names[i]) + ": the LoRA given does not match the forward's");
    if (*before[i]) check_unchanged(*before[i], *now[i], names[i], since);
  }
  cache.x.data = x.data;
  cache.lora.a_gu.data = lora.a_gu.data;
  cache.lora.b_gu.data = lora.b_gu.data;
  cache.lora.a_d.data = lora.a_d.data;
  cache.lora.b_d.data = lora.b_d.data;
}

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
