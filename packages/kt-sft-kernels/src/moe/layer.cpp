// MoE layer orchestration (DESIGN.md §2, §3.4): routing, the forward/backward phases, the cache.
//
// Every phase is a parallel_for over tasks whose boundaries depend only on the problem (expert,
// fixed-width column block, fixed 32-row pair chunk, fixed 16-token chunk), never on the thread
// count; each output element is produced by exactly one task in a fixed order, so results are
// bitwise identical for any number of threads. Tier code is reached only through KernelTable.
// docs/kernels.md lists the phases and every bf16 rounding point.
// This file: construction, weight loading and (re)packing; forward and backward live in
// layer_forward.cpp / layer_backward.cpp, the activation cache in forward_cache.cpp.
#include "layer_internal.hpp"

#include <iterator>
#include <map>

namespace kt::moe {

std::shared_ptr<SharedWorkspace> workspace_for(const runtime::ThreadPool* pool) {
  static std::mutex registry_mutex;
  // Never destroyed: layers may outlive static destruction at interpreter exit.
  static auto* registry = new std::map<const runtime::ThreadPool*, std::weak_ptr<SharedWorkspace>>();
  const std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry->begin(); it != registry->end();)  // forget pools whose layers are all gone
    it = it->second.expired() ? registry->erase(it) : std::next(it);
  std::weak_ptr<SharedWorkspace>& slot = (*registry)[pool];
  std::shared_ptr<SharedWorkspace> shared = slot.lock();
  if (!shared) {
    shared = std::make_shared<SharedWorkspace>();
    slot = shared;
  }
  return shared;
}

MoELayer::MoELayer(const MoEConfig& config, runtime::ThreadPool& pool) : impl_(std::make_unique<Impl>()) {
  if (config.num_experts <= 0) bad_argument("num_experts must be positive, got " + std::to_string(config.num_experts));
  if (config.top_k <= 0) bad_argument("top_k must be positive, got " + std::to_string(config.top_k));
  if (config.hidden <= 0 || config.hidden % 32)
    bad_argument("hidden must be a positive multiple of 32, got " + std::to_string(config.hidden));
  if (config.intermediate <= 0 || config.intermediate % 32)
    bad_argument("intermediate must be a positive multiple of 32, got " + std::to_string(config.intermediate));
  check_group_size(config, "MoELayer: ");
  if (config.numa_shards != 1) throw NotImplementedError("MoELayer: numa_shards > 1 is not implemented yet");
  impl_->config = config;
  impl_->pool = &pool;
  impl_->shared = workspace_for(&pool);
}

MoELayer::~MoELayer() = default;

const MoEConfig& MoELayer::config() const { return impl_->config; }
bool MoELayer::loaded() const { return impl_->loaded; }

// ---- weights -------------------------------------------------------------------------------------------

// Packs gate_up (either one [E, 2I, H] array, or gate and up [E, I, H] each) and down [E, H, I].
// A format's packing of [gate; up] equals packing gate then up (row blocks are contiguous and
// I % 32 == 0), so the separate form needs no temporary copy.
void MoELayer::Impl::pack_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate;
  const KernelTable& table = kernels_for(runtime::active_isa());
  L.gate_up_stride = table.packed_bytes(2 * I, H);
  L.down_stride = table.packed_bytes(H, I);
  const std::size_t half_bytes = table.packed_bytes(I, H);
  L.gate_up.ensure(L.gate_up_stride * E);
  L.down.ensure(L.down_stride * E);
  L.pool->parallel_for(E, [&](std::int64_t e, int) {
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    if (gate_up_w) {
      table.pack(gate_up_w->as<const bf16>() + e * 2 * I * H, 2 * I, H, gu_dst);
    } else {
      table.pack(gate->as<const bf16>() + e * I * H, I, H, gu_dst);
      table.pack(up->as<const bf16>() + e * I * H, I, H, gu_dst + half_bytes);
    }
    table.pack(down_w.as<const bf16>() + e * H * I, H, I, L.down.data() + e * L.down_stride);
  });
  L.packed_by = &table;
  L.loaded = true;
}

void MoELayer::load_weights(const View& gate_up, const View& down) {
  validate_weights(impl_->config, gate_up, View{}, View{}, down);
  const bool q = impl_->quantized();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->loaded = false;
  if (q) impl_->quantize_all(&gate_up, nullptr, nullptr, down);
  else impl_->pack_all(&gate_up, nullptr, nullptr, down);
}

void MoELayer::load_weights(const View& gate, const View& up, const View& down) {
  if (!gate) throw TypeError("gate: required, got None");
  validate_weights(impl_->config, View{}, gate, up, down);
  const bool q = impl_->quantized();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->loaded = false;
  if (q) impl_->quantize_all(nullptr, &gate, &up, down);
  else impl_->pack_all(nullptr, &gate, &up, down);
}

}  // namespace kt::moe
