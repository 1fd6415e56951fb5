// MoELayer::backward: from the forward's cache, grad_x, grad_weights and the LoRA gradients
// (docs/kernels.md lists the phases and rounding points).
#include "layer_internal.hpp"

namespace kt::moe {

// ---- backward ------------------------------------------------------------------------------------------

void MoELayer::backward(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                        const View& grad_weights, const LoRAGradViews& lg) {
  if (cache.layer != this) throw std::invalid_argument("backward: the saved forward belongs to another layer");
  validate_backward(impl_->config, cache.routing.tokens, cache.x, cache.lora, grad_out, grad_x, grad_weights, lg,
                    /*all_lora_grads=*/false);
  backward_validated(cache, grad_out, grad_x, grad_weights, lg);
}

void MoELayer::backward_validated(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                                  const View& grad_weights, const LoRAGradViews& lg, PairRows* rows) {
  Impl& L = *impl_;
  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::backward, prof::Kind::wall);
  if (L.sharded) return L.sharded->backward(*cache.shards, cache.x, cache.lora, grad_out, grad_x, grad_weights, lg);
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  backward_over({this}, {&cache}, grad_out, grad_x, grad_weights, lg, {lg}, rows);
}

void MoELayer::backward_shards(const std::vector<MoELayer*>& shards, const std::vector<const ForwardCache*>& caches,
                               const View& grad_out, const View& grad_x, const View& grad_weights,
                               const LoRAGradViews& lora_grads, const std::vector<LoRAGradViews>& slice_grads) {
  const auto locks = lock_all(shards);
  backward_over(shards, caches, grad_out, grad_x, grad_weights, lora_grads, slice_grads, nullptr);
}

// The backward over the slices of I that `shards` own (one layer: {this}), as forward_over: what does
// not depend on the slice (grad_out rows and, where the tier's packing does not read the weights, their
// packing, B_d^T G, x rows) once in this layer's workspace; every phase one task list over all slices.
// lg: dA_gu and dB_d (whole); slice_grads[s]: slice s's dB_gu rows and dA_d columns.
void MoELayer::backward_over(const std::vector<MoELayer*>& shards, const std::vector<const ForwardCache*>& caches,
                             const View& grad_out, const View& grad_x, const View& grad_weights,
                             const LoRAGradViews& lg, const std::vector<LoRAGradViews>& slice_grads, PairRows* rows) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, K = c.top_k;
  const std::size_t n = shards.size();
  const ForwardCache& cache = *caches.front();  // the routing and A_gu x
  const Routing& r = cache.routing;
  const std::int64_t T = r.tokens;
  const LoRAViews& lora = cache.lora;  // A_gu, B_d and the scales are the same in every slice
  const int rg = cache.rank_gu, rd = cache.rank_d;
  const DType lora_dtype = rg ? lora.a_gu.dtype : lora.a_d.dtype;
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  Workspace& ws = L.shared->ws;
  for (MoELayer* shard : shards) {
    Impl& S = *shard->impl_;
    if (&S != &L) S.kernels();  // every slice's weights in the active tier's format
    check_call_memory("backward", S.config, T, backward_bytes(S.config, T, rg, rd, pool.size()),
                      S.shared->reserved_bytes);
  }
  const std::int64_t P = r.pairs();
  const auto n_active = static_cast<std::int64_t>(r.active.size());
  const float* wt = r.weight.data();

  const bf16* gb = as_bf16_rows(grad_out, ws.gb, pool);
  const bf16* xb = rg ? as_bf16_rows(cache.x, ws.xb, pool) : nullptr;
  const bf16** g_rows = ws.g_rows.ensure(P);
  const bf16** x_rows = ws.x_rows.ensure(P);
  for (std::int64_t p = 0; p < P; ++p) {
    const std::int64_t t = r.token[p];
    g_rows[p] = gb + t * H;
    x_rows[p] = xb ? xb + t * H : nullptr;
  }
  // Each slice's own rows: h (recomputed), dgu, the <h, v> partials of its blocks, B_gu^T dgu and
  // grad_w of its slice, in its layer's workspace.
  struct Slice {
    const Impl* layer;
    const ForwardCache* cache;  // gu, A_d h and the slice's LoRA
    LoRAGradViews grads;        // dB_gu rows / dA_d columns of the slice
    int I, i_blocks;
    bf16 *hb, *dgu;
    const bf16 **h_rows, **dgu_rows;
    float *gw_part, *bgu, *gw;
  };
  std::vector<Slice> slices;
  std::vector<int> first_block{0};  // B2 tasks of slice s: blocks [first_block[s], first_block[s + 1])
  for (std::size_t s = 0; s < n; ++s) {
    Impl& S = *shards[s]->impl_;
    Workspace& own = S.shared->ws;
    const int I = S.config.intermediate, i_blocks = blocks_of(I, kWideBlock);
    Slice sl{&S, caches[s], slice_grads[s], I, i_blocks, own.hb.ensure(P * I), own.dgu.ensure(P * 2 * I),
             own.h_rows.ensure(P), own.dgu_rows.ensure(P), own.gw_part.ensure(P * i_blocks),
             rg ? own.bgu.ensure(P * rg) : nullptr, own.gw.ensure(P)};
    for (std::int64_t p = 0; p < P; ++p) {
      sl.h_rows[p] = sl.hb + p * I;
      sl.dgu_rows[p] = sl.dgu + p * 2 * I;
    }
    slices.push_back(sl);
    first_block.push_back(first_block.back() + i_blocks);
  }
  build_chunks(r, ws.chunks);
  const auto n_chunks = static_cast<std::int64_t>(ws.chunks.size());
  const int db_d_blocks = blocks_of(H);
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max({rg, rd, 1});
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);

  // B1: B_d^T G per pair (unweighted). A_gu x comes from the forward's cache.
  float* bg = rd ? ws.bg.ensure(P * rd) : nullptr;
  if (rd)
    run_tasks(pool, Stage::bwd_lora_bt, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_bt(static_cast<int>(ch.end - ch.begin), g_rows + ch.begin, expert_slice(lora.b_d, ch.expert), lora_dtype,
                 rd, H, bg + ch.begin * rd);
    });
  const float* ax = cache.ax.data();
  // dB_d = s_d Σ w G ⊗ (A_d h): A_d h summed over the slices.
  const bool want_db_d = rd && lg.db_d;
  const float* ad =
      want_db_d ? sum_pair_rows(pool, Stage::bwd_db_d, P, rd, n, [&](std::size_t s) { return caches[s]->ad.data(); },
                                ws.ad_sums)
                : nullptr;

  // B2: per (expert, slice, I block): v = W_d^T G + s_d A_d^T (B_d^T G); h (recomputed), <h, v>
  // partials, dg/du rounded to bf16 (R5); then the block's rows of dB_gu and columns of dA_d. Extra
  // tasks (expert, H block) compute dB_d. grad_out is packed once where the tier's NN packing does not
  // read the weights, else once per slice (all slices in one task list).
  std::vector<const PackedRows*> gp(n, nullptr);
  if (PackedRows::used_by(kt) && kt.pack_a_nn != nullptr) {
    ws.packed.build(kt, true, r, g_rows, H, pool);
    gp.assign(n, &ws.packed);
  } else if (PackedRows::used_by(kt)) {
    std::vector<PackedRows::Job> jobs;
    for (MoELayer* shard : shards) {
      Impl& S = *shard->impl_;
      jobs.push_back({&S.shared->ws.packed, g_rows, H, {S.down.data(), S.down_stride, S.config.intermediate}});
    }
    PackedRows::build_each(kt, true, r, jobs.data(), jobs.size(), pool);
    for (std::size_t s = 0; s < n; ++s) gp[s] = jobs[s].into;
  }
  const int blocks = first_block.back();
  const std::int64_t main_tasks = n_active * blocks;
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  const std::int64_t tasks = main_tasks + (want_db_d ? n_active * db_d_blocks : 0);
  run_tasks(pool, Stage::bwd_down, tasks, [&](std::int64_t task, int thread) {
    float* tscratch = scratch + thread * scratch_per_thread;
    if (task >= main_tasks) {
      const auto timed = part(Stage::bwd_db_d);
      const std::int64_t t2 = task - main_tasks;
      const int e = r.active[t2 / db_d_blocks];
      const int h0 = static_cast<int>(t2 % db_d_blocks) * kBlock, h1 = std::min(H, h0 + kBlock);
      const std::int64_t b = r.offsets[e];
      kt.lora_grad_b(static_cast<int>(r.rows_of(e)), g_rows + b, wt + b, ad + b * rd, rd, h0, h1, lora.scale_d,
                     expert_slice_mut(lg.db_d, e), lg.db_d.dtype, tscratch);
      return;
    }
    const int e = r.active[task / blocks];
    const int at = static_cast<int>(task % blocks);
    const auto s = static_cast<std::size_t>(std::upper_bound(first_block.begin(), first_block.end(), at) -
                                            first_block.begin() - 1);
    const Slice& S = slices[s];
    const LoRAViews& own_lora = S.cache->lora;
    const int I = S.I, blk = at - first_block[s];
    const int i0 = blk * kWideBlock, i1 = std::min(I, i0 + kWideBlock);
    const int width = i1 - i0;
    const bf16* gu = S.cache->gu.data();
    float* v = tiles + thread * kTileFloats;
    for_each_call(r, e, [&](std::int64_t b, int m) {
      chunk_nn(kt, gp[s], r, e, b, m, g_rows, S.layer->down_of(e), H, I, i0, i1, v, kWideBlock);
      if (rd)
        kt.lora_at_add(m, bg + b * rd, expert_slice(own_lora.a_d, e), lora_dtype, rd, I, i0, i1, lora.scale_d, v,
                       kWideBlock);
      const auto timed_act = part(Stage::bwd_act);
      for (int i = 0; i < m; ++i) {
        const std::int64_t p = b + i;
        const bf16* g = gu + p * 2 * I + i0;
        S.gw_part[p * S.i_blocks + blk] =
            kt.silu_mul_bwd(width, g, g + I, v + i * kWideBlock, wt[p], S.hb + p * I + i0, S.dgu + p * 2 * I + i0,
                            S.dgu + p * 2 * I + I + i0);
      }
    });
    const auto timed = part(Stage::bwd_lora_grads_gu_d);
    const std::int64_t b = r.offsets[e];
    const int m = static_cast<int>(r.rows_of(e));
    if (rg && S.grads.db_gu) {
      void* db = expert_slice_mut(S.grads.db_gu, e);
      kt.lora_grad_b(m, S.dgu_rows + b, nullptr, ax + b * rg, rg, i0, i1, lora.scale_gu, db, S.grads.db_gu.dtype,
                     tscratch);
      kt.lora_grad_b(m, S.dgu_rows + b, nullptr, ax + b * rg, rg, I + i0, I + i1, lora.scale_gu, db,
                     S.grads.db_gu.dtype, tscratch);
    }
    if (rd && S.grads.da_d)
      kt.lora_grad_a(m, bg + b * rd, wt + b, S.h_rows + b, rd, I, i0, i1, lora.scale_d,
                     expert_slice_mut(S.grads.da_d, e), S.grads.da_d.dtype, tscratch);
  });

  // B3: B_gu^T dgu per pair and slice (the slice's rows of B_gu); grad_w of the slice = sum of its <h, v>
  // partials in block order.
  run_tasks(pool, Stage::bwd_lora_bt_gu, n_chunks * static_cast<std::int64_t>(n), [&](std::int64_t task, int) {
    const PairChunk& ch = ws.chunks[task / static_cast<std::int64_t>(n)];
    const Slice& S = slices[static_cast<std::size_t>(task % static_cast<std::int64_t>(n))];
    if (rg)
      kt.lora_bt(static_cast<int>(ch.end - ch.begin), S.dgu_rows + ch.begin,
                 expert_slice(S.cache->lora.b_gu, ch.expert), lora_dtype, rg, 2 * S.I, S.bgu + ch.begin * rg);
    for (std::int64_t p = ch.begin; p < ch.end; ++p) {
      float sum = 0.f;
      for (int blk = 0; blk < S.i_blocks; ++blk) sum += S.gw_part[p * S.i_blocks + blk];
      S.gw[p] = sum;
    }
  });
  if (rows) rows->bgu = slices.front().bgu;  // NUMA shards across nodes: summed over shards by the wrapper

  // B4: per (expert, H block): dx rows = Σ_s W_gu[S_s]^T dgu_s + s_gu A_gu^T (Σ_s B_gu[S_s]^T dgu_s); the
  // block's columns of dA_gu. B5: dx[t] = sum_j dx rows in j order, rounded once (R6). Both per token
  // chunk when the [P, H] dx rows exceed the row budget (token_chunks.hpp): W_gu is then read once per
  // chunk, and dA_gu (all of an expert's rows) runs apart.
  const float* bgu =
      rg ? sum_pair_rows(pool, Stage::bwd_lora_bt_gu, P, rg, n, [&](std::size_t s) { return slices[s].bgu; },
                         ws.bgu_sums)
         : nullptr;
  std::vector<SliceRows> dx;
  for (MoELayer* shard : shards) dx.push_back(shard->impl_->dx_slice(shard->impl_->shared->ws));
  dx_and_combine(kt, pool, ws, r, dx, bgu, x_rows, lora, rg, lg.da_gu, H, K, grad_x);
  // grad_w written for every slot: Σ_s of the slices' sums in slice order.
  if (grad_weights)
    for (std::int64_t slot = 0; slot < T * K; ++slot) {
      const std::int64_t row = r.row_of_slot[slot];
      float sum = 0.f;
      if (row >= 0 && n == 1) sum = slices.front().gw[row];
      else if (row >= 0)
        for (const Slice& S : slices) sum += S.gw[row];
      store_value(grad_weights.data, grad_weights.dtype, slot, sum);
    }

  // Experts that received no pair: their LoRA gradients are exactly zero.
  std::vector<char> has_rows(E, 0);
  for (int e : r.active) has_rows[e] = 1;
  std::vector<const View*> grads{&lg.da_gu, &lg.db_d};
  for (const Slice& S : slices) grads.insert(grads.end(), {&S.grads.db_gu, &S.grads.da_d});
  for (const View* grad : grads) {
    if (!*grad) continue;
    const std::size_t bytes = static_cast<std::size_t>(grad->shape[1] * grad->shape[2]) * dtype_size(grad->dtype);
    for (int e = 0; e < E; ++e)
      if (!has_rows[e]) std::memset(expert_slice_mut(*grad, e), 0, bytes);
  }
}

}  // namespace kt::moe
