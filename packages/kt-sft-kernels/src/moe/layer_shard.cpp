// MoELayer::shard_lora_grads: what the NUMA shard wrapper (sharded_layer.cpp, ADR 0701) computes once
// for all shards. dB_d = s_d Σ w G ⊗ (A_d h) and dA_gu = s_gu Σ (B_gu^T dgu) ⊗ x are linear in the r
// floats per pair that each shard's slice contributes to A_d h and B_gu^T dgu, so the wrapper sums
// those over shards (r floats a pair) and one pass computes each gradient, split between the shards
// by expert, instead of every shard computing a full-size partial to be reduced (shards on different
// nodes; on one node the shards run as one call: forward_shards / backward_shards, which take every
// shard's locks through lock_all).
#include "layer_internal.hpp"

namespace kt::moe {

std::vector<std::unique_lock<std::mutex>> MoELayer::lock_all(const std::vector<MoELayer*>& shards) {
  std::vector<std::unique_lock<std::mutex>> locks;
  for (MoELayer* shard : shards) {
    locks.emplace_back(shard->impl_->mutex);
    locks.emplace_back(shard->impl_->shared->mutex);
  }
  return locks;
}

void MoELayer::shard_lora_grads(const ForwardCache& cache, const float* ad, const float* bgu, int e0, int e1,
                                const LoRAGradViews& lg) {
  Impl& L = *impl_;
  const int H = L.config.hidden;
  const Routing& r = cache.routing;
  const int rg = cache.rank_gu, rd = cache.rank_d;
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;  // the rows of the backward that just ran on this pool
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max({rg, rd, 1});
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);
  std::vector<int> experts;
  for (int e : r.active)
    if (e >= e0 && e < e1) experts.push_back(e);
  const auto n = static_cast<std::int64_t>(experts.size());
  const int db_d_blocks = blocks_of(H), da_gu_blocks = blocks_of(H, kWideBlock);
  const bool want_db_d = rd && lg.db_d, want_da_gu = rg && lg.da_gu;
  if (want_db_d)
    run_tasks(pool, Stage::bwd_db_d, n * db_d_blocks, [&](std::int64_t task, int thread) {
      const int e = experts[task / db_d_blocks];
      const int h0 = static_cast<int>(task % db_d_blocks) * kBlock, h1 = std::min(H, h0 + kBlock);
      const std::int64_t b = r.offsets[e];
      kt.lora_grad_b(static_cast<int>(r.rows_of(e)), ws.g_rows.data() + b, r.weight.data() + b, ad + b * rd, rd, h0,
                     h1, cache.lora.scale_d, expert_slice_mut(lg.db_d, e), lg.db_d.dtype,
                     scratch + thread * scratch_per_thread);
    });
  if (want_da_gu)
    run_tasks(pool, Stage::bwd_da_gu, n * da_gu_blocks, [&](std::int64_t task, int thread) {
      const int e = experts[task / da_gu_blocks];
      const int h0 = static_cast<int>(task % da_gu_blocks) * kWideBlock, h1 = std::min(H, h0 + kWideBlock);
      const std::int64_t b = r.offsets[e];
      kt.lora_grad_a(static_cast<int>(r.rows_of(e)), bgu + b * rg, nullptr, ws.x_rows.data() + b, rg, H, h0, h1,
                     cache.lora.scale_gu, expert_slice_mut(lg.da_gu, e), lg.da_gu.dtype,
                     scratch + thread * scratch_per_thread);
    });
  // Experts of the range that received no pair: exactly zero.
  std::vector<char> has_rows(static_cast<std::size_t>(L.config.num_experts), 0);
  for (int e : r.active) has_rows[static_cast<std::size_t>(e)] = 1;
  for (const View* grad : {want_da_gu ? &lg.da_gu : nullptr, want_db_d ? &lg.db_d : nullptr}) {
    if (grad == nullptr) continue;
    const std::size_t bytes = static_cast<std::size_t>(grad->shape[1] * grad->shape[2]) * dtype_size(grad->dtype);
    for (int e = e0; e < e1; ++e)
      if (!has_rows[static_cast<std::size_t>(e)]) std::memset(expert_slice_mut(*grad, e), 0, bytes);
  }
}

}  // namespace kt::moe
