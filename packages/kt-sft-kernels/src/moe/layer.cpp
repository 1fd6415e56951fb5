// Skeleton of the MoE layer: every symbol of kt/moe/layer.hpp exists so the bindings can link.
// The real forward/backward replace these bodies.
#include "kt/moe/layer.hpp"

#include <stdexcept>

namespace kt::moe {

class ForwardCache {
 public:
  const MoELayer* layer = nullptr;
  std::int64_t tokens = 0;
  bool lora_gate_up = false;
  bool lora_down = false;
};

void ForwardCacheDeleter::operator()(ForwardCache* cache) const { delete cache; }

struct MoELayer::Impl {
  MoEConfig config;
  runtime::ThreadPool* pool = nullptr;
  bool loaded = false;
};

MoELayer::MoELayer(const MoEConfig& config, runtime::ThreadPool& pool) : impl_(std::make_unique<Impl>()) {
  impl_->config = config;
  impl_->pool = &pool;
}

MoELayer::~MoELayer() = default;

const MoEConfig& MoELayer::config() const { return impl_->config; }
bool MoELayer::loaded() const { return impl_->loaded; }

void MoELayer::load_weights(const View&, const View&) {
  throw std::runtime_error("MoELayer.load_weights: not implemented yet");
}

void MoELayer::load_weights(const View&, const View&, const View&) {
  throw std::runtime_error("MoELayer.load_weights: not implemented yet");
}

ForwardCachePtr MoELayer::forward(const View&, const View&, const View&, const View&, const LoRAViews&, bool) {
  throw std::runtime_error("MoELayer.forward: not implemented yet");
}

void MoELayer::backward(const ForwardCache&, const View&, const View&, const View&, const LoRAGradViews&) {
  throw std::runtime_error("MoELayer.backward: not implemented yet");
}

std::int64_t cache_tokens(const ForwardCache& cache) { return cache.tokens; }
const MoELayer* cache_layer(const ForwardCache& cache) { return cache.layer; }
bool cache_has_lora_gate_up(const ForwardCache& cache) { return cache.lora_gate_up; }
bool cache_has_lora_down(const ForwardCache& cache) { return cache.lora_down; }

}  // namespace kt::moe
