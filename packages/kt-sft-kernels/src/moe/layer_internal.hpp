// What the layer's translation units share (layer.cpp: construction and weight packing; layer_quant.cpp:
// quantized bases and the memory report; layer_forward.cpp; layer_backward.cpp; down_phase.cpp: the
// down / dx products over slices of I; layer_shard.cpp): block sizes, argument checks, phase helpers, the
// per-call workspace and MoELayer::Impl. Private to src/moe.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "kt/core/bf16.hpp"
#include "kt/core/errors.hpp"
#include "kt/moe/kernels.hpp"
#include "kt/moe/layer.hpp"
#include "kt/moe/quant.hpp"
#include "kt/moe/validate.hpp"
#include "kt/runtime/cpu_features.hpp"
#include "kt/runtime/profiler.hpp"
#include "forward_cache.hpp"
#include "routing.hpp"
#include "token_chunks.hpp"

namespace kt::moe {

constexpr int kBlock = 64;         // output columns of one dB_d task
constexpr int kGateUpBlock = 128;  // gate (and as many up) columns of one F2 task; wider tasks re-read
                                   // the expert's packed activations less often (AMX: 1 KB tiles)
constexpr int kDownBlock = 256;    // output columns of one F4 task (same reason; measured best on AMX)
constexpr int kWideBlock = 256;    // output columns of one backward task (NN products: a wider
                                   // strip of the row-major weights per visit of each row)
constexpr int kMaxChunkRows = 256; // routed pairs per GEMM call at most (AMX: one weight pass per call)
constexpr int kPairChunk = 32;     // routed pairs per task of the per-pair phases
constexpr int kTokenChunk = 16;    // tokens per task of the combine phases
constexpr int kCombineWidth = 512; // columns summed per pass in the combine phases

// fp32 result block of one GEMM call in F2 / B2 (too big for a worker's stack).
constexpr std::size_t kTileFloats = static_cast<std::size_t>(kMaxChunkRows) * std::max(2 * kGateUpBlock, kWideBlock);

inline int blocks_of(int n, int block = kBlock) { return (n + block - 1) / block; }

// Rows per GEMM call for an expert with `rows` routed pairs: the fewest calls of at most
// kMaxChunkRows rows, of equal size rounded up to whole 16-row tiles. Each call streams the task's
// weights once, so an expert of 130 rows makes one call, not 128 + 2.
inline std::int64_t chunk_rows(std::int64_t rows) {
  const std::int64_t calls = std::max<std::int64_t>(1, (rows + kMaxChunkRows - 1) / kMaxChunkRows);
  return ((rows + calls - 1) / calls + 15) / 16 * 16;
}

// Calls f(b, m) for each GEMM call over the rows of expert e: sorted rows [b, b + m), in order.
template <class F>
inline void for_each_call(const Routing& r, int e, F&& f) {
  const std::int64_t end = r.offsets[e + 1], step = chunk_rows(r.rows_of(e));
  for (std::int64_t b = r.offsets[e]; b < end; b += step) f(b, static_cast<int>(std::min(step, end - b)));
}

inline std::size_t dtype_size(DType d) { return dtype_bytes(d); }

[[noreturn]] inline void bad_argument(const std::string& message) { throw std::invalid_argument(message); }

// ---- small helpers -------------------------------------------------------------------------------

// Expert e's slice of a [E, ...] array (2 or 3 dimensions).
inline const std::byte* expert_slice(const View& v, int e) {
  const std::int64_t per_expert = v.ndim == 2 ? v.shape[1] : v.shape[1] * v.shape[2];
  return static_cast<const std::byte*>(v.data) +
         static_cast<std::size_t>(e) * static_cast<std::size_t>(per_expert) * dtype_size(v.dtype);
}
inline std::byte* expert_slice_mut(const View& v, int e) { return const_cast<std::byte*>(expert_slice(v, e)); }

inline void store_value(void* base, DType dtype, std::int64_t i, float value) {
  if (dtype == DType::bf16) static_cast<bf16*>(base)[i] = f32_to_bf16(value);
  else static_cast<float*>(base)[i] = value;
}

namespace prof = runtime::profiler;
using prof::Stage;

// One phase: a parallel_for, profiled as `stage` (wall time here, busy time per task).
template <class F>
inline void run_tasks(runtime::ThreadPool& pool, Stage stage, std::int64_t tasks, F&& body) {
  if (tasks <= 0) return;
  const prof::Scope wall(stage, prof::Kind::wall);
  if (!prof::enabled()) return pool.parallel_for(tasks, body);
  pool.parallel_for(tasks, [&](std::int64_t task, int thread) {
    const prof::Scope busy(stage, prof::Kind::busy);
    body(task, thread);
  });
}

// Times a part of a task (nested busy time).
inline prof::Scope part(Stage stage) { return prof::Scope(stage, prof::Kind::busy); }

struct PairChunk {
  int expert;
  std::int64_t begin, end;
};



// bf16 view of [T, H] activations: the caller's memory when already bf16, else rounded once into
// `storage` (rounding point R0/R4 of docs/kernels.md).
inline const bf16* as_bf16_rows(const View& v, Buffer<bf16>& storage, runtime::ThreadPool& pool) {
  if (v.dtype == DType::bf16) return v.as<const bf16>();
  const std::int64_t rows = v.shape[0], cols = v.shape[1];
  bf16* dst = storage.ensure(static_cast<std::size_t>(rows * cols));
  const float* src = v.as<const float>();
  run_tasks(pool, Stage::convert, (rows + kTokenChunk - 1) / kTokenChunk, [&](std::int64_t task, int) {
    const std::int64_t end = std::min(rows, (task + 1) * kTokenChunk) * cols;
    for (std::int64_t i = task * kTokenChunk * cols; i < end; ++i) dst[i] = f32_to_bf16(src[i]);
  });
  return dst;
}

// dst[t] = sum_j weight(row) * rows[row] over the slots of the chunk's tokens, in j order, in fp32,
// rounded once (R3 forward with the routing weight; the backward's dx sum with weight 1).
template <class Weight>
void combine_token_rows(runtime::ThreadPool& pool, Stage stage, const Routing& r, const TokenChunk& tc, int K,
                        int H, const float* rows, const View& dst, Weight weight) {
  run_tasks(pool, stage, (tc.t1 - tc.t0 + kTokenChunk - 1) / kTokenChunk, [&](std::int64_t task, int) {
    float acc[kCombineWidth];
    for (std::int64_t t = tc.t0 + task * kTokenChunk; t < std::min(tc.t1, tc.t0 + (task + 1) * kTokenChunk); ++t)
      for (int c0 = 0; c0 < H; c0 += kCombineWidth) {
        const int width = std::min(kCombineWidth, H - c0);
        std::fill(acc, acc + width, 0.f);
        for (int j = 0; j < K; ++j) {
          const std::int64_t row = r.row_of_slot[t * K + j];
          if (row < 0) continue;
          const float wj = weight(row);
          const float* src = rows + tc.chunk_row(row) * H + c0;
          for (int i = 0; i < width; ++i) acc[i] += wj * src[i];
        }
        for (int i = 0; i < width; ++i) store_value(dst.data, dst.dtype, t * H + c0 + i, acc[i]);
      }
  });
}

inline void build_chunks(const Routing& r, std::vector<PairChunk>& chunks) {
  chunks.clear();
  for (int e : r.active)
    for (std::int64_t b = r.offsets[e]; b < r.offsets[e + 1]; b += kPairChunk)
      chunks.push_back({e, b, std::min(r.offsets[e + 1], b + kPairChunk)});
}

// Σ_s part(s)[P, width] in slice order (fp32, from zero) into `sums`: the r floats a pair that each slice
// of I (NUMA shards of one node) contributes to A_d h / B_gu^T dgu, summed once for the one pass that
// needs them. One slice: its own rows, as they are.
template <class Part>
const float* sum_pair_rows(runtime::ThreadPool& pool, Stage stage, std::int64_t P, int width, std::size_t slices,
                           Part part, Buffer<float>& sums) {
  if (slices == 1) return part(0);
  float* dst = sums.ensure(static_cast<std::size_t>(std::max<std::int64_t>(P * width, 1)));
  run_tasks(pool, stage, (P + kPairChunk - 1) / kPairChunk, [&](std::int64_t task, int) {
    const std::int64_t end = std::min(P, (task + 1) * kPairChunk) * width;
    for (std::int64_t i = task * kPairChunk * width; i < end; ++i) {
      float sum = 0.f;
      for (std::size_t s = 0; s < slices; ++s) sum += part(s)[i];
      dst[i] = sum;
    }
  });
  return dst;
}

// The experts' weight matrices [k, cols] of an NN phase, for tiers whose NN packing reads them
// (KernelTable::pack_a_nn_w: amx int8 folds W's row scales into the activations).
struct ExpertMatrices {
  const std::byte* base = nullptr;
  std::size_t stride = 0;  // bytes per expert
  int cols = 0;
  const void* of(int e) const { return base + static_cast<std::size_t>(e) * stride; }
};

// Tile-packed activation rows for one operand of one phase, for tiers whose GEMMs want them
// (KernelTable::pack_a_nt/nn non-null: amx). Each chunk_rows() chunk of each expert's rows (the same
// chunks the GEMM tasks use) is packed once, in parallel, and then shared by every column-block
// task of that expert.
class PackedRows {
 public:
  // One operand to pack: `rows` (k columns) into `into`; NN phases pass the weights they multiply (`w`).
  struct Job {
    PackedRows* into;
    const bf16* const* rows;
    int k;
    ExpertMatrices w;
  };

  // False (and nothing packed) when the tier reads row pointers directly.
  bool build(const KernelTable& kt, bool nn, const Routing& r, const bf16* const* rows, int k,
             runtime::ThreadPool& pool, const ExpertMatrices& w = {}) {
    const Job job{this, rows, k, w};
    return build_each(kt, nn, r, &job, 1, pool);
  }
  // Several operands of one routing in one task list (the slices of I of one node's NUMA shards: every
  // slice's rows at once, not one phase a slice).
  static bool build_each(const KernelTable& kt, bool nn, const Routing& r, const Job* jobs, std::size_t n,
                         runtime::ThreadPool& pool) {
    if (!used_by(kt)) return false;
    const auto pack_rows = nn ? kt.pack_a_nn : kt.pack_a_nt;
    std::vector<std::int64_t> first_task{0};  // tasks of job j: [first_task[j], first_task[j + 1])
    for (std::size_t j = 0; j < n; ++j) {
      if (nn && !pack_rows && !jobs[j].w.base)
        throw std::logic_error("PackedRows: this tier's NN packing needs the weights");
      jobs[j].into->plan(kt, r, jobs[j].k);
      first_task.push_back(first_task.back() + static_cast<std::int64_t>(jobs[j].into->chunks_.size()));
    }
    run_tasks(pool, Stage::pack, first_task.back(), [&](std::int64_t task, int) {
      const auto j = static_cast<std::size_t>(std::upper_bound(first_task.begin(), first_task.end(), task) -
                                              first_task.begin() - 1);
      const Job& job = jobs[j];
      PackedRows& p = *job.into;
      const std::int64_t c = task - first_task[j];
      const PairChunk& ch = p.chunks_[c];
      const int m = static_cast<int>(ch.end - ch.begin);
      std::byte* dst = p.storage_.data() + p.offsets_[c];
      if (pack_rows) pack_rows(m, job.rows + ch.begin, job.k, dst);
      else kt.pack_a_nn_w(m, job.rows + ch.begin, job.w.of(ch.expert), job.k, job.w.cols, dst);
    });
    return true;
  }
  // Whether the tier's GEMMs read packed rows (else build() packs nothing and returns false).
  static bool used_by(const KernelTable& kt) {
    return kt.pack_a_nt != nullptr && (kt.pack_a_nn != nullptr || kt.pack_a_nn_w != nullptr);
  }
  std::size_t bytes() const { return storage_.capacity(); }
  // The packing of the chunk of expert e that starts at sorted row b.
  const void* at(const Routing& r, int e, std::int64_t b) const {
    return storage_.data() + offsets_[first_[e] + (b - r.offsets[e]) / chunk_rows(r.rows_of(e))];
  }

 private:
  // Lays out one packing per GEMM call of r (for_each_call) and makes room for them.
  void plan(const KernelTable& kt, const Routing& r, int k) {
    offsets_.clear();
    first_.assign(r.offsets.size(), 0);
    std::size_t bytes = 0;
    chunks_.clear();
    for (int e : r.active) {
      first_[e] = static_cast<std::int64_t>(offsets_.size());
      for_each_call(r, e, [&](std::int64_t b, int m) {
        offsets_.push_back(bytes);
        chunks_.push_back({e, b, b + m});
        bytes += kt.packed_a_bytes(m, k);
      });
    }
    storage_.ensure(bytes);
  }

  Buffer<std::byte> storage_;
  std::vector<std::size_t> offsets_;
  std::vector<std::int64_t> first_;
  std::vector<PairChunk> chunks_;
};

// c = rows W^T (NT) or rows W (NN) for one chunk, through the packing when the tier made one.
inline void chunk_nt(const KernelTable& kt, const PackedRows* packed, const Routing& r, int e, std::int64_t b, int m,
              const bf16* const* rows, const void* w, int n_rows, int k, int n0, int n1, float* c,
              std::int64_t ldc) {
  if (packed) kt.gemm_nt_packed(m, packed->at(r, e, b), w, n_rows, k, n0, n1, c, ldc);
  else kt.gemm_nt(m, rows + b, w, n_rows, k, n0, n1, c, ldc);
}
inline void chunk_nn(const KernelTable& kt, const PackedRows* packed, const Routing& r, int e, std::int64_t b, int m,
              const bf16* const* rows, const void* w, int k, int cols, int j0, int j1, float* c,
              std::int64_t ldc) {
  if (packed) kt.gemm_nn_packed(m, packed->at(r, e, b), w, k, cols, j0, j1, c, ldc);
  else kt.gemm_nn(m, rows + b, w, k, cols, j0, j1, c, ldc);
}

// Tiers switch their NT GEMM form by the rows of a call (avx512, avx512_bf16: a dot-product form below
// 8 rows, a panel form from 8), and the forms sum in different fp32 orders. A token chunk can cut an
// expert's call into shorter pieces; running a piece with at least min(call rows, kSameFormRows) rows
// keeps the call's form, so the chunked bits stay those of one chunk (ADR 0405). Every form switch
// is below kSameFormRows.
constexpr int kSameFormRows = 16;

// chunk_nt for a piece of m rows of an expert's call of `call_rows` rows: a piece too short for the
// call's form runs as a call of that many rows (its last row repeated) into `tile` ([kSameFormRows,
// n1 - n0]) and is copied out. Tiers with packed rows have one form.
inline void chunk_nt_in_call_form(const KernelTable& kt, const PackedRows* packed, const Routing& r, int e,
                                  std::int64_t b, int m, std::int64_t call_rows, const bf16* const* rows,
                                  const void* w, int n_rows, int k, int n0, int n1, float* tile, float* c,
                                  std::int64_t ldc) {
  const int same_form = static_cast<int>(std::min<std::int64_t>(call_rows, kSameFormRows));
  if (packed || m >= same_form) return chunk_nt(kt, packed, r, e, b, m, rows, w, n_rows, k, n0, n1, c, ldc);
  const bf16* padded[kSameFormRows];
  for (int i = 0; i < same_form; ++i) padded[i] = rows[b + std::min(i, m - 1)];
  const int width = n1 - n0;
  kt.gemm_nt(same_form, padded, w, n_rows, k, n0, n1, tile, width);
  for (int i = 0; i < m; ++i) std::copy(tile + i * width, tile + (i + 1) * width, c + i * ldc);
}

// The rows of `all` (indexed by call row) that token chunk `c` covers, indexed by chunk row.
inline const bf16* const* rows_of_chunk(const TokenChunk& c, const bf16* const* all, Buffer<const bf16*>& storage) {
  if (c.whole) return all;
  const Routing& sr = *c.rows;
  const bf16** dst = storage.ensure(static_cast<std::size_t>(std::max<std::int64_t>(sr.pairs(), 1)));
  for (int e : sr.active)
    for (std::int64_t b = sr.offsets[e]; b < sr.offsets[e + 1]; ++b) dst[b] = all[c.call_row(e, b)];
  return dst;
}

// Per-call scratch, reused across calls (grow-only).
struct Workspace {
  Routing routing;  // forward(save=false) keeps its routing here
  Buffer<bf16> xb, gb, gu, hb, dgu;
  Buffer<float> ax, ad, bg, bgu, rows, gw_part, gw, scratch;
  Buffer<float> ad_sums, bgu_sums;  // NUMA shards of one node: A_d h / B_gu^T dgu summed over the slices
  Buffer<float> tiles;  // per thread: one GEMM call's fp32 result block (kTileFloats)
  Buffer<const bf16*> x_rows, g_rows, h_rows, dgu_rows;
  Buffer<const bf16*> token_chunk_rows;  // a token chunk's rows of the phase input (token_chunks.hpp)
  TokenChunk token_chunk;
  std::vector<PairChunk> chunks;
  PackedRows packed;  // activation packing of the current phase (amx-style tiers only)

  std::size_t bytes() const {
    std::size_t n = packed.bytes() + token_chunk.bytes();
    for (const Buffer<bf16>* b : {&xb, &gb, &gu, &hb, &dgu}) n += b->capacity() * sizeof(bf16);
    for (const Buffer<float>* b : {&ax, &ad, &bg, &bgu, &rows, &gw_part, &gw, &scratch, &tiles, &ad_sums, &bgu_sums})
      n += b->capacity() * sizeof(float);
    for (const Buffer<const bf16*>* b : {&x_rows, &g_rows, &h_rows, &dgu_rows, &token_chunk_rows}) n += b->capacity() * sizeof(bf16*);
    return n;
  }
};

// One slice of the intermediate dimension in the down (forward) / dx (backward) products: the layer's
// whole I, or one NUMA shard's on one node (MoELayer::forward_shards / backward_shards). Room for a
// token chunk's rows and their packing is the slice's own workspace's (token_chunk_rows, packed).
struct SliceRows {
  const bf16* const* rows = nullptr;          // the slice's h / dgu row of each call row
  ExpertMatrices w;                           // its packed W_d / W_gu of each expert (cols: H for W_gu)
  int k = 0;                                  // the products' reduction length: I_s (down), 2 I_s (dx)
  Buffer<const bf16*>* chunk_rows = nullptr;  // room for a token chunk's rows
  PackedRows* packed = nullptr;               // room for their packing
  const bf16* const* chunk = nullptr;         // the current token chunk's rows (set by the phase)
};

// F4 + F5 (down_phase.cpp): per token chunk, y = Σ_s W_d[:, S_s] h_s (+ s_d B_d ad, ad: [P, r_d] A_d h
// summed over the slices, or null) per pair, then out[t] = Σ_j w[t, j] y in j order, rounded once.
void down_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                      std::vector<SliceRows>& slices, const float* ad, const LoRAViews& lora, int H, int K,
                      const View& out);
// B4 + B5 (down_phase.cpp): per token chunk, dx rows = Σ_s W_gu[S_s]^T dgu_s + s_gu A_gu^T bgu (bgu:
// [P, rg] B_gu^T dgu summed over the slices), then grad_x[t] = Σ_j dx rows, rounded once; and
// dA_gu = s_gu Σ bgu ⊗ x of the active experts when da_gu is present. grad_x absent: dA_gu only.
void dx_and_combine(const KernelTable& kt, runtime::ThreadPool& pool, Workspace& ws, const Routing& r,
                    std::vector<SliceRows>& slices, const float* bgu, const bf16* const* x_rows, const LoRAViews& lora,
                    int rg, const View& da_gu, int H, int K, const View& grad_x);

// The per-call scratch of every layer that runs on one thread pool. A model's layers run one at a
// time, so one grow-only workspace serves them all: per-layer workspaces cost ~0.3 GB a layer at
// Qwen3-30B-A3B width and T = 2048 (~2 GB a layer for DeepSeek-V3 at T = 4096). `mutex` is held for a
// whole forward or backward call (after the layer's own mutex: one lock order, no deadlock).
struct SharedWorkspace {
  std::mutex mutex;
  Workspace ws;
  std::size_t reserved_bytes = 0;  // the largest workspace a call was allowed to grow to (memory_check.cpp)
};

// What a call allocates (memory_check.cpp): its share of the grow-only workspace, and the new
// activation cache of forward(save=True).
struct CallBytes {
  std::size_t workspace = 0, cache = 0;
};
CallBytes forward_bytes(const MoEConfig& config, std::int64_t tokens, int rank_gu, int rank_d, bool save, int threads);
CallBytes backward_bytes(const MoEConfig& config, std::int64_t tokens, int rank_gu, int rank_d, int threads);
// Throws kt::MemoryError (naming the bytes and the knob) when what the call would allocate beyond
// `reserved` exceeds the memory available; else raises `reserved` to the call's workspace.
void check_call_memory(const char* what, const MoEConfig& config, std::int64_t tokens, const CallBytes& need,
                       std::size_t& reserved);

// The grow-only scratch shared by every layer on `pool` with this workspace slot (layer.cpp).
std::shared_ptr<SharedWorkspace> workspace_for(const runtime::ThreadPool* pool, int workspace_slot);


struct MoELayer::Impl {
  MoEConfig config;
  runtime::ThreadPool* pool = nullptr;
  bool loaded = false;
  // The table whose format the weights are in; quantized bases: null while the values are row-major
  // (kt/moe/quant.hpp, as loading writes them), else the table that arranged them.
  const KernelTable* packed_by = nullptr;
  Buffer<std::byte> gate_up, down;
  std::size_t gate_up_stride = 0, down_stride = 0;  // packed bytes per expert
  std::mutex mutex;                                 // one call at a time per layer
  std::shared_ptr<SharedWorkspace> shared;          // scratch shared with the pool's other layers
  std::shared_ptr<CacheRecycler> recycler = std::make_shared<CacheRecycler>();
  std::unique_ptr<ShardedLayer> sharded;  // numa_shards > 1: the shards do all the work

  // Storage for every expert's packed gate_up and down (bytes per expert; contents not kept).
  void reserve_experts(std::size_t gu_stride, std::size_t d_stride) {
    gate_up_stride = gu_stride;
    down_stride = d_stride;
    gate_up.ensure(gu_stride * config.num_experts);
    down.ensure(d_stride * config.num_experts);
  }
  const void* gate_up_of(int e) const { return gate_up.data() + e * gate_up_stride; }
  const void* down_of(int e) const { return down.data() + e * down_stride; }
  // The layer's I as a slice of the down / dx products (down_phase.cpp), its rows in `ws`.
  SliceRows down_slice(Workspace& ws) const {
    return {ws.h_rows.data(), {down.data(), down_stride, config.intermediate}, config.intermediate,
            &ws.token_chunk_rows, &ws.packed};
  }
  SliceRows dx_slice(Workspace& ws) const {
    return {ws.dgu_rows.data(), {gate_up.data(), gate_up_stride, config.hidden}, 2 * config.intermediate,
            &ws.token_chunk_rows, &ws.packed};
  }

  bool quantized() const { return config.weight_dtype != WeightDType::bf16; }

  // The active tier's table; re-packs bf16 weights, or re-orders quantized values, if that tier wants
  // another layout.
  const KernelTable& kernels() {
    if (quantized()) {
      const KernelTable& table = kernels_for(runtime::active_isa(), config.weight_dtype, config.group_size);
      if (table.format != (packed_by ? packed_by->format : PackFormat::quantized)) rearrange(table);
      return table;
    }
    const KernelTable& table = kernels_for(runtime::active_isa());
    if (table.format != packed_by->format) repack(table);
    return table;
  }

  // Expert e's quantized matrix (gate_up: 0, down: 1) as kt/moe/quant.hpp lays it out (row-major
  // values, then the scales): the packing itself, or (values arranged by a tier) a copy in `scratch`,
  // which must hold quant_matrix_bytes of it.
  const std::byte* row_major_quantized(int e, int which, std::byte* scratch) const {
    const int H = config.hidden, I = config.intermediate;
    const int rows = which == 0 ? 2 * I : H, cols = which == 0 ? H : I;
    const std::byte* packed = which == 0 ? gate_up.data() + e * gate_up_stride : down.data() + e * down_stride;
    if (!packed_by) return packed;
    const std::size_t values = quant_value_bytes(config.weight_dtype, rows, cols);
    packed_by->unarrange(reinterpret_cast<const std::uint8_t*>(packed), rows, cols,
                         reinterpret_cast<std::uint8_t*>(scratch));
    std::memcpy(scratch + values, packed + values,
                quant_matrix_bytes(config.weight_dtype, config.group_size, rows, cols) - values);
    return scratch;
  }

  void pack_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w, int source_I = 0,
                int i0 = 0);
  // layer_quant.cpp; source_I / i0 as pack_all.
  void quantize_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w, int source_I = 0,
                    int i0 = 0);
  void copy_quantized_all(const QuantViews& q, int source_I, int i0);
  void read_quantized_all(const QuantViews& q, int source_I, int i0) const;

  // Quantized values into `to`'s order (row-major first, when another tier's order holds them), one
  // expert matrix at a time in place: the load peak grows by one matrix a thread.
  void rearrange(const KernelTable& to) {
    const int E = config.num_experts, H = config.hidden, I = config.intermediate;
    const std::size_t largest = std::max(quant_matrix_bytes(config.weight_dtype, config.group_size, 2 * I, H),
                                         quant_matrix_bytes(config.weight_dtype, config.group_size, H, I));
    pool->parallel_for(E, [&](std::int64_t e64, int) {
      const int e = static_cast<int>(e64);
      std::vector<std::byte> plain(largest);
      for (int which = 0; which < 2; ++which) {
        const int rows = which == 0 ? 2 * I : H, cols = which == 0 ? H : I;
        auto* values = reinterpret_cast<std::uint8_t*>(which == 0 ? gate_up.data() + e * gate_up_stride
                                                                  : down.data() + e * down_stride);
        const std::size_t bytes = quant_value_bytes(config.weight_dtype, rows, cols);
        const std::byte* row_major = row_major_quantized(e, which, plain.data());
        if (row_major != plain.data()) std::memcpy(plain.data(), row_major, bytes);
        if (to.arrange) to.arrange(reinterpret_cast<const std::uint8_t*>(plain.data()), rows, cols, values);
        else std::memcpy(values, plain.data(), bytes);
      }
    });
    packed_by = to.arrange ? &to : nullptr;
  }

  void repack(const KernelTable& to) {
    const int E = config.num_experts, H = config.hidden, I = config.intermediate;
    Buffer<std::byte> new_gu, new_d;
    const std::size_t gu_stride = to.packed_bytes(2 * I, H), d_stride = to.packed_bytes(H, I);
    new_gu.ensure(gu_stride * E);
    new_d.ensure(d_stride * E);
    const KernelTable& from = *packed_by;
    pool->parallel_for(E, [&](std::int64_t e, int) {
      std::vector<bf16> plain(static_cast<std::size_t>(2 * I) * H);
      from.unpack(gate_up_of(static_cast<int>(e)), 2 * I, H, plain.data());
      to.pack(plain.data(), 2 * I, H, new_gu.data() + e * gu_stride);
      from.unpack(down_of(static_cast<int>(e)), H, I, plain.data());
      to.pack(plain.data(), H, I, new_d.data() + e * d_stride);
    });
    gate_up.swap(new_gu);
    down.swap(new_d);
    gate_up_stride = gu_stride;
    down_stride = d_stride;
    packed_by = &to;
  }
};

}  // namespace kt::moe
