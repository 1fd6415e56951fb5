// MoELayer::shard_round0_*: round 0 of a sharded call on one node (round_zero.hpp, ADR 0701 "One-node
// cost"). The packing of x / grad_out and A_gu x / B_d^T G do not depend on a shard's slice; instead
// of every shard computing all of them, they are computed once, on the shards' one pool, with the
// kernels and chunks each shard's own call would have used, into one shared copy.
#include "round_zero.hpp"

namespace kt::moe {

namespace {

// Sorted pair p's row of `rows` ([T, H] bf16): the row pointers the packing and LoRA kernels read.
const bf16** pair_rows(const Routing& r, const bf16* rows, std::int64_t H, Buffer<const bf16*>& storage) {
  const std::int64_t P = r.pairs();
  const bf16** out = storage.ensure(static_cast<std::size_t>(std::max<std::int64_t>(P, 1)));
  for (std::int64_t p = 0; p < P; ++p) out[p] = rows + static_cast<std::int64_t>(r.token[p]) * H;
  return out;
}

}  // namespace

void MoELayer::shard_round0_plan(RoundZero& z, const ForwardCache* backward_of, int rank) {
  z.route = backward_of ? &backward_of->routing : &z.routing;
  const Routing& r = *z.route;
  z.lora = rank > 0;
  if (z.lora) z.lora_rows.ensure(static_cast<std::size_t>(std::max<std::int64_t>(r.pairs() * rank, 1)));
  build_chunks(r, z.pair_chunks);
}

void MoELayer::shard_round0_forward(const View& x, const LoRAViews& lora, RoundZero& z) {
  Impl& L = *impl_;
  const int H = L.config.hidden;
  const Routing& r = *z.route;
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  const bf16** x_rows = pair_rows(r, as_bf16_rows(x, ws.xb, pool), H, ws.x_rows);
  z.packs = z.packed.build(kt, false, r, x_rows, H, pool);
  if (!z.lora) return;
  const int rg = static_cast<int>(lora.a_gu.shape[1]);
  float* ax = z.lora_rows.data();
  run_tasks(pool, Stage::lora_a_gu, static_cast<std::int64_t>(z.pair_chunks.size()), [&](std::int64_t task, int) {
    const PairChunk& ch = z.pair_chunks[static_cast<std::size_t>(task)];
    kt.lora_a(static_cast<int>(ch.end - ch.begin), x_rows + ch.begin, expert_slice(lora.a_gu, ch.expert),
              lora.a_gu.dtype, rg, H, ax + ch.begin * rg);
  });
}

void MoELayer::shard_round0_backward(const ForwardCache& cache, const View& grad_out, RoundZero& z) {
  Impl& L = *impl_;
  const int H = L.config.hidden;
  const Routing& r = *z.route;
  const LoRAViews& lora = cache.lora;  // B_d is the caller's (sharded_layer.cpp re-points it)
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
  const bf16** g_rows = pair_rows(r, as_bf16_rows(grad_out, ws.gb, pool), H, ws.g_rows);
  // The NN packing is shared only where it does not read the shard's weights.
  z.packs = kt.pack_a_nn != nullptr && z.packed.build(kt, true, r, g_rows, H, pool);
  if (!z.lora) return;
  const int rd = cache.rank_d;
  const DType lora_dtype = cache.rank_gu ? lora.a_gu.dtype : lora.a_d.dtype;  // as the backward reads it
  float* bg = z.lora_rows.data();
  run_tasks(pool, Stage::bwd_lora_bt, static_cast<std::int64_t>(z.pair_chunks.size()), [&](std::int64_t task, int) {
    const PairChunk& ch = z.pair_chunks[static_cast<std::size_t>(task)];
    kt.lora_bt(static_cast<int>(ch.end - ch.begin), g_rows + ch.begin, expert_slice(lora.b_d, ch.expert),
               lora_dtype, rd, H, bg + ch.begin * rd);
  });
}

}  // namespace kt::moe
