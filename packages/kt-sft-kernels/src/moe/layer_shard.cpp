// MoELayer::shard_lora_grads: the LoRA gradients a NUMA shard wrapper computes once for all shards
// (sharded_layer.cpp, ADR 0701). dB_d = s_d Σ w G ⊗ (A_d h) and dA_gu = s_gu Σ (B_gu^T dgu) ⊗ x are
// linear in the r floats per pair that each shard's slice contributes to A_d h and B_gu^T dgu, so
// the wrapper sums those over shards (r floats a pair) and one pass computes each gradient, split
// between the shards by expert, instead of every shard computing a full-size partial to be reduced.
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

}  // namespace kt::moe

namespace kt::moe {

namespace {

// out [m rows, width] (row stride H) = Σ_s product(s) in shard order, fp32, for tiers without a summed
// entry: shard 0's product is written in place, every other one into `tile` ([m, width]) and added.
template <class Product>
void sum_in_shard_order(std::size_t shards, int m, int width, int H, float* out, float* tile, Product product) {
  for (std::size_t s = 0; s < shards; ++s) {
    product(s, s == 0 ? out : tile, s == 0 ? std::int64_t{H} : std::int64_t{width});
    if (s > 0)
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < width; ++c) out[static_cast<std::int64_t>(i) * H + c] += tile[i * width + c];
  }
}

}  // namespace

void MoELayer::shard_down(const std::vector<const MoELayer*>& shards, const std::vector<PairRows>& parts,
                          const LoRAViews& lora, float* y) {
  Impl& L = *impl_;
  const int H = L.config.hidden;
  const Routing& r = *parts[0].routing;
  const int rd = lora.a_d ? static_cast<int>(lora.a_d.shape[1]) : 0;
  const KernelTable& kt = L.kernels();
  const bool packed = PackedRows::used_by(kt);
  const bool summed = packed && kt.gemm_nt_packed_segments != nullptr;
  runtime::ThreadPool& pool = *L.pool;
  const int blocks = blocks_of(H, kDownBlock);
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  const std::size_t ad_per_thread = static_cast<std::size_t>(kMaxChunkRows) * std::max(rd, 1);
  float* ad_sums = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * ad_per_thread);
  const auto n_active = static_cast<std::int64_t>(r.active.size());
  run_tasks(pool, Stage::down, n_active * blocks, [&](std::int64_t task, int thread) {
    const int e = r.active[task / blocks];
    const int h0 = static_cast<int>(task % blocks) * kDownBlock, h1 = std::min(H, h0 + kDownBlock);
    const int width = h1 - h0;
    float* other = tiles + thread * kTileFloats;
    std::vector<PackedSegment> segs(summed ? shards.size() : 0);
    for_each_call(r, e, [&](std::int64_t b, int m) {
      if (summed) {  // one product over the shards' slices in shard order, written once
        for (std::size_t s = 0; s < shards.size(); ++s) {
          const Impl& S = *shards[s]->impl_;
          segs[s] = {S.shared->ws.packed.at(r, e, b), S.down_of(e), S.config.intermediate};
        }
        kt.gemm_nt_packed_segments(m, segs.data(), static_cast<int>(segs.size()), H, h0, h1, y + b * H + h0, H);
      } else {
        sum_in_shard_order(shards.size(), m, width, H, y + b * H + h0, other,
                           [&](std::size_t s, float* dst, std::int64_t ld) {
                             const Impl& S = *shards[s]->impl_;
                             chunk_nt(kt, packed ? &S.shared->ws.packed : nullptr, r, e, b, m,
                                      S.shared->ws.h_rows.data(), S.down_of(e), H, S.config.intermediate, h0, h1, dst,
                                      ld);
                           });
      }
      if (rd) {  // s_d B_d (Σ_s A_d[:, S_s] h_s): the r floats a pair summed in shard order, one B_d pass
        const auto timed = part(Stage::lora_b);
        float* ad = ad_sums + thread * ad_per_thread;
        for (std::int64_t i = 0; i < m * rd; ++i) {
          float sum = 0.f;
          for (const PairRows& p : parts) sum += p.ad[b * rd + i];
          ad[i] = sum;
        }
        kt.lora_b_add(m, ad, expert_slice(lora.b_d, e), lora.b_d.dtype, rd, h0, h1, lora.scale_d, y + b * H + h0, H);
      }
    });
  });
}

}  // namespace kt::moe

namespace kt::moe {

void MoELayer::shard_dx(const ForwardCache& cache, const std::vector<const MoELayer*>& shards,
                        const std::vector<PairRows>& parts, const LoRAGradViews& lg, float* dx_rows) {
  Impl& L = *impl_;
  const int H = L.config.hidden;
  const Routing& r = cache.routing;
  const LoRAViews& lora = cache.lora;  // A_gu is the caller's (sharded_layer.cpp re-points it)
  const int rg = cache.rank_gu;
  const KernelTable& kt = L.kernels();
  const bool packed = PackedRows::used_by(kt);
  const bool summed = packed && kt.gemm_nn_packed_segments != nullptr;
  runtime::ThreadPool& pool = *L.pool;
  const int blocks = blocks_of(H, kWideBlock);
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;  // this shard's rows of x from the backward that just ran
  const std::int64_t P = r.pairs();
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max(rg, 1);
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);
  const bool want_da_gu = rg && lg.da_gu;
  // b = Σ_s B_gu[S_s]^T dgu_s per pair, in shard order (r floats a pair).
  float* b_sum = rg ? ws.shard_sums.ensure(static_cast<std::size_t>(std::max<std::int64_t>(P * rg, 1))) : nullptr;
  if (rg)
    pool.parallel_for((P + kPairChunk - 1) / kPairChunk, [&](std::int64_t task, int) {
      const auto timed = part(Stage::bwd_lora_bt_gu);
      const std::int64_t end = std::min(P, (task + 1) * kPairChunk) * rg;
      for (std::int64_t i = task * kPairChunk * rg; i < end; ++i) {
        float sum = 0.f;
        for (const PairRows& p : parts) sum += p.bgu[i];
        b_sum[i] = sum;
      }
    });
  const auto n_active = static_cast<std::int64_t>(r.active.size());
  if (dx_rows || want_da_gu)
    run_tasks(pool, Stage::bwd_gate_up, n_active * blocks, [&](std::int64_t task, int thread) {
      const int e = r.active[task / blocks];
      const int h0 = static_cast<int>(task % blocks) * kWideBlock, h1 = std::min(H, h0 + kWideBlock);
      const int width = h1 - h0;
      float* other = tiles + thread * kTileFloats;
      std::vector<PackedSegment> segs(summed ? shards.size() : 0);
      if (dx_rows)
        for_each_call(r, e, [&](std::int64_t b, int m) {
          if (summed) {  // one product over the shards' slices in shard order, written once
            for (std::size_t s = 0; s < shards.size(); ++s) {
              const Impl& S = *shards[s]->impl_;
              segs[s] = {S.shared->ws.packed.at(r, e, b), S.gate_up_of(e), 2 * S.config.intermediate};
            }
            kt.gemm_nn_packed_segments(m, segs.data(), static_cast<int>(segs.size()), H, h0, h1, dx_rows + b * H + h0,
                                       H);
          } else {
            sum_in_shard_order(shards.size(), m, width, H, dx_rows + b * H + h0, other,
                               [&](std::size_t s, float* dst, std::int64_t ld) {
                                 const Impl& S = *shards[s]->impl_;
                                 chunk_nn(kt, packed ? &S.shared->ws.packed : nullptr, r, e, b, m,
                                          S.shared->ws.dgu_rows.data(), S.gate_up_of(e), 2 * S.config.intermediate, H,
                                          h0, h1, dst, ld);
                               });
          }
          if (rg)
            kt.lora_at_add(m, b_sum + b * rg, expert_slice(lora.a_gu, e), lora.a_gu.dtype, rg, H, h0, h1,
                           lora.scale_gu, dx_rows + b * H + h0, H);
        });
      if (want_da_gu) {
        const auto timed = part(Stage::bwd_da_gu);
        const std::int64_t b = r.offsets[e];
        kt.lora_grad_a(static_cast<int>(r.rows_of(e)), b_sum + b * rg, nullptr, ws.x_rows.data() + b, rg, H, h0, h1,
                       lora.scale_gu, expert_slice_mut(lg.da_gu, e), lg.da_gu.dtype,
                       scratch + thread * scratch_per_thread);
      }
    });
  // Experts that received no pair: their dA_gu is exactly zero.
  if (want_da_gu) {
    std::vector<char> has_rows(static_cast<std::size_t>(L.config.num_experts), 0);
    for (int e : r.active) has_rows[static_cast<std::size_t>(e)] = 1;
    const std::size_t bytes = static_cast<std::size_t>(rg) * H * dtype_size(lg.da_gu.dtype);
    for (int e = 0; e < L.config.num_experts; ++e)
      if (!has_rows[static_cast<std::size_t>(e)]) std::memset(expert_slice_mut(lg.da_gu, e), 0, bytes);
  }
}

}  // namespace kt::moe
