// MoE layer orchestration (DESIGN.md §2, §3.4): routing, the forward/backward phases, the cache.
//
// Every phase is a parallel_for over tasks whose boundaries depend only on the problem (expert,
// fixed-width column block, fixed 32-row pair chunk, fixed 16-token chunk), never on the thread
// count; each output element is produced by exactly one task in a fixed order, so results are
// bitwise identical for any number of threads. Tier code is reached only through KernelTable.
// docs/kernels.md lists the phases and every bf16 rounding point.
#include "kt/moe/layer.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "kt/core/bf16.hpp"
#include "kt/core/errors.hpp"
#include "kt/moe/kernels.hpp"
#include "kt/runtime/cpu_features.hpp"
#include "kt/runtime/profiler.hpp"
#include "routing.hpp"

namespace kt::moe {

namespace {

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

int blocks_of(int n, int block = kBlock) { return (n + block - 1) / block; }

// Rows per GEMM call for an expert with `rows` routed pairs: the fewest calls of at most
// kMaxChunkRows rows, of equal size rounded up to whole 16-row tiles. Each call streams the task's
// weights once, so an expert of 130 rows makes one call, not 128 + 2.
std::int64_t chunk_rows(std::int64_t rows) {
  const std::int64_t calls = std::max<std::int64_t>(1, (rows + kMaxChunkRows - 1) / kMaxChunkRows);
  return ((rows + calls - 1) / calls + 15) / 16 * 16;
}

// Calls f(b, m) for each GEMM call over the rows of expert e: sorted rows [b, b + m), in order.
template <class F>
void for_each_call(const Routing& r, int e, F&& f) {
  const std::int64_t end = r.offsets[e + 1], step = chunk_rows(r.rows_of(e));
  for (std::int64_t b = r.offsets[e]; b < end; b += step) f(b, static_cast<int>(std::min(step, end - b)));
}

std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::bf16: return 2;
    case DType::f32: case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

// ---- argument checks (the bindings check first with friendlier messages; these keep the C++ API
// itself memory-safe) ---------------------------------------------------------------------------

[[noreturn]] void bad_argument(const std::string& message) { throw std::invalid_argument(message); }

std::string shape_text(const View& v) {
  std::string s = "[";
  for (int i = 0; i < v.ndim; ++i) s += (i ? ", " : "") + std::to_string(v.shape[i]);
  return s + "]";
}

void expect_shape(const View& v, const char* name, std::initializer_list<std::int64_t> shape) {
  bool ok = v.ndim == static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t n : shape) ok = ok && v.shape[i++] == n;
  if (!ok) {
    std::string want = "[";
    i = 0;
    for (std::int64_t n : shape) want += (i++ ? ", " : "") + std::to_string(n);
    bad_argument(std::string(name) + ": expected shape " + want + "], got " + shape_text(v));
  }
}

void expect_dtype(const View& v, const char* name, DType a, DType b) {
  if (v.dtype != a && v.dtype != b)
    throw TypeError(std::string(name) + ": expected dtype " + dtype_name(a) + " or " + dtype_name(b) + ", got " +
                 dtype_name(v.dtype));
}

void expect_present(const View& v, const char* name) {
  if (!v) bad_argument(std::string(name) + " is required");
}

// Rank of a LoRA pair (0 when absent), after checking shapes: A [E, r, in], B [E, out, r].
int check_lora_pair(const View& a, const View& b, const char* a_name, const char* b_name, int experts, int in,
                    int out) {
  if (!a && !b) return 0;
  if (!a || !b) bad_argument(std::string(a_name) + " and " + b_name + " must be given together");
  if (a.ndim != 3) bad_argument(std::string(a_name) + ": expected 3 dimensions, got shape " + shape_text(a));
  const std::int64_t r = a.shape[1];
  if (r <= 0) bad_argument(std::string(a_name) + ": LoRA rank must be positive, got shape " + shape_text(a));
  expect_shape(a, a_name, {experts, r, in});
  expect_shape(b, b_name, {experts, out, r});
  expect_dtype(a, a_name, DType::f32, DType::bf16);
  if (b.dtype != a.dtype) throw TypeError(std::string(b_name) + ": dtype must match " + a_name);
  return static_cast<int>(r);
}

void check_grad_like(const View& grad, const View& weight, const char* name) {
  if (!grad) return;
  if (!weight) bad_argument(std::string(name) + " given, but the forward ran without that LoRA");
  if (grad.dtype != weight.dtype) throw TypeError(std::string(name) + ": dtype must match the LoRA weights");
  if (grad.ndim != 3) bad_argument(std::string(name) + ": expected shape " + shape_text(weight));
  expect_shape(grad, name, {weight.shape[0], weight.shape[1], weight.shape[2]});
}

// ---- small helpers -------------------------------------------------------------------------------

const std::byte* expert_slice(const View& v, int e) {
  return static_cast<const std::byte*>(v.data) +
         static_cast<std::size_t>(e) * static_cast<std::size_t>(v.shape[1] * v.shape[2]) * dtype_size(v.dtype);
}
std::byte* expert_slice_mut(const View& v, int e) { return const_cast<std::byte*>(expert_slice(v, e)); }

inline void store_value(void* base, DType dtype, std::int64_t i, float value) {
  if (dtype == DType::bf16) static_cast<bf16*>(base)[i] = f32_to_bf16(value);
  else static_cast<float*>(base)[i] = value;
}

namespace prof = runtime::profiler;
using prof::Stage;

// One phase: a parallel_for, profiled as `stage` (wall time here, busy time per task).
template <class F>
void run_tasks(runtime::ThreadPool& pool, Stage stage, std::int64_t tasks, F&& body) {
  if (tasks <= 0) return;
  const prof::Scope wall(stage, prof::Kind::wall);
  if (!prof::enabled()) return pool.parallel_for(tasks, body);
  pool.parallel_for(tasks, [&](std::int64_t task, int thread) {
    const prof::Scope busy(stage, prof::Kind::busy);
    body(task, thread);
  });
}

// Times a part of a task (nested busy time).
prof::Scope part(Stage stage) { return prof::Scope(stage, prof::Kind::busy); }

struct PairChunk {
  int expert;
  std::int64_t begin, end;
};

}  // namespace

// ---- the cache and the layer's state -----------------------------------------------------------------

// The largest activation cache a layer's freed handles gave back, for its next forward(save=True):
// a fresh cache of T*k*2I bf16 (100 MB for Qwen3-30B-A3B at T = 4096) costs page faults on first touch
// on every call. At most one spare per layer, never more than the layer's own peak cache.
class CacheRecycler {
 public:
  void give(Buffer<bf16>& gu, Buffer<float>& ad, Buffer<float>& ax) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (gu.capacity() > gu_.capacity()) gu_.swap(gu);
    if (ad.capacity() > ad_.capacity()) ad_.swap(ad);
    if (ax.capacity() > ax_.capacity()) ax_.swap(ax);
  }
  void take(Buffer<bf16>& gu, Buffer<float>& ad, Buffer<float>& ax) {
    const std::lock_guard<std::mutex> lock(mutex_);
    gu.swap(gu_);
    ad.swap(ad_);
    ax.swap(ax_);
  }

 private:
  std::mutex mutex_;
  Buffer<bf16> gu_;
  Buffer<float> ad_;
  Buffer<float> ax_;
};

class ForwardCache {
 public:
  std::shared_ptr<CacheRecycler> recycler;  // shared: the cache may outlive its layer
  const MoELayer* layer = nullptr;
  Routing routing;
  View x;          // caller memory; the binding's handle keeps it alive
  LoRAViews lora;  // caller memory, likewise
  int rank_gu = 0, rank_d = 0;
  Buffer<bf16> gu;   // [P, 2I]: gate|up pre-activations, rounded to bf16
  Buffer<float> ad;  // [P, r_d]: A_d h
  Buffer<float> ax;  // [P, r_gu]: A_gu x (the backward's dB_gu needs it; r_gu floats a pair)
};

void ForwardCacheDeleter::operator()(ForwardCache* cache) const {
  if (cache->recycler) cache->recycler->give(cache->gu, cache->ad, cache->ax);
  delete cache;
}

namespace {

// bf16 view of [T, H] activations: the caller's memory when already bf16, else rounded once into
// `storage` (rounding point R0/R4 of docs/kernels.md).
const bf16* as_bf16_rows(const View& v, Buffer<bf16>& storage, runtime::ThreadPool& pool) {
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

void build_chunks(const Routing& r, std::vector<PairChunk>& chunks) {
  chunks.clear();
  for (int e : r.active)
    for (std::int64_t b = r.offsets[e]; b < r.offsets[e + 1]; b += kPairChunk)
      chunks.push_back({e, b, std::min(r.offsets[e + 1], b + kPairChunk)});
}

// Tile-packed activation rows for one operand of one phase, for tiers whose GEMMs want them
// (KernelTable::pack_a_nt/nn non-null: amx). Each chunk_rows() chunk of each expert's rows (the same
// chunks the GEMM tasks use) is packed once, in parallel, and then shared by every column-block
// task of that expert.
class PackedRows {
 public:
  // False (and nothing packed) when the tier reads row pointers directly.
  bool build(const KernelTable& kt, bool nn, const Routing& r, const bf16* const* rows, int k,
             runtime::ThreadPool& pool) {
    if (kt.pack_a_nt == nullptr || kt.pack_a_nn == nullptr) return false;
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
    std::byte* dst = storage_.ensure(bytes);
    const auto pack = nn ? kt.pack_a_nn : kt.pack_a_nt;
    run_tasks(pool, Stage::pack, static_cast<std::int64_t>(chunks_.size()), [&](std::int64_t c, int) {
      const PairChunk& ch = chunks_[c];
      pack(static_cast<int>(ch.end - ch.begin), rows + ch.begin, k, dst + offsets_[c]);
    });
    return true;
  }
  // The packing of the chunk of expert e that starts at sorted row b.
  const void* at(const Routing& r, int e, std::int64_t b) const {
    return storage_.data() + offsets_[first_[e] + (b - r.offsets[e]) / chunk_rows(r.rows_of(e))];
  }

 private:
  Buffer<std::byte> storage_;
  std::vector<std::size_t> offsets_;
  std::vector<std::int64_t> first_;
  std::vector<PairChunk> chunks_;
};

// c = rows W^T (NT) or rows W (NN) for one chunk, through the packing when the tier made one.
void chunk_nt(const KernelTable& kt, const PackedRows* packed, const Routing& r, int e, std::int64_t b, int m,
              const bf16* const* rows, const void* w, int n_rows, int k, int n0, int n1, float* c,
              std::int64_t ldc) {
  if (packed) kt.gemm_nt_packed(m, packed->at(r, e, b), w, n_rows, k, n0, n1, c, ldc);
  else kt.gemm_nt(m, rows + b, w, n_rows, k, n0, n1, c, ldc);
}
void chunk_nn(const KernelTable& kt, const PackedRows* packed, const Routing& r, int e, std::int64_t b, int m,
              const bf16* const* rows, const void* w, int k, int cols, int j0, int j1, float* c,
              std::int64_t ldc) {
  if (packed) kt.gemm_nn_packed(m, packed->at(r, e, b), w, k, cols, j0, j1, c, ldc);
  else kt.gemm_nn(m, rows + b, w, k, cols, j0, j1, c, ldc);
}

// Per-call scratch, reused across calls (grow-only).
struct Workspace {
  Routing routing;  // forward(save=false) keeps its routing here
  Buffer<bf16> xb, gb, gu, hb, dgu;
  Buffer<float> ax, ad, bg, bgu, rows, gw_part, gw, scratch;
  Buffer<float> tiles;  // per thread: one GEMM call's fp32 result block (kTileFloats)
  Buffer<const bf16*> x_rows, g_rows, h_rows, dgu_rows;
  std::vector<PairChunk> chunks;
  PackedRows packed;  // activation packing of the current phase (amx-style tiers only)
};

// The per-call scratch of every layer that runs on one thread pool. A model's layers run one at a
// time, so one grow-only workspace serves them all: per-layer workspaces cost ~0.3 GB a layer at
// Qwen3-30B-A3B width and T = 2048 (~2 GB a layer for DeepSeek-V3 at T = 4096). `mutex` is held for a
// whole forward or backward call (after the layer's own mutex: one lock order, no deadlock).
struct SharedWorkspace {
  std::mutex mutex;
  Workspace ws;
};

std::shared_ptr<SharedWorkspace> workspace_for(const runtime::ThreadPool* pool) {
  static std::mutex registry_mutex;
  // Never destroyed: layers may outlive static destruction at interpreter exit.
  static auto* registry = new std::map<const runtime::ThreadPool*, std::weak_ptr<SharedWorkspace>>();
  const std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry->begin(); it != registry->end();)  // forget pools whose layers are all gone
    it = it->second.expired() ? registry->erase(it) : std::next(it);
  std::weak_ptr<SharedWorkspace>& slot = (*registry)[pool];
  std::shared_ptr<SharedWorkspace> shared = slot.lock();
  if (!shared) {
    shared = std::make_shared<SharedWorkspace>();
    slot = shared;
  }
  return shared;
}

}  // namespace

struct MoELayer::Impl {
  MoEConfig config;
  runtime::ThreadPool* pool = nullptr;
  bool loaded = false;
  const KernelTable* packed_by = nullptr;  // table whose format the weights are in
  Buffer<std::byte> gate_up, down;
  std::size_t gate_up_stride = 0, down_stride = 0;  // packed bytes per expert
  std::mutex mutex;                                 // one call at a time per layer
  std::shared_ptr<SharedWorkspace> shared;          // scratch shared with the pool's other layers
  std::shared_ptr<CacheRecycler> recycler = std::make_shared<CacheRecycler>();

  const void* gate_up_of(int e) const { return gate_up.data() + e * gate_up_stride; }
  const void* down_of(int e) const { return down.data() + e * down_stride; }

  // The active tier's table; re-packs the weights if that tier wants another layout.
  const KernelTable& kernels() {
    const KernelTable& table = kernels_for(runtime::active_isa());
    if (table.format != packed_by->format) repack(table);
    return table;
  }

  void pack_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w);

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

MoELayer::MoELayer(const MoEConfig& config, runtime::ThreadPool& pool) : impl_(std::make_unique<Impl>()) {
  if (config.num_experts <= 0) bad_argument("num_experts must be positive, got " + std::to_string(config.num_experts));
  if (config.top_k <= 0) bad_argument("top_k must be positive, got " + std::to_string(config.top_k));
  if (config.hidden <= 0 || config.hidden % 32)
    bad_argument("hidden must be a positive multiple of 32, got " + std::to_string(config.hidden));
  if (config.intermediate <= 0 || config.intermediate % 32)
    bad_argument("intermediate must be a positive multiple of 32, got " + std::to_string(config.intermediate));
  if (config.weight_dtype != WeightDType::bf16)
    throw NotImplementedError("MoELayer: int8/int4 base weights are not implemented yet");
  if (config.numa_shards != 1) throw NotImplementedError("MoELayer: numa_shards > 1 is not implemented yet");
  impl_->config = config;
  impl_->pool = &pool;
  impl_->shared = workspace_for(&pool);
}

MoELayer::~MoELayer() = default;

const MoEConfig& MoELayer::config() const { return impl_->config; }
bool MoELayer::loaded() const { return impl_->loaded; }

// ---- weights -------------------------------------------------------------------------------------------

// Packs gate_up (either one [E, 2I, H] array, or gate and up [E, I, H] each) and down [E, H, I].
// A format's packing of [gate; up] equals packing gate then up (row blocks are contiguous and
// I % 32 == 0), so the separate form needs no temporary copy.
void MoELayer::Impl::pack_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate;
  const KernelTable& table = kernels_for(runtime::active_isa());
  L.gate_up_stride = table.packed_bytes(2 * I, H);
  L.down_stride = table.packed_bytes(H, I);
  const std::size_t half_bytes = table.packed_bytes(I, H);
  L.gate_up.ensure(L.gate_up_stride * E);
  L.down.ensure(L.down_stride * E);
  L.pool->parallel_for(E, [&](std::int64_t e, int) {
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    if (gate_up_w) {
      table.pack(gate_up_w->as<const bf16>() + e * 2 * I * H, 2 * I, H, gu_dst);
    } else {
      table.pack(gate->as<const bf16>() + e * I * H, I, H, gu_dst);
      table.pack(up->as<const bf16>() + e * I * H, I, H, gu_dst + half_bytes);
    }
    table.pack(down_w.as<const bf16>() + e * H * I, H, I, L.down.data() + e * L.down_stride);
  });
  L.packed_by = &table;
  L.loaded = true;
}

namespace {

void check_weight(const View& v, const char* name, std::initializer_list<std::int64_t> shape) {
  expect_present(v, name);
  expect_shape(v, name, shape);
  if (v.dtype != DType::bf16) throw TypeError(std::string(name) + ": expected dtype bfloat16, got " + dtype_name(v.dtype));
}

}  // namespace

void MoELayer::load_weights(const View& gate_up, const View& down) {
  const MoEConfig& c = impl_->config;
  check_weight(gate_up, "gate_up", {c.num_experts, 2 * c.intermediate, c.hidden});
  check_weight(down, "down", {c.num_experts, c.hidden, c.intermediate});
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->pack_all(&gate_up, nullptr, nullptr, down);
}

void MoELayer::load_weights(const View& gate, const View& up, const View& down) {
  const MoEConfig& c = impl_->config;
  check_weight(gate, "gate", {c.num_experts, c.intermediate, c.hidden});
  check_weight(up, "up", {c.num_experts, c.intermediate, c.hidden});
  check_weight(down, "down", {c.num_experts, c.hidden, c.intermediate});
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->pack_all(nullptr, &gate, &up, down);
}

// ---- forward -------------------------------------------------------------------------------------------

ForwardCachePtr MoELayer::forward(const View& x, const View& ids, const View& weights, const View& out,
                                  const LoRAViews& lora, bool save) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, K = c.top_k;
  if (!L.loaded) throw std::logic_error("MoELayer.forward: call load_weights() first");
  expect_present(x, "x");
  if (x.ndim != 2) bad_argument("x: expected shape [T, " + std::to_string(H) + "], got " + shape_text(x));
  const std::int64_t T = x.shape[0];
  expect_shape(x, "x", {T, H});
  expect_dtype(x, "x", DType::bf16, DType::f32);
  expect_present(ids, "ids");
  expect_shape(ids, "ids", {T, K});
  expect_dtype(ids, "ids", DType::i32, DType::i64);
  expect_present(weights, "weights");
  expect_shape(weights, "weights", {T, K});
  expect_dtype(weights, "weights", DType::f32, DType::bf16);
  expect_present(out, "out");
  expect_shape(out, "out", {T, H});
  expect_dtype(out, "out", DType::bf16, DType::f32);
  const int rg = check_lora_pair(lora.a_gu, lora.b_gu, "a_gu", "b_gu", E, H, 2 * I);
  const int rd = check_lora_pair(lora.a_d, lora.b_d, "a_d", "b_d", E, I, H);
  if (rg && rd && lora.a_gu.dtype != lora.a_d.dtype) throw TypeError("a_d: dtype must match a_gu");

  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::forward, prof::Kind::wall);
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;

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
  {
    const prof::Scope timed(Stage::route, prof::Kind::wall);
    build_routing(ids, weights, E, r);
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
  if (rg)
    run_tasks(pool, Stage::lora_a_gu, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_a(static_cast<int>(ch.end - ch.begin), x_rows + ch.begin, expert_slice(lora.a_gu, ch.expert),
                lora_dtype, rg, H, ax + ch.begin * rg);
    });

  // F2: gate and up rows of one column block, + LoRA, rounded to bf16 (R1); h = silu(g) u (R2).
  const int i_blocks = blocks_of(I, kGateUpBlock);
  const PackedRows* xp = ws.packed.build(kt, false, r, x_rows, H, pool) ? &ws.packed : nullptr;
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

  // F4: y = W_d h + s_d B_d (A_d h) per pair, fp32 rows.
  float* y = ws.rows.ensure(P * H);
  const int h_blocks = blocks_of(H, kDownBlock);
  const PackedRows* hp = ws.packed.build(kt, false, r, h_rows, I, pool) ? &ws.packed : nullptr;
  run_tasks(pool, Stage::down, n_active * h_blocks, [&](std::int64_t task, int) {
    const int e = r.active[task / h_blocks];
    const int h0 = static_cast<int>(task % h_blocks) * kDownBlock, h1 = std::min(H, h0 + kDownBlock);
    for_each_call(r, e, [&](std::int64_t b, int m) {
      chunk_nt(kt, hp, r, e, b, m, h_rows, L.down_of(e), H, I, h0, h1, y + b * H + h0, H);
      if (rd) {
        const auto timed = part(Stage::lora_b);
        kt.lora_b_add(m, ad + b * rd, expert_slice(lora.b_d, e), lora_dtype, rd, h0, h1, lora.scale_d,
                      y + b * H + h0, H);
      }
    });
  });

  // F5: out[t] = sum_j w[t, j] y[t, j] in j order (fp32), rounded once (R3).
  run_tasks(pool, Stage::combine, (T + kTokenChunk - 1) / kTokenChunk, [&](std::int64_t task, int) {
    float acc[kCombineWidth];
    for (std::int64_t t = task * kTokenChunk; t < std::min(T, (task + 1) * kTokenChunk); ++t)
      for (int c0 = 0; c0 < H; c0 += kCombineWidth) {
        const int width = std::min(kCombineWidth, H - c0);
        std::fill(acc, acc + width, 0.f);
        for (int j = 0; j < K; ++j) {
          const std::int64_t row = r.row_of_slot[t * K + j];
          if (row < 0) continue;
          const float wj = r.weight[row];
          const float* yr = y + row * H + c0;
          for (int i = 0; i < width; ++i) acc[i] += wj * yr[i];
        }
        for (int i = 0; i < width; ++i) store_value(out.data, out.dtype, t * H + c0 + i, acc[i]);
      }
  });
  return cache;
}

// ---- backward ------------------------------------------------------------------------------------------

void MoELayer::backward(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                        const View& grad_weights, const LoRAGradViews& lg) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, K = c.top_k;
  if (cache.layer != this) bad_argument("backward: the saved forward belongs to another layer");
  const Routing& r = cache.routing;
  const std::int64_t T = r.tokens;
  expect_present(grad_out, "grad_out");
  expect_shape(grad_out, "grad_out", {T, H});
  expect_dtype(grad_out, "grad_out", DType::bf16, DType::f32);
  if (grad_x) {
    expect_shape(grad_x, "grad_x", {T, H});
    expect_dtype(grad_x, "grad_x", DType::bf16, DType::f32);
  }
  if (grad_weights) {
    expect_shape(grad_weights, "grad_weights", {T, K});
    expect_dtype(grad_weights, "grad_weights", DType::f32, DType::bf16);
  }
  const LoRAViews& lora = cache.lora;
  check_grad_like(lg.da_gu, lora.a_gu, "da_gu");
  check_grad_like(lg.db_gu, lora.b_gu, "db_gu");
  check_grad_like(lg.da_d, lora.a_d, "da_d");
  check_grad_like(lg.db_d, lora.b_d, "db_d");
  const int rg = cache.rank_gu, rd = cache.rank_d;
  const DType lora_dtype = rg ? lora.a_gu.dtype : lora.a_d.dtype;

  std::lock_guard<std::mutex> lock(L.mutex);
  const prof::Scope whole(Stage::backward, prof::Kind::wall);
  const KernelTable& kt = L.kernels();
  runtime::ThreadPool& pool = *L.pool;
  const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
  Workspace& ws = L.shared->ws;
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
  const int i_blocks = blocks_of(I, kWideBlock), h_blocks = blocks_of(H, kWideBlock), db_d_blocks = blocks_of(H);
  const std::size_t scratch_per_thread = static_cast<std::size_t>(kWideBlock) * std::max({rg, rd, 1});
  float* scratch = ws.scratch.ensure(static_cast<std::size_t>(pool.size()) * scratch_per_thread);

  // B1: B_d^T G per pair (unweighted). A_gu x comes from the forward's cache.
  float* bg = rd ? ws.bg.ensure(P * rd) : nullptr;
  const float* ax = cache.ax.data();
  if (rd)
    run_tasks(pool, Stage::bwd_lora_bt, n_chunks, [&](std::int64_t task, int) {
      const PairChunk& ch = ws.chunks[task];
      kt.lora_bt(static_cast<int>(ch.end - ch.begin), g_rows + ch.begin, expert_slice(lora.b_d, ch.expert), lora_dtype,
                 rd, H, bg + ch.begin * rd);
    });

  // B2: per (expert, I block): v = W_d^T G + s_d A_d^T (B_d^T G); h (recomputed), <h, v> partials,
  // dg/du rounded to bf16 (R5); then the block's rows of dB_gu and columns of dA_d. Extra tasks
  // (expert, H block) compute dB_d.
  float* gw_part = ws.gw_part.ensure(P * i_blocks);
  const bool want_db_d = rd && lg.db_d;
  const std::int64_t main_tasks = n_active * i_blocks;
  const PackedRows* gp = ws.packed.build(kt, true, r, g_rows, H, pool) ? &ws.packed : nullptr;
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
                     expert_slice_mut(lg.db_d, e), lora_dtype, tscratch);
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
      kt.lora_grad_b(m, dgu_rows + b, nullptr, ax + b * rg, rg, i0, i1, lora.scale_gu, db, lora_dtype, tscratch);
      kt.lora_grad_b(m, dgu_rows + b, nullptr, ax + b * rg, rg, I + i0, I + i1, lora.scale_gu, db, lora_dtype,
                     tscratch);
    }
    if (rd && lg.da_d)
      kt.lora_grad_a(m, bg + b * rd, wt + b, h_rows + b, rd, I, i0, i1, lora.scale_d, expert_slice_mut(lg.da_d, e),
                     lora_dtype, tscratch);
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
  float* dx_rows = ws.rows.ensure(P * H);
  const bool want_da_gu = rg && lg.da_gu;
  const PackedRows* dp = grad_x && ws.packed.build(kt, true, r, dgu_rows, 2 * I, pool) ? &ws.packed : nullptr;
  if (grad_x || want_da_gu)
    run_tasks(pool, Stage::bwd_gate_up, n_active * h_blocks, [&](std::int64_t task, int thread) {
      const int e = r.active[task / h_blocks];
      const int h0 = static_cast<int>(task % h_blocks) * kWideBlock, h1 = std::min(H, h0 + kWideBlock);
      if (grad_x)
        for_each_call(r, e, [&](std::int64_t b, int m) {
          chunk_nn(kt, dp, r, e, b, m, dgu_rows, L.gate_up_of(e), 2 * I, H, h0, h1, dx_rows + b * H + h0, H);
          if (rg)
            kt.lora_at_add(m, bgu + b * rg, expert_slice(lora.a_gu, e), lora_dtype, rg, H, h0, h1, lora.scale_gu,
                           dx_rows + b * H + h0, H);
        });
      if (want_da_gu) {
        const auto timed = part(Stage::bwd_da_gu);
        const std::int64_t b = r.offsets[e];
        kt.lora_grad_a(static_cast<int>(r.rows_of(e)), bgu + b * rg, nullptr, x_rows + b, rg, H, h0, h1,
                       lora.scale_gu, expert_slice_mut(lg.da_gu, e), lora_dtype, scratch + thread * scratch_per_thread);
      }
    });

  // B5: dx[t] = sum_j dx rows in j order, rounded once (R6); grad_w written for every slot.
  run_tasks(pool, Stage::bwd_combine, (T + kTokenChunk - 1) / kTokenChunk, [&](std::int64_t task, int) {
    float acc[kCombineWidth];
    for (std::int64_t t = task * kTokenChunk; t < std::min(T, (task + 1) * kTokenChunk); ++t) {
      if (grad_weights)
        for (int j = 0; j < K; ++j) {
          const std::int64_t row = r.row_of_slot[t * K + j];
          store_value(grad_weights.data, grad_weights.dtype, t * K + j, row < 0 ? 0.f : gw[row]);
        }
      if (!grad_x) continue;
      for (int c0 = 0; c0 < H; c0 += kCombineWidth) {
        const int width = std::min(kCombineWidth, H - c0);
        std::fill(acc, acc + width, 0.f);
        for (int j = 0; j < K; ++j) {
          const std::int64_t row = r.row_of_slot[t * K + j];
          if (row < 0) continue;
          const float* dr = dx_rows + row * H + c0;
          for (int i = 0; i < width; ++i) acc[i] += dr[i];
        }
        for (int i = 0; i < width; ++i) store_value(grad_x.data, grad_x.dtype, t * H + c0 + i, acc[i]);
      }
    }
  });

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

// ---- cache accessors -------------------------------------------------------------------------------------

std::int64_t cache_tokens(const ForwardCache& cache) { return cache.routing.tokens; }
const MoELayer* cache_layer(const ForwardCache& cache) { return cache.layer; }
bool cache_has_lora_gate_up(const ForwardCache& cache) { return cache.rank_gu > 0; }
bool cache_has_lora_down(const ForwardCache& cache) { return cache.rank_d > 0; }

}  // namespace kt::moe
