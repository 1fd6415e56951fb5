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

// fp32 scratch of `floats` a thread, in the workspace's tiles.
struct ThreadTiles {
  float* base;
  std::size_t stride;
  float* of(int thread) const { return base + static_cast<std::size_t>(thread) * stride; }
};
ThreadTiles thread_tiles(Workspace& ws, runtime::ThreadPool& pool, std::size_t floats) {
  return {ws.tiles.ensure(static_cast<std::size_t>(pool.size()) * std::max<std::size_t>(floats, 1)), floats};
}

}  // namespace

void down_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                      std::vector<SliceRows>& slices, const float* ad, const LoRAViews& lora, int H, int K,
                      const View& out) {
  const int rd = ad ? static_cast<int>(lora.a_d.shape[1]) : 0;
  const bool summed = slices.size() > 1 && PackedRows::used_by(kt) && kt.gemm_nt_packed_segments != nullptr;
  const int blocks = blocks_of(H, kDownBlock);
  constexpr std::size_t kPadded = static_cast<std::size_t>(kSameFormRows) * kDownBlock;  // a short piece's call
  const bool adds = slices.size() > 1 && !summed;  // room for the other slices' products (a call's block)
  const ThreadTiles tiles = thread_tiles(ws, pool, kPadded + (adds ? kTileFloats : 0));
  ws.token_chunk.for_each(r, H, [&](const TokenChunk& tc) {
    const Routing& sr = *tc.rows;
    const bool packed = chunk_slices(kt, false, tc, slices, pool);
    float* y = ws.rows.ensure(static_cast<std::size_t>(std::max<std::int64_t>(sr.pairs(), 1)) * H);
    run_tasks(pool, Stage::down, static_cast<std::int64_t>(sr.active.size()) * blocks, [&](std::int64_t task, int thread) {
      const int e = sr.active[task / blocks];
      const int h0 = static_cast<int>(task % blocks) * kDownBlock, h1 = std::min(H, h0 + kDownBlock);
      float* tile = tiles.of(thread);
      std::vector<PackedSegment> segs(summed ? slices.size() : 0);
      for_each_call(sr, e, [&](std::int64_t b, int m) {
        float* c = y + b * H + h0;
        if (summed) {  // one product over the slices in slice order, written once
          for (std::size_t s = 0; s < slices.size(); ++s)
            segs[s] = {slices[s].packed->at(sr, e, b), slices[s].w.of(e), slices[s].k};
          kt.gemm_nt_packed_segments(m, segs.data(), static_cast<int>(segs.size()), H, h0, h1, c, H);
        } else {
          sum_in_slice_order(slices.size(), m, h1 - h0, H, c, tile + kPadded,
                             [&](std::size_t s, float* dst, std::int64_t ld) {
                               const SliceRows& sl = slices[s];
                               chunk_nt_in_call_form(kt, packed ? sl.packed : nullptr, sr, e, b, m, r.rows_of(e),
                                                     sl.chunk, sl.w.of(e), H, sl.k, h0, h1, tile, dst, ld);
                             });
        }
        if (rd) {
          const auto timed = part(Stage::lora_b);
          kt.lora_b_add(m, ad + tc.call_row(e, b) * rd, expert_slice(lora.b_d, e), lora.b_d.dtype, rd, h0, h1,
                        lora.scale_d, c, H);
        }
      });
    });
    combine_token_rows(pool, Stage::combine, r, tc, K, H, y, out, [&](std::int64_t row) { return r.weight[row]; });
  });
}

void dx_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                    std::vector<SliceRows>& slices, const float* bgu, const bf16* const* x_rows, const LoRAViews& lora,
                    int rg, const View& da_gu, int H, int K, const View& grad_x) {
  const bool summed = slices.size() > 1 && PackedRows::used_by(kt) && kt.gemm_nn_packed_segments != nullptr;
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
  const bool adds = slices.size() > 1 && !summed;  // room for the other slices' products (a call's block)
  const ThreadTiles tiles = thread_tiles(ws, pool, adds ? kTileFloats : 0);
  ws.token_chunk.for_each(r, H, [&](const TokenChunk& tc) {
    const Routing& sr = *tc.rows;
    const bool packed = chunk_slices(kt, true, tc, slices, pool);
    float* dx_rows = ws.rows.ensure(static_cast<std::size_t>(std::max<std::int64_t>(sr.pairs(), 1)) * H);
    run_tasks(pool, Stage::bwd_gate_up, static_cast<std::int64_t>(sr.active.size()) * blocks,
              [&](std::int64_t task, int thread) {
      const int e = sr.active[task / blocks];
      const int h0 = static_cast<int>(task % blocks) * kWideBlock, h1 = std::min(H, h0 + kWideBlock);
      float* tile = tiles.of(thread);
      std::vector<PackedSegment> segs(summed ? slices.size() : 0);
      for_each_call(sr, e, [&](std::int64_t b, int m) {
        float* c = dx_rows + b * H + h0;
        if (summed) {  // one product over the slices in slice order, written once
          for (std::size_t s = 0; s < slices.size(); ++s)
            segs[s] = {slices[s].packed->at(sr, e, b), slices[s].w.of(e), slices[s].k};
          kt.gemm_nn_packed_segments(m, segs.data(), static_cast<int>(segs.size()), H, h0, h1, c, H);
        } else {
          sum_in_slice_order(slices.size(), m, h1 - h0, H, c, tile, [&](std::size_t s, float* dst, std::int64_t ld) {
            const SliceRows& sl = slices[s];
            chunk_nn(kt, packed ? sl.packed : nullptr, sr, e, b, m, sl.chunk, sl.w.of(e), sl.k, H, h0, h1, dst, ld);
          });
        }
        if (rg)
          kt.lora_at_add(m, bgu + tc.call_row(e, b) * rg, expert_slice(lora.a_gu, e), lora.a_gu.dtype, rg, H, h0, h1,
                         lora.scale_gu, c, H);
      });
      if (want_da_gu && tc.whole) da_gu_of(e, h0, h1, thread);  // one pass: fused with the dx product
    });
    combine_token_rows(pool, Stage::bwd_combine, r, tc, K, H, dx_rows, grad_x, [](std::int64_t) { return 1.f; });
  });
}

}  // namespace kt::moe
