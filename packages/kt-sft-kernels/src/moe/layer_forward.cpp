// MoELayer::forward: routing, the gate/up GEMMs with LoRA, SwiGLU, down, the weighted combine
// (docs/kernels.md lists the phases and rounding points).
#include "layer_internal.hpp"

namespace kt::moe {

// ---- forward -------------------------------------------------------------------------------------------

ForwardCachePtr MoELayer::forward(const View& x, const View& ids, const View& weights, const View& out,
                                  const LoRAViews& lora, bool save) {
  validate_forward(impl_->config, x, ids, weights, out, lora);
  return forward_validated(x, ids, weights, out, lora, save);
}

ForwardCachePtr MoELayer::forward_validated(const View& x, const View& ids, const View& weights, const View& out,
                                            const LoRAViews& lora, bool save) {
  Impl& L = *impl_;
  if (!L.loaded) throw std::logic_error("MoELayer.forward: call load_weights() first");
  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::forward, prof::Kind::wall);
  if (L.sharded) {
    std::shared_ptr<ShardedCache> shards = L.sharded->forward(x, ids, weights, out, lora, save);
    if (!save) return nullptr;
    ForwardCachePtr cache(new ForwardCache);
    cache->layer = this;
    cache->routing.tokens = x.shape[0];
    cache->x = x;
    cache->lora = lora;
    cache->rank_gu = lora.a_gu ? static_cast<int>(lora.a_gu.shape[1]) : 0;
    cache->rank_d = lora.a_d ? static_cast<int>(lora.a_d.shape[1]) : 0;
    cache->shards = std::move(shards);
    return cache;
  }
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  std::vector<ForwardCachePtr> caches = forward_over({this}, {lora}, x, ids, weights, out, save);
  return std::move(caches.front());
}

std::vector<ForwardCachePtr> MoELayer::forward_shards(const std::vector<MoELayer*>& shards,
                                                      const std::vector<LoRAViews>& loras, const View& x,
                                                      const View& ids, const View& weights, const View& out,
                                                      bool save) {
  const auto locks = lock_all(shards);
  return forward_over(shards, loras, x, ids, weights, out, save);
}

// The forward over the slices of I that `shards` own (one layer: {this}, its own I), on this layer's
// pool; what does not depend on the slice (routing, x rows and their packing, A_gu x) is computed once,
// in this layer's workspace (and cache), and every phase is one task list over all slices.
std::vector<ForwardCachePtr> MoELayer::forward_over(const std::vector<MoELayer*>& shards,
                                                    const std::vector<LoRAViews>& loras, const View& x,
                                                    const View& ids, const View& weights, const View& out,
                                                    bool save) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, K = c.top_k;
  const std::size_t n = shards.size();
  const LoRAViews& lora = loras.front();  // A_gu, B_d and the scales are the same in every slice
  const std::int64_t T = x.shape[0];
  const int rg = lora.a_gu ? static_cast<int>(lora.a_gu.shape[1]) : 0;
  const int rd = lora.a_d ? static_cast<int>(lora.a_d.shape[1]) : 0;
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  Workspace& ws = L.shared->ws;
  for (MoELayer* shard : shards) {
    Impl& S = *shard->impl_;
    if (&S != &L) S.kernels();  // every slice's weights in the active tier's format
    check_call_memory("forward", S.config, T, forward_bytes(S.config, T, rg, rd, save, pool.size()),
                      S.shared->reserved_bytes);
  }

  std::vector<ForwardCachePtr> caches(n);
  for (std::size_t s = 0; save && s < n; ++s) {
    ForwardCachePtr& cache = caches[s];
    cache.reset(new ForwardCache);
    cache->recycler = shards[s]->impl_->recycler;
    cache->recycler->take(cache->gu, cache->ad, cache->ax);
    cache->layer = shards[s];
    cache->x = x;
    cache->lora = loras[s];
    cache->rank_gu = rg;
    cache->rank_d = rd;
  }
  Routing& r = save ? caches.front()->routing : ws.routing;  // the first cache keeps what slices share
  {
    const prof::Scope timed(Stage::route, prof::Kind::wall);
    build_routing(ids, weights, E, r);
  }
  const std::int64_t P = r.pairs();
  const auto n_active = static_cast<std::int64_t>(r.active.size());

  const bf16* xb = as_bf16_rows(x, ws.xb, pool);
  const bf16** x_rows = ws.x_rows.ensure(P);
  for (std::int64_t p = 0; p < P; ++p) x_rows[p] = xb + static_cast<std::int64_t>(r.token[p]) * H;
  // Each slice's own rows: gu (cached), h, A_d h (cached), in its layer's workspace / cache.
  struct Slice {
    const Impl* layer;
    const LoRAViews* lora;
    int I, i_blocks;
    bf16 *gu, *hb;
    float* ad;
  };
  std::vector<Slice> slices;
  std::vector<int> first_block{0};  // F2 tasks of slice s: blocks [first_block[s], first_block[s + 1])
  for (std::size_t s = 0; s < n; ++s) {
    Impl& S = *shards[s]->impl_;
    Workspace& own = S.shared->ws;
    const int I = S.config.intermediate;
    bf16* hb = own.hb.ensure(P * I);
    const bf16** h_rows = own.h_rows.ensure(P);
    for (std::int64_t p = 0; p < P; ++p) h_rows[p] = hb + p * I;
    bf16* gu = save ? caches[s]->gu.ensure(P * 2 * I) : own.gu.ensure(P * 2 * I);
    float* ad = rd ? (save ? caches[s]->ad.ensure(P * rd) : own.ad.ensure(P * rd)) : nullptr;
    slices.push_back({&S, &loras[s], I, blocks_of(I, kGateUpBlock), gu, hb, ad});
    first_block.push_back(first_block.back() + slices.back().i_blocks);
  }
  build_chunks(r, ws.chunks);
  const auto n_chunks = static_cast<std::int64_t>(ws.chunks.size());
  const DType lora_dtype = rg ? lora.a_gu.dtype : lora.a_d.dtype;

  // F1: A_gu x per pair (fp32, kept unrounded).
  float* ax = rg ? (save ? caches.front()->ax.ensure(P * rg) : ws.ax.ensure(P * rg)) : nullptr;
  if (rg)
    run_tasks(pool, Stage::lora_a_gu, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_a(static_cast<int>(ch.end - ch.begin), x_rows + ch.begin, expert_slice(lora.a_gu, ch.expert),
                lora_dtype, rg, H, ax + ch.begin * rg);
    });

  // F2: gate and up rows of one column block of one slice, + LoRA, rounded to bf16 (R1); h = silu(g) u
  // (R2). Tasks by expert first, so an expert's packed x is read by all its blocks at about one time.
  const PackedRows* xp = ws.packed.build(kt, false, r, x_rows, H, pool) ? &ws.packed : nullptr;
  const int blocks = first_block.back();
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  run_tasks(pool, Stage::gate_up, n_active * blocks, [&](std::int64_t task, int thread) {
    const int e = r.active[task / blocks];
    const int at = static_cast<int>(task % blocks);
    const auto s = static_cast<std::size_t>(std::upper_bound(first_block.begin(), first_block.end(), at) -
                                            first_block.begin() - 1);
    const Slice& S = slices[s];
    const int I = S.I;
    const int i0 = (at - first_block[s]) * kGateUpBlock, i1 = std::min(I, i0 + kGateUpBlock);
    const int width = i1 - i0;
    const void* w = S.layer->gate_up_of(e);
    float* tile = tiles + thread * kTileFloats;  // [row][gate block | up block]
    constexpr std::int64_t ld = 2 * kGateUpBlock;
    for_each_call(r, e, [&](std::int64_t b, int m) {
      chunk_nt(kt, xp, r, e, b, m, x_rows, w, 2 * I, H, i0, i1, tile, ld);
      chunk_nt(kt, xp, r, e, b, m, x_rows, w, 2 * I, H, I + i0, I + i1, tile + kGateUpBlock, ld);
      if (rg) {
        const auto timed = part(Stage::lora_b);
        const void* bm = expert_slice(S.lora->b_gu, e);
        kt.lora_b_add(m, ax + b * rg, bm, lora_dtype, rg, i0, i1, lora.scale_gu, tile, ld);
        kt.lora_b_add(m, ax + b * rg, bm, lora_dtype, rg, I + i0, I + i1, lora.scale_gu, tile + kGateUpBlock, ld);
      }
      const auto timed_act = part(Stage::act);
      for (int i = 0; i < m; ++i) {
        bf16* g = S.gu + (b + i) * 2 * I + i0;
        kt.silu_mul(width, tile + i * ld, tile + i * ld + kGateUpBlock, g, g + I, S.hb + (b + i) * I + i0);
      }
    });
  });

  // F3: A_d h per pair and slice (fp32; cached for the backward): the slice's columns of A_d.
  if (rd)
    run_tasks(pool, Stage::lora_a_d, n_chunks * static_cast<std::int64_t>(n), [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task / static_cast<std::int64_t>(n)];
      const Slice& S = slices[static_cast<std::size_t>(task % static_cast<std::int64_t>(n))];
      kt.lora_a(static_cast<int>(ch.end - ch.begin), S.layer->shared->ws.h_rows.data() + ch.begin,
                expert_slice(S.lora->a_d, ch.expert), lora_dtype, rd, S.I, S.ad + ch.begin * rd);
    });

  // F4: y = Σ_s W_d[:, S_s] h_s + s_d B_d (Σ_s A_d[:, S_s] h_s) per pair, fp32 rows; F5: out[t] =
  // sum_j w[t, j] y[t, j] in j order (fp32), rounded once (R3). Both per token chunk when the [P, H]
  // rows exceed the row budget (token_chunks.hpp): then W_d is read once per chunk.
  const float* ad =
      rd ? sum_pair_rows(pool, Stage::lora_a_d, P, rd, n, [&](std::size_t s) { return slices[s].ad; }, ws.ad_sums)
         : nullptr;
  std::vector<SliceRows> down;
  for (MoELayer* shard : shards) down.push_back(shard->impl_->down_slice(shard->impl_->shared->ws));
  down_and_combine(kt, pool, ws, r, down, ad, lora, H, K, out);
  return caches;
}

}  // namespace kt::moe
