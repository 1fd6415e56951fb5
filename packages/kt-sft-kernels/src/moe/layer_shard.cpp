// What the NUMA shard wrapper (sharded_layer.cpp, ADR 0701) computes once for all shards.
// shard_lora_grads: dB_d = s_d Σ w G ⊗ (A_d h) and dA_gu = s_gu Σ (B_gu^T dgu) ⊗ x are linear in the r
// floats per pair that each shard's slice contributes to A_d h and B_gu^T dgu, so the wrapper sums
// those over shards (r floats a pair) and one pass computes each gradient, split between the shards
// by expert, instead of every shard computing a full-size partial to be reduced. shard_down /
// shard_dx (shards on one node): the down / dx products over every shard's slice and their combine.
#include "layer_internal.hpp"

namespace kt::moe {

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

namespace {

// sums[P, width] = Σ_s (part s's [P, width] floats) in shard order: the r floats a pair of A_d h /
// B_gu^T dgu that each shard's slice contributes, summed once for the one LoRA pass that needs them.
float* sum_over_shards(runtime::ThreadPool& pool, Stage stage, std::int64_t P, int width,
                       const std::vector<PairRows>& parts, const float* PairRows::*field, Buffer<float>& sums) {
  float* dst = sums.ensure(static_cast<std::size_t>(std::max<std::int64_t>(P * width, 1)));
  run_tasks(pool, stage, (P + kPairChunk - 1) / kPairChunk, [&](std::int64_t task, int) {
    const std::int64_t end = std::min(P, (task + 1) * kPairChunk) * width;
    for (std::int64_t i = task * kPairChunk * width; i < end; ++i) {
      float sum = 0.f;
      for (const PairRows& p : parts) sum += (p.*field)[i];
      dst[i] = sum;
    }
  });
  return dst;
}

}  // namespace

void MoELayer::shard_down(const std::vector<const MoELayer*>& shards, const std::vector<PairRows>& parts,
                          const LoRAViews& lora, const View& out) {
  Impl& L = *impl_;
  const Routing& r = *parts[0].routing;
  const int rd = lora.a_d ? static_cast<int>(lora.a_d.shape[1]) : 0;
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  const float* ad = rd ? sum_over_shards(pool, Stage::lora_a_d, r.pairs(), rd, parts, &PairRows::ad, ws.shard_sums)
                       : nullptr;
  std::vector<SliceRows> slices;  // each shard's h rows, in its own workspace
  for (const MoELayer* shard : shards) slices.push_back(shard->impl_->down_slice(shard->impl_->shared->ws));
  down_and_combine(L.kernels(), pool, ws, r, slices, ad, lora, L.config.hidden, L.config.top_k, out);
}

void MoELayer::shard_dx(const ForwardCache& cache, const std::vector<const MoELayer*>& shards,
                        const std::vector<PairRows>& parts, const LoRAGradViews& lg, const View& grad_x) {
  Impl& L = *impl_;
  const Routing& r = cache.routing;
  const int rg = cache.rank_gu;
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;  // this shard's rows of x from the backward that just ran
  const float* bgu = rg ? sum_over_shards(pool, Stage::bwd_lora_bt_gu, r.pairs(), rg, parts, &PairRows::bgu,
                                          ws.shard_sums)
                        : nullptr;
  std::vector<SliceRows> slices;  // each shard's dgu rows, in its own workspace
  for (const MoELayer* shard : shards) slices.push_back(shard->impl_->dx_slice(shard->impl_->shared->ws));
  // A_gu is the caller's (sharded_layer.cpp re-points the cache's LoRA views).
  dx_and_combine(L.kernels(), pool, ws, r, slices, bgu, ws.x_rows.data(), cache.lora, rg, lg.da_gu, L.config.hidden,
                 L.config.top_k, grad_x);
  // Experts that received no pair: their dA_gu is exactly zero.
  if (rg && lg.da_gu) {
    std::vector<char> has_rows(static_cast<std::size_t>(L.config.num_experts), 0);
    for (int e : r.active) has_rows[static_cast<std::size_t>(e)] = 1;
    const std::size_t bytes = static_cast<std::size_t>(rg) * L.config.hidden * dtype_size(lg.da_gu.dtype);
    for (int e = 0; e < L.config.num_experts; ++e)
      if (!has_rows[static_cast<std::size_t>(e)]) std::memset(expert_slice_mut(lg.da_gu, e), 0, bytes);
  }
}

}  // namespace kt::moe
