// MoELayer::forward: routing, the gate/up GEMMs with LoRA, SwiGLU, down, the weighted combine
// (docs/kernels.md lists the phases and rounding points).
#include "layer_internal.hpp"
#include "round_zero.hpp"

namespace kt::moe {

// ---- forward -------------------------------------------------------------------------------------------

ForwardCachePtr MoELayer::forward(const View& x, const View& ids, const View& weights, const View& out,
                                  const LoRAViews& lora, bool save) {
  validate_forward(impl_->config, x, ids, weights, out, lora);
  return forward_validated(x, ids, weights, out, lora, save);
}

ForwardCachePtr MoELayer::forward_validated(const View& x, const View& ids, const View& weights, const View& out,
                                            const LoRAViews& lora, bool save, PairRows* rows) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, K = c.top_k;
  if (!L.loaded) throw std::logic_error("MoELayer.forward: call load_weights() first");
  const std::int64_t T = x.shape[0];
  const int rg = lora.a_gu ? static_cast<int>(lora.a_gu.shape[1]) : 0;
  const int rd = lora.a_d ? static_cast<int>(lora.a_d.shape[1]) : 0;

  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::forward, prof::Kind::wall);
  if (L.sharded) {
    std::shared_ptr<ShardedCache> shards = L.sharded->forward(x, ids, weights, out, lora, save);
    if (!save) return nullptr;
    ForwardCachePtr cache(new ForwardCache);
    cache->layer = this;
    cache->routing.tokens = T;
    cache->x = x;
    cache->lora = lora;
    cache->rank_gu = rg;
    cache->rank_d = rd;
    cache->shards = std::move(shards);
    return cache;
  }
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  check_call_memory("forward", c, T, forward_bytes(c, T, rg, rd, save, pool.size()), L.shared->reserved_bytes);

  ForwardCachePtr cache;
  if (save) {
    cache.reset(new ForwardCache);
    cache->recycler = L.recycler;
    L.recycler->take(cache->gu, cache->ad, cache->ax);
    cache->layer = this;
    cache->x = x;
    cache->lora = lora;
    cache->rank_gu = rg;
    cache->rank_d = rd;
  }
  Routing& r = save ? cache->routing : ws.routing;
  const RoundZero* z = rows ? rows->shared : nullptr;  // NUMA shards on one node: round 0's results
  {
    const prof::Scope timed(Stage::route, prof::Kind::wall);
    if (z) r = *z->route;
    else build_routing(ids, weights, E, r);
  }
  const std::int64_t P = r.pairs();
  const auto n_active = static_cast<std::int64_t>(r.active.size());

  const bf16* xb = as_bf16_rows(x, ws.xb, pool);
  const bf16** x_rows = ws.x_rows.ensure(P);
  bf16* gu = save ? cache->gu.ensure(P * 2 * I) : ws.gu.ensure(P * 2 * I);
  bf16* hb = ws.hb.ensure(P * I);
  const bf16** h_rows = ws.h_rows.ensure(P);
  for (std::int64_t p = 0; p < P; ++p) {
    x_rows[p] = xb + static_cast<std::int64_t>(r.token[p]) * H;
    h_rows[p] = hb + p * I;
  }
  build_chunks(r, ws.chunks);
  const auto n_chunks = static_cast<std::int64_t>(ws.chunks.size());
  const DType lora_dtype = rg ? lora.a_gu.dtype : lora.a_d.dtype;

  // F1: A_gu x per pair (fp32, kept unrounded).
  float* ax = rg ? (save ? cache->ax.ensure(P * rg) : ws.ax.ensure(P * rg)) : nullptr;
  if (rg && z && z->lora)
    std::memcpy(ax, z->lora_rows.data(), static_cast<std::size_t>(P * rg) * sizeof(float));
  else if (rg)
    run_tasks(pool, Stage::lora_a_gu, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_a(static_cast<int>(ch.end - ch.begin), x_rows + ch.begin, expert_slice(lora.a_gu, ch.expert),
                lora_dtype, rg, H, ax + ch.begin * rg);
    });

  // F2: gate and up rows of one column block, + LoRA, rounded to bf16 (R1); h = silu(g) u (R2).
  const int i_blocks = blocks_of(I, kGateUpBlock);
  const PackedRows* xp = z && z->packs                                 ? &z->packed
                         : ws.packed.build(kt, false, r, x_rows, H, pool) ? &ws.packed
                                                                          : nullptr;
  float* tiles = ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * kTileFloats);
  run_tasks(pool, Stage::gate_up, n_active * i_blocks, [&](std::int64_t task, int thread) {
    const int e = r.active[task / i_blocks];
    const int i0 = static_cast<int>(task % i_blocks) * kGateUpBlock, i1 = std::min(I, i0 + kGateUpBlock);
    const int width = i1 - i0;
    const void* w = L.gate_up_of(e);
    float* tile = tiles + thread * kTileFloats;  // [row][gate block | up block]
    constexpr std::int64_t ld = 2 * kGateUpBlock;
    for_each_call(r, e, [&](std::int64_t b, int m) {
      chunk_nt(kt, xp, r, e, b, m, x_rows, w, 2 * I, H, i0, i1, tile, ld);
      chunk_nt(kt, xp, r, e, b, m, x_rows, w, 2 * I, H, I + i0, I + i1, tile + kGateUpBlock, ld);
      if (rg) {
        const auto timed = part(Stage::lora_b);
        const void* bm = expert_slice(lora.b_gu, e);
        kt.lora_b_add(m, ax + b * rg, bm, lora_dtype, rg, i0, i1, lora.scale_gu, tile, ld);
        kt.lora_b_add(m, ax + b * rg, bm, lora_dtype, rg, I + i0, I + i1, lora.scale_gu, tile + kGateUpBlock, ld);
      }
      const auto timed_act = part(Stage::act);
      for (int i = 0; i < m; ++i) {
        bf16* g = gu + (b + i) * 2 * I + i0;
        kt.silu_mul(width, tile + i * ld, tile + i * ld + kGateUpBlock, g, g + I, hb + (b + i) * I + i0);
      }
    });
  });

  // F3: A_d h per pair (fp32; cached for the backward).
  float* ad = rd ? (save ? cache->ad.ensure(P * rd) : ws.ad.ensure(P * rd)) : nullptr;
  if (rd)
    run_tasks(pool, Stage::lora_a_d, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_a(static_cast<int>(ch.end - ch.begin), h_rows + ch.begin, expert_slice(lora.a_d, ch.expert),
                lora_dtype, rd, I, ad + ch.begin * rd);
    });

  // F4: y = W_d h + s_d B_d (A_d h) per pair, fp32 rows; F5: out[t] = sum_j w[t, j] y[t, j] in j order
  // (fp32), rounded once (R3). Both per token chunk when the [P, H] rows exceed the row budget
  // (token_chunks.hpp): then W_d is read once per chunk.
  if (rows && rows->split_down) {  // NUMA shards on one node: MoELayer::shard_down runs F4 and F5 for
    rows->routing = &r;             // all shards (the h rows stay in this pool's workspace)
    rows->ad = ad;
    return cache;
  }
  std::vector<SliceRows> all_of_i{L.down_slice(ws)};
  down_and_combine(kt, pool, ws, r, all_of_i, ad, lora, H, K, out);
  return cache;
}

}  // namespace kt::moe
