// F4 + F5 and B4 + B5 (docs/kernels.md): the products that sum over the intermediate dimension — the
// forward's y = W_d h (+ LoRA), the backward's dx rows = W_gu^T dgu (+ LoRA) — and the combine of their
// [P, H] fp32 rows into out / grad_x. One layer passes its whole I as one slice; the NUMA shards of one
// node pass one slice a shard (layer_shard.cpp, ADR 0701), summed in shard order. Both run per token
// chunk when the rows exceed the row budget (token_chunks.hpp, ADR 0405), each slice's rows re-packed
// per chunk, all slices in one task list.
#include "layer_internal.hpp"

namespace kt::moe {

namespace {

// out [m rows, width] (row stride H) = Σ_s product(s) in slice order, fp32, for tiers without a summed
// entry: slice 0's product is written in place, every other one into `tile` ([m, width]) and added.
template <class Product>
void sum_in_slice_order(std::size_t slices, int m, int width, int H, float* out, float* tile, Product product) {
  for (std::size_t s = 0; s < slices; ++s) {
    product(s, s == 0 ? out : tile, s == 0 ? std::int64_t{H} : std::int64_t{width});
    if (s > 0)
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < width; ++c) out[static_cast<std::int64_t>(i) * H + c] += tile[i * width + c];
  }
}

// Each slice's rows of token chunk tc (SliceRows::chunk) and, for tiers that pack rows, their packing:
// all slices in one task list. True when packed.
bool chunk_slices(const KernelTable& kt, bool nn, const TokenChunk& tc, std::vector<SliceRows>& slices,
                  runtime::ThreadPool& pool) {
  std::vector<PackedRows::Job> jobs;
  for (SliceRows& s : slices) {
    s.chunk = rows_of_chunk(tc, s.rows, *s.chunk_rows);
    jobs.push_back({s.packed, s.chunk, s.k, nn ? s.w : ExpertMatrices{}});
  }
  return PackedRows::build_each(kt, nn, *tc.rows, jobs.data(), jobs.size(), pool);
}

// Expert e's GEMM call at sorted row b in every slice: the segments of one reduction, in slice order.
const PackedSegment* segments_of(const std::vector<SliceRows>& slices, const Routing& sr, int e, std::int64_t b) {
  thread_local std::vector<PackedSegment> segs;  // grows once per thread
  segs.clear();
  for (const SliceRows& s : slices) segs.push_back({s.packed->at(sr, e, b), s.w.of(e), s.k});
  return segs.data();
}

// c[m, h0:h1) (row stride H) = expert e's call at sorted row b summed over the slices: rows W_s^T (down,
// a short piece in its call's form) or rows W_s (dx, nn). One reduction over all slices where the tier
// has the segment entry (`summed`), else slice by slice. `tile`: a thread's scratch, the other slices'
// products (kTileFloats, several slices without `summed`) and then a short piece's padded call (down).
void product_over_slices(const KernelTable& kt, bool nn, bool summed, bool packed, const std::vector<SliceRows>& slices,
                         const Routing& r, const Routing& sr, int e, std::int64_t b, int m, int H, int h0, int h1,
                         float* tile, float* c) {
  const int n = static_cast<int>(slices.size());
  if (summed) {
    const PackedSegment* seg = segments_of(slices, sr, e, b);
    if (nn) kt.gemm_nn_packed_segments(m, seg, n, H, h0, h1, c, H);
    else kt.gemm_nt_packed_segments(m, seg, n, H, h0, h1, c, H);
    return;
  }
  float* padded = tile + (n > 1 ? kTileFloats : 0);
  sum_in_slice_order(slices.size(), m, h1 - h0, H, c, tile, [&](std::size_t s, float* dst, std::int64_t ld) {
    const SliceRows& sl = slices[s];
    const PackedRows* rows = packed ? sl.packed : nullptr;
    if (nn) chunk_nn(kt, rows, sr, e, b, m, sl.chunk, sl.w.of(e), sl.k, H, h0, h1, dst, ld);
    else
      chunk_nt_in_call_form(kt, rows, sr, e, b, m, r.rows_of(e), sl.chunk, sl.w.of(e), H, sl.k, h0, h1, padded, dst,
                            ld);
  });
}

// fp32 scratch of `floats` a thread, in the workspace's tiles.
struct ThreadTiles {
  float* base;
  std::size_t stride;
  float* of(int thread) const { return base + static_cast<std::size_t>(thread) * stride; }
};
ThreadTiles thread_tiles(Workspace& ws, runtime::ThreadPool& pool, std::size_t floats) {
  return {ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * std::max<std::size_t>(floats, 1)), floats};
}

// Per token chunk of r: each slice's rows of the chunk (packed where the tier packs), then the chunk's
// [P, H] fp32 rows by (expert, `block` columns) tasks — the product over the slices of each GEMM call,
// then add(tc, e, b, m, h0, h1, c) on its rows, then done(tc, e, h0, h1, thread) per task — then the
// combine of the rows into dst (weight(row) per pair, in j order, rounded once).
template <class Add, class Done, class Weight>
void rows_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                      std::vector<SliceRows>& slices, bool nn, Stage stage, Stage combine, int block, int H, int K,
                      const View& dst, Add add, Done done, Weight weight) {
  const bool summed = slices.size() > 1 && PackedRows::used_by(kt) &&
                      (nn ? kt.gemm_nn_packed_segments != nullptr : kt.gemm_nt_packed_segments != nullptr);
  const int blocks = blocks_of(H, block);
  const bool adds = slices.size() > 1 && !summed;  // room for the other slices' products (a call's block)
  const std::size_t padded = nn ? 0 : static_cast<std::size_t>(kSameFormRows) * block;  // a short piece's call
  const ThreadTiles tiles = thread_tiles(ws, pool, (adds ? kTileFloats : 0) + padded);
  ws.token_chunk.for_each(r, H, [&](const TokenChunk& tc) {
    const Routing& sr = *tc.rows;
    const bool packed = chunk_slices(kt, nn, tc, slices, pool);
    float* rows = ws.rows.ensure(static_cast<std::size_t>(std::max<std::int64_t>(sr.pairs(), 1)) * H);
    run_tasks(pool, stage, static_cast<std::int64_t>(sr.active.size()) * blocks, [&](std::int64_t task, int thread) {
      const int e = sr.active[task / blocks];
      const int h0 = static_cast<int>(task % blocks) * block, h1 = std::min(H, h0 + block);
      for_each_call(sr, e, [&](std::int64_t b, int m) {
        float* c = rows + b * H + h0;
        product_over_slices(kt, nn, summed, packed, slices, r, sr, e, b, m, H, h0, h1, tiles.of(thread), c);
        add(tc, e, b, m, h0, h1, c);
      });
      done(tc, e, h0, h1, thread);
    });
    combine_token_rows(pool, combine, r, tc, K, H, rows, dst, weight);
  });
}

}  // namespace

void down_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                      std::vector<SliceRows>& slices, const float* ad, const LoRAViews& lora, int H, int K,
                      const View& out) {
  const int rd = ad ? static_cast<int>(lora.a_d.shape[1]) : 0;
  rows_and_combine(
      kt, pool, ws, r, slices, false, Stage::down, Stage::combine, kDownBlock, H, K, out,
      [&](const TokenChunk& tc, int e, std::int64_t b, int m, int h0, int h1, float* c) {
        if (!rd) return;
        const auto timed = part(Stage::lora_b);
        kt.lora_b_add(m, ad + tc.call_row(e, b) * rd, expert_slice(lora.b_d, e), lora.b_d.dtype, rd, h0, h1,
                      lora.scale_d, c, H);
      },
      [](const TokenChunk&, int, int, int, int) {}, [&](std::int64_t row) { return r.weight[row]; });
}

void dx_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                    std::vector<SliceRows>& slices, const float* bgu, const bf16* const* x_rows, const LoRAViews& lora,
                    int rg, const View& da_gu, int H, int K, const View& grad_x) {
  const int blocks = blocks_of(H, kWideBlock);
  const auto n_active = static_cast<std::int64_t>(r.active.size());
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max(rg, 1);
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);
  const bool want_da_gu = rg && da_gu;
  const auto da_gu_of = [&](int e, int h0, int h1, int thread) {
    const auto timed = part(Stage::bwd_da_gu);
    const std::int64_t b = r.offsets[e];
    kt.lora_grad_a(static_cast<int>(r.rows_of(e)), bgu + b * rg, nullptr, x_rows + b, rg, H, h0, h1, lora.scale_gu,
                   expert_slice_mut(da_gu, e), da_gu.dtype, scratch + thread * scratch_per_thread);
  };
  const auto da_gu_alone = [&](Stage stage) {
    run_tasks(pool, stage, n_active * blocks, [&](std::int64_t task, int thread) {
      const int h0 = static_cast<int>(task % blocks) * kWideBlock;
      da_gu_of(r.active[task / blocks], h0, std::min(H, h0 + kWideBlock), thread);
    });
  };
  if (!grad_x) {
    if (want_da_gu) da_gu_alone(Stage::bwd_gate_up);
    return;
  }
  // dA_gu reads all of an expert's rows: fused with the dx product when the call is one chunk.
  const bool one_chunk = tokens_per_chunk(r.tokens, K, r.pairs(), H) >= r.tokens;
  if (want_da_gu && !one_chunk) da_gu_alone(Stage::bwd_da_gu);
  rows_and_combine(
      kt, pool, ws, r, slices, true, Stage::bwd_gate_up, Stage::bwd_combine, kWideBlock, H, K, grad_x,
      [&](const TokenChunk& tc, int e, std::int64_t b, int m, int h0, int h1, float* c) {
        if (rg)
          kt.lora_at_add(m, bgu + tc.call_row(e, b) * rg, expert_slice(lora.a_gu, e), lora.a_gu.dtype, rg, H, h0, h1,
                         lora.scale_gu, c, H);
      },
      [&](const TokenChunk& tc, int e, int h0, int h1, int thread) {
        if (want_da_gu && tc.whole) da_gu_of(e, h0, h1, thread);  // one pass: fused with the dx product
      },
      [](std::int64_t) { return 1.f; });
}

}  // namespace kt::moe
