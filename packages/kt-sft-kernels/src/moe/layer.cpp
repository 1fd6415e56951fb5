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

std::shared_ptr<SharedWorkspace> workspace_for(const runtime::ThreadPool* pool, int workspace_slot) {
  static std::mutex registry_mutex;
  // Never destroyed: layers may outlive static destruction at interpreter exit.
  static auto* registry =
      new std::map<std::pair<const runtime::ThreadPool*, int>, std::weak_ptr<SharedWorkspace>>();
  const std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry->begin(); it != registry->end();)  // forget pools whose layers are all gone
    it = it->second.expired() ? registry->erase(it) : std::next(it);
  std::weak_ptr<SharedWorkspace>& slot = (*registry)[{pool, workspace_slot}];
  std::shared_ptr<SharedWorkspace> shared = slot.lock();
  if (!shared) {
    shared = std::make_shared<SharedWorkspace>();
    slot = shared;
  }
  return shared;
}

MoELayer::MoELayer(const MoEConfig& config, runtime::ThreadPool& pool, int workspace_slot)
    : impl_(std::make_unique<Impl>()) {
  if (config.num_experts <= 0) bad_argument("num_experts must be positive, got " + std::to_string(config.num_experts));
  if (config.top_k <= 0) bad_argument("top_k must be positive, got " + std::to_string(config.top_k));
  if (config.hidden <= 0 || config.hidden % 32)
    bad_argument("hidden must be a positive multiple of 32, got " + std::to_string(config.hidden));
  if (config.intermediate <= 0 || config.intermediate % 32)
    bad_argument("intermediate must be a positive multiple of 32, got " + std::to_string(config.intermediate));
  check_group_size(config, "MoELayer: ");
  if (config.numa_shards < 1) bad_argument("numa_shards must be >= 1, got " + std::to_string(config.numa_shards));
  impl_->config = config;
  impl_->pool = &pool;
  if (config.numa_shards > 1) {  // `pool` then only orders the calls; each shard has its own sub-pool
    impl_->sharded = std::make_unique<ShardedLayer>(config);
    return;
  }
  impl_->shared = workspace_for(&pool, workspace_slot);
}

MoELayer::~MoELayer() = default;

const MoEConfig& MoELayer::config() const { return impl_->config; }
bool MoELayer::loaded() const { return impl_->loaded; }

// ---- weights -------------------------------------------------------------------------------------------

// Packs gate_up (either one [E, 2I, H] array, or gate and up [E, I, H] each) and down [E, H, I].
// A format's packing of [gate; up] equals packing gate then up (row blocks are contiguous and
// I % 32 == 0), so the separate form needs no temporary copy. source_I > 0: the arrays are
// source_I wide and this layer takes the slice [i0, i0 + I) (a NUMA shard); down's slice columns
// are gathered per expert.
void MoELayer::Impl::pack_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w,
                              int source_I, int i0) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate;
  const std::int64_t SI = source_I > 0 ? source_I : I;
  const KernelTable& table = kernels_for(runtime::active_isa());
  L.reserve_experts(table.packed_bytes(2 * I, H), table.packed_bytes(H, I));
  const std::size_t half_bytes = table.packed_bytes(I, H);
  L.pool->parallel_for(E, [&](std::int64_t e, int) {
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    if (gate_up_w && SI == I) {
      table.pack(gate_up_w->as<const bf16>() + e * 2 * I * H, 2 * I, H, gu_dst);
    } else if (gate_up_w) {
      const bf16* base = gate_up_w->as<const bf16>() + e * 2 * SI * H;
      table.pack(base + i0 * H, I, H, gu_dst);
      table.pack(base + (SI + i0) * H, I, H, gu_dst + half_bytes);
    } else {
      table.pack(gate->as<const bf16>() + (e * SI + i0) * H, I, H, gu_dst);
      table.pack(up->as<const bf16>() + (e * SI + i0) * H, I, H, gu_dst + half_bytes);
    }
    const bf16* down_e = down_w.as<const bf16>() + e * H * SI;
    if (SI == I) {
      table.pack(down_e, H, I, L.down.data() + e * L.down_stride);
    } else {
      std::vector<bf16> columns(static_cast<std::size_t>(H) * I);
      for (std::int64_t h = 0; h < H; ++h)
        std::memcpy(columns.data() + h * I, down_e + h * SI + i0, static_cast<std::size_t>(I) * sizeof(bf16));
      table.pack(columns.data(), H, I, L.down.data() + e * L.down_stride);
    }
  });
  L.packed_by = &table;
  L.loaded = true;
}

void MoELayer::load_weights(const View& gate_up, const View& down) {
  validate_weights(impl_->config, gate_up, View{}, View{}, down);
  const bool q = impl_->quantized();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->loaded = false;
  if (impl_->sharded) {
    impl_->sharded->load_weights(&gate_up, nullptr, nullptr, down);
    impl_->loaded = true;
    return;
  }
  if (q) impl_->quantize_all(&gate_up, nullptr, nullptr, down);
  else impl_->pack_all(&gate_up, nullptr, nullptr, down);
}

void MoELayer::load_weights(const View& gate, const View& up, const View& down) {
  if (!gate) throw TypeError("gate: required, got None");
  validate_weights(impl_->config, View{}, gate, up, down);
  const bool q = impl_->quantized();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->loaded = false;
  if (impl_->sharded) {
    impl_->sharded->load_weights(nullptr, &gate, &up, down);
    impl_->loaded = true;
    return;
  }
  if (q) impl_->quantize_all(nullptr, &gate, &up, down);
  else impl_->pack_all(nullptr, &gate, &up, down);
}

void MoELayer::load_weight_slice(const View* gate_up, const View* gate, const View* up, const View& down,
                                 int source_intermediate, int i0) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (impl_->quantized()) impl_->quantize_all(gate_up, gate, up, down, source_intermediate, i0);
  else impl_->pack_all(gate_up, gate, up, down, source_intermediate, i0);
}

std::size_t MoELayer::packed_weight_bytes() const {
  if (impl_->sharded) {
    std::size_t total = 0;
    for (const ShardInfo& s : impl_->sharded->report()) total += s.weight_bytes;
    return total;
  }
  if (!impl_->loaded) return 0;
  return (impl_->gate_up_stride + impl_->down_stride) * static_cast<std::size_t>(impl_->config.num_experts);
}

const void* MoELayer::packed_weight_address() const { return impl_->loaded ? impl_->gate_up.data() : nullptr; }

std::vector<ShardInfo> MoELayer::shard_report() const {
  return impl_->sharded ? impl_->sharded->report() : std::vector<ShardInfo>{};
}

}  // namespace kt::moe
