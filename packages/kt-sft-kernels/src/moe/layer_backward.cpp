// MoELayer::backward: from the forward's cache, grad_x, grad_weights and the LoRA gradients
// (docs/kernels.md lists the phases and rounding points).
#include "layer_internal.hpp"
#include "round_zero.hpp"

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
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, K = c.top_k;
  const Routing& r = cache.routing;
  const std::int64_t T = r.tokens;
  const LoRAViews& lora = cache.lora;
  const int rg = cache.rank_gu, rd = cache.rank_d;
  const DType lora_dtype = rg ? lora.a_gu.dtype : lora.a_d.dtype;

  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::backward, prof::Kind::wall);
  if (L.sharded) return L.sharded->backward(*cache.shards, cache.x, cache.lora, grad_out, grad_x, grad_weights, lg);
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  check_call_memory("backward", c, T, backward_bytes(c, T, rg, rd, pool.size()), L.shared->reserved_bytes);
  const std::int64_t P = r.pairs();
  const auto n_active = static_cast<std::int64_t>(r.active.size());
  const bf16* gu = cache.gu.data();
  const float* ad = cache.ad.data();
  const float* wt = r.weight.data();

  const bf16* gb = as_bf16_rows(grad_out, ws.gb, pool);
  const bf16* xb = rg ? as_bf16_rows(cache.x, ws.xb, pool) : nullptr;
  const bf16** g_rows = ws.g_rows.ensure(P);
  const bf16** x_rows = ws.x_rows.ensure(P);
  const bf16** h_rows = ws.h_rows.ensure(P);
  const bf16** dgu_rows = ws.dgu_rows.ensure(P);
  bf16* hb = ws.hb.ensure(P * I);
  bf16* dgu = ws.dgu.ensure(P * 2 * I);
  for (std::int64_t p = 0; p < P; ++p) {
    const std::int64_t t = r.token[p];
    g_rows[p] = gb + t * H;
    x_rows[p] = xb ? xb + t * H : nullptr;
    h_rows[p] = hb + p * I;
    dgu_rows[p] = dgu + p * 2 * I;
  }
  build_chunks(r, ws.chunks);
  const auto n_chunks = static_cast<std::int64_t>(ws.chunks.size());
  const int i_blocks = blocks_of(I, kWideBlock), db_d_blocks = blocks_of(H);
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max({rg, rd, 1});
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);

  // B1: B_d^T G per pair (unweighted). A_gu x comes from the forward's cache. NUMA shards on one
  // node: round 0 computed B_d^T G (and packed grad_out) once for all shards.
  const RoundZero* z = rows ? rows->shared : nullptr;
  const float* bg = rd && z && z->lora ? z->lora_rows.data() : nullptr;
  const float* ax = cache.ax.data();
  if (rd && !bg) {
    float* own = ws.bg.ensure(P * rd);
    run_tasks(pool, Stage::bwd_lora_bt, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_bt(static_cast<int>(ch.end - ch.begin), g_rows + ch.begin, expert_slice(lora.b_d, ch.expert), lora_dtype,
                 rd, H, own + ch.begin * rd);
    });
    bg = own;
  }

  // B2: per (expert, I block): v = W_d^T G + s_d A_d^T (B_d^T G); h (recomputed), <h, v> partials,
  // dg/du rounded to bf16 (R5); then the block's rows of dB_gu and columns of dA_d. Extra tasks
  // (expert, H block) compute dB_d.
  float* gw_part = ws.gw_part.ensure(P * i_blocks);
  const bool want_db_d = rd && lg.db_d;
  const std::int64_t main_tasks = n_active * i_blocks;
  const PackedRows* gp = z && z->packs ? &z->packed
                         : ws.packed.build(kt, true, r, g_rows, H, pool, {L.down.data(), L.down_stride, I}) ? &ws.packed
                                                                                                           : nullptr;
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  run_tasks(pool, Stage::bwd_down, main_tasks + (want_db_d ? n_active * db_d_blocks : 0), [&](std::int64_t task, int thread) {
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
    const int e = r.active[task / i_blocks];
    const int blk = static_cast<int>(task % i_blocks);
    const int i0 = blk * kWideBlock, i1 = std::min(I, i0 + kWideBlock);
    const int width = i1 - i0;
    float* v = tiles + thread * kTileFloats;
    for_each_call(r, e, [&](std::int64_t b, int m) {
      chunk_nn(kt, gp, r, e, b, m, g_rows, L.down_of(e), H, I, i0, i1, v, kWideBlock);
      if (rd)
        kt.lora_at_add(m, bg + b * rd, expert_slice(lora.a_d, e), lora_dtype, rd, I, i0, i1, lora.scale_d, v,
                       kWideBlock);
      const auto timed_act = part(Stage::bwd_act);
      for (int i = 0; i < m; ++i) {
        const std::int64_t p = b + i;
        const bf16* g = gu + p * 2 * I + i0;
        gw_part[p * i_blocks + blk] = kt.silu_mul_bwd(width, g, g + I, v + i * kWideBlock, wt[p], hb + p * I + i0,
                                                      dgu + p * 2 * I + i0, dgu + p * 2 * I + I + i0);
      }
    });
    const auto timed = part(Stage::bwd_lora_grads_gu_d);
    const std::int64_t b = r.offsets[e];
    const int m = static_cast<int>(r.rows_of(e));
    if (rg && lg.db_gu) {
      void* db = expert_slice_mut(lg.db_gu, e);
      kt.lora_grad_b(m, dgu_rows + b, nullptr, ax + b * rg, rg, i0, i1, lora.scale_gu, db, lg.db_gu.dtype, tscratch);
      kt.lora_grad_b(m, dgu_rows + b, nullptr, ax + b * rg, rg, I + i0, I + i1, lora.scale_gu, db, lg.db_gu.dtype,
                     tscratch);
    }
    if (rd && lg.da_d)
      kt.lora_grad_a(m, bg + b * rd, wt + b, h_rows + b, rd, I, i0, i1, lora.scale_d, expert_slice_mut(lg.da_d, e),
                     lg.da_d.dtype, tscratch);
  });

  // B3: B_gu^T dgu per pair; grad_w = sum of the <h, v> partials in block order.
  float* bgu = rg ? ws.bgu.ensure(P * rg) : nullptr;
  float* gw = ws.gw.ensure(P);
  run_tasks(pool, Stage::bwd_lora_bt_gu, n_chunks, [&](std::int64_t task, int) {
    const PairChunk& ch = ws.chunks[task];
    if (rg)
      kt.lora_bt(static_cast<int>(ch.end - ch.begin), dgu_rows + ch.begin, expert_slice(lora.b_gu, ch.expert),
                 lora_dtype, rg, 2 * I, bgu + ch.begin * rg);
    for (std::int64_t p = ch.begin; p < ch.end; ++p) {
      float sum = 0.f;
      for (int blk = 0; blk < i_blocks; ++blk) sum += gw_part[p * i_blocks + blk];
      gw[p] = sum;
    }
  });

  // B4: per (expert, H block): dx rows = W_gu^T dgu + s_gu A_gu^T (B_gu^T dgu); the block's columns of dA_gu.
  // B5: dx[t] = sum_j dx rows in j order, rounded once (R6); grad_w written for every slot.
  // NUMA shards on one node (rows->split_down): MoELayer::shard_dx runs B4 and B5 for all shards (the
  // dgu rows stay in this pool's workspace), the wrapper grad_w (sharded_layer.cpp).
  // B4's dx product and B5 run per token chunk when the [P, H] dx rows exceed the row budget
  // (token_chunks.hpp): W_gu is then read once per chunk, and dA_gu (all of an expert's rows) runs apart.
  const bool split = rows && rows->split_down;
  if (rows) {
    rows->routing = &r;
    rows->grad_w = gw;
    rows->row_of_slot = r.row_of_slot.data();
    rows->weight = r.weight.data();
    rows->bgu = bgu;
  }
  if (!split) {
    std::vector<SliceRows> all_of_i{L.dx_slice(ws)};
    dx_and_combine(kt, pool, ws, r, all_of_i, bgu, x_rows, lora, rg, lg.da_gu, H, K, grad_x);
  }
  if (grad_weights && !split)
    for (std::int64_t s = 0; s < T * K; ++s) {
      const std::int64_t row = r.row_of_slot[s];
      store_value(grad_weights.data, grad_weights.dtype, s, row < 0 ? 0.f : gw[row]);
    }

  // Experts that received no pair: their LoRA gradients are exactly zero.
  std::vector<char> has_rows(E, 0);
  for (int e : r.active) has_rows[e] = 1;
  for (const View* grad : {&lg.da_gu, &lg.db_gu, &lg.da_d, &lg.db_d}) {
    if (!*grad) continue;
    const std::size_t bytes = static_cast<std::size_t>(grad->shape[1] * grad->shape[2]) * dtype_size(grad->dtype);
    for (int e = 0; e < E; ++e)
      if (!has_rows[e]) std::memset(expert_slice_mut(*grad, e), 0, bytes);
  }
}

}  // namespace kt::moe
