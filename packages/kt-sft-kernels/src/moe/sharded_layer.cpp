// NUMA shards of one MoE layer (sharded_layer.hpp, ADR 0701).
//
// Shards on one node (one_node) run each call as ONE call of shard 0's layer over all shards' slices
// of I, on their one pool (MoELayer::forward_shards / backward_shards): every phase one task list,
// what does not depend on the slice computed once, the down / dx products one product over the slices.
// Shards on different nodes run in rounds, each shard on its own driver thread (a SerialExecutor
// pinned to the shard's first CPU, which is also thread 0 of the shard's pool), meeting at a barrier
// between rounds:
//   round 1: the shard's MoELayer call on its slice, through its own combine into fp32 partials the
//            shard owns;
//   round 2: split between the shards: the sum of the partials for shard s's tokens, dB_d and dA_gu for
//            its experts from the pair sums of A_d h / B_gu^T dgu, its own dB_gu rows / dA_d columns.
// Round 2 reads what round 1 left in every shard's pool workspace (PairRows): nothing else runs on the
// shard pools in between (one sharded call at a time). Every sum over shards is in shard order 0..N-1
// in fp32, rounded once: the bits do not depend on thread counts (only on N and the form).

#include "sharded_layer.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include <unistd.h>

#include "buffer.hpp"
#include "forward_cache.hpp"
#include "layer_internal.hpp"
#include "routing.hpp"
#include "kt/core/bf16.hpp"
#include "kt/moe/validate.hpp"
#include "kt/runtime/numa_memory.hpp"
#include "kt/runtime/profiler.hpp"
#include "kt/runtime/serial_executor.hpp"
#include "kt/runtime/thread_pool.hpp"
#include "kt/runtime/topology.hpp"

namespace kt::moe {

namespace {

View f32_view(float* data, std::int64_t d0, std::int64_t d1, std::int64_t d2 = -1) {
  View v;
  v.data = data;
  v.dtype = DType::f32;
  v.ndim = d2 < 0 ? 2 : 3;
  v.shape[0] = d0;
  v.shape[1] = d1;
  v.shape[2] = d2 < 0 ? 0 : d2;
  return v;
}

// b.ensure(n), and when that allocated fresh memory, a preference for `node` (raw mbind): the
// shard's pinned threads touch it first anyway; this keeps it local where pinning was refused.
template <class T>
T* node_local(Buffer<T>& b, std::int64_t n, int node) {
  const std::size_t count = static_cast<std::size_t>(std::max<std::int64_t>(n, 1));
  const bool grows = count > b.capacity();
  T* data = b.ensure(count);
  if (grows) runtime::prefer_node(data, count * sizeof(T), node);
  return data;
}

View like(const View& of, void* data, std::int64_t d0, std::int64_t d1, std::int64_t d2) {
  View v = of;
  v.data = data;
  v.shape[0] = d0;
  v.shape[1] = d1;
  v.shape[2] = d2;
  return v;
}

// The LoRA a shard runs with, in the caller's dtype: copies of its slices of B_gu (rows) and A_d
// (columns); A_gu and B_d are the caller's arrays (every shard reads all of them). The shards'
// LoRA gradients are fp32 partials whatever the LoRA dtype (the layer writes each gradient in its
// own array's dtype), so a bf16 LoRA needs no fp32 copies.
struct LoRASlice {
  Buffer<std::byte> b_gu, a_d;
  LoRAViews views;
  std::size_t bytes() const { return b_gu.capacity() + a_d.capacity(); }
};

// Spare LoRA slices of one shard: a finished call gives its slices back, so the next call reuses
// memory that is already faulted in on the shard's node instead of allocating afresh. Shared with
// the caches, which may outlive the layer.
class SlicePool {
 public:
  std::unique_ptr<LoRASlice> take() {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (spare_.empty()) return std::make_unique<LoRASlice>();
    std::unique_ptr<LoRASlice> slice = std::move(spare_.back());
    spare_.pop_back();
    return slice;
  }
  void give(std::unique_ptr<LoRASlice> slice) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (spare_.size() < kMaxSpare) spare_.push_back(std::move(slice));
  }

 private:
  static constexpr std::size_t kMaxSpare = 2;
  std::mutex mutex_;
  std::vector<std::unique_ptr<LoRASlice>> spare_;
};

// KT_SFT_NUMA_FAULT="<round>,<shard>" (for tests, docs/environment.md): that round of that shard
// throws, so a test can check that a failing shard never leaves the others waiting at a barrier.
std::pair<int, int> injected_fault() {
  const char* value = std::getenv("KT_SFT_NUMA_FAULT");
  int round = -1, shard = -1;
  if (value == nullptr || std::sscanf(value, "%d,%d", &round, &shard) != 2) return {-1, -1};
  return {round, shard};
}

}  // namespace

struct ShardedCache {
  std::vector<ForwardCachePtr> caches;           // one per shard
  std::vector<std::unique_ptr<LoRASlice>> lora;  // what the caches' LoRA views point at
  std::vector<std::shared_ptr<SlicePool>> slice_pools;

  ~ShardedCache() {
    caches.clear();  // the caches' views die before the slices they point at go back
    for (std::size_t s = 0; s < lora.size(); ++s)
      if (lora[s]) slice_pools[s]->give(std::move(lora[s]));
  }
};

// What the shards at one position of one layout share across layers (a model's layers run one at a
// time): the pinned sub-pool (so also the inner layers' per-pool workspace), the driver thread, the
// fp32 partials and the spare LoRA slices. Per-layer copies would cost a pool of threads and ~0.3 GB
// of workspace per layer and shard. Shards on one node run on ONE pool (shard 0's; each shard's layer
// keeps its own workspace slot on it).
struct ShardRuntime {
  std::shared_ptr<runtime::ThreadPool> pool;
  Buffer<float> out, gx, gw;  // across nodes: the shard's fp32 partial out / dx / grad_w
  Buffer<float> db_gu, da_d;  // dB_gu rows / dA_d columns of the shard's slice in the caller's dtype (as
                              // floats: room for either; call in progress)
  Buffer<float> ad, bgu;      // A_d h and B_gu^T dgu summed over shards, for this shard's experts' pairs
  std::shared_ptr<SlicePool> slices = std::make_shared<SlicePool>();
  runtime::SerialExecutor driver;  // declared last: drained and joined before the pool goes

  std::size_t buffer_bytes() const {
    return (out.capacity() + gx.capacity() + gw.capacity() + db_gu.capacity() + da_d.capacity() + ad.capacity() +
            bgu.capacity()) * sizeof(float);
  }
};

// Sharded calls of all layers run one at a time: they share the runtimes (drivers, partials).
std::mutex& sharded_call_mutex() {
  static auto* mutex = new std::mutex();  // never destroyed: layers may outlive static destruction
  return *mutex;
}

// The runtime of shard `index` on `cpus`, shared by every layer with that shard; created (pool
// pinned, driver pinned to cpus[0]) on first use. The index is part of the key: two shards of one
// layer that share cores still get two drivers (one driver for both would deadlock at the barrier).
// `first`: shards on one node, index > 0: the runtime of their shard 0, whose pool they run on.
std::shared_ptr<ShardRuntime> runtime_for(int index, const std::vector<int>& cpus, const ShardRuntime* first) {
  using Registry = std::map<std::tuple<int, std::vector<int>, bool>, std::weak_ptr<ShardRuntime>>;
  static std::mutex mutex;
  static Registry* registry = nullptr;
  static pid_t registry_pid = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (registry == nullptr || registry_pid != ::getpid()) {  // a child after fork(): the parent's
    registry = new Registry();                              // threads are gone, start afresh
    registry_pid = ::getpid();                              // (the old map is left behind)
  }
  for (auto it = registry->begin(); it != registry->end();)
    it = it->second.expired() ? registry->erase(it) : std::next(it);
  std::weak_ptr<ShardRuntime>& slot = (*registry)[{index, cpus, first != nullptr}];
  std::shared_ptr<ShardRuntime> rt = slot.lock();
  if (rt && first && rt->pool != first->pool) rt = nullptr;  // made with another shard 0: a new one
  if (!rt) {
    rt = std::make_shared<ShardRuntime>();
    rt->pool = first ? first->pool : std::make_shared<runtime::ThreadPool>(cpus);
    // Thread 0 of the pool is the driver: pin it like the workers. On shard 0's pool, shard 0's driver
    // runs every shard (one_after_another): this one is never started (its thread begins at a submit).
    if (!first) rt->driver.submit([cpu = cpus.front()] { runtime::pin_current_thread(cpu); })->wait();
    slot = rt;
  }
  return rt;
}

struct ShardState {
  int index = 0, i0 = 0, i1 = 0;
  runtime::Shard place;
  std::shared_ptr<ShardRuntime> rt;  // declared before the layer, which runs on rt->pool
  std::unique_ptr<MoELayer> layer;

  int width() const { return i1 - i0; }
  int node() const { return place.nodes.empty() ? 0 : place.nodes.front(); }
  runtime::ThreadPool& pool() const { return *rt->pool; }
};

struct ShardedLayer::Impl {
  MoEConfig config;
  std::vector<std::unique_ptr<ShardState>> shards;
  std::vector<MoELayer*> layers;  // each shard's layer, in shard order
  // All shards on one node (and KT_SFT_NUMA_SHARED_DOWN not 0): each call is ONE call over all the
  // shards' slices (MoELayer::forward_shards / backward_shards) on their one pool: every phase one
  // task list, what does not depend on the slice computed once, the down / dx products summed over
  // the slices as one product. Across nodes that would stream other nodes' weights over the link, so
  // there each shard keeps to its own slice, in rounds.
  bool one_node = false;

  using Round = std::function<void(ShardState&)>;
  // Shards on different nodes: runs rounds[0](shard) on every shard's driver thread at once, then,
  // once every shard has finished it and none failed, rounds[1](shard), and so on (one hand-off per
  // call: the rounds meet at barriers inside the jobs). Every shard arrives at every barrier, failed or
  // not, so a failure in any round of one shard never leaves the others waiting; after it no shard
  // starts another round.
  // Rethrows the first failure in shard order after all have finished. The caller holds
  // sharded_call_mutex() (the rounds use the shards' shared runtimes).
  void on_shards(const std::vector<Round>& rounds) {
    const auto fault = injected_fault();
    if (one_node) return one_after_another(rounds, fault);
    const auto n = static_cast<std::ptrdiff_t>(shards.size());
    std::barrier<> meet(n);
    std::atomic<bool> failed{false};
    std::vector<std::shared_ptr<runtime::Job>> jobs;
    std::vector<std::uint64_t> finished(shards.size(), 0);  // profiler ticks at each driver's end
    std::exception_ptr failure;
    for (auto& shard : shards) {
      try {
        jobs.push_back(shard->rt->driver.submit([&, s = shard.get()] {
          std::exception_ptr mine;
          for (std::size_t k = 0; k < rounds.size(); ++k) {
            if (k > 0) {
              const prof::Scope timed(prof::Stage::shard_barrier, prof::Kind::wall);
              meet.arrive_and_wait();
            }
            // A failure of an earlier round is seen by every shard here; one in this round may or may
            // not stop the others' share of it (harmless: a round reads only what earlier ones wrote).
            if (failed.load()) continue;
            try {
              run_round(rounds[k], 1 + static_cast<int>(k), *s, fault);
            } catch (...) {
              mine = std::current_exception();
              failed.store(true);
            }
          }
          if (prof::enabled()) finished[static_cast<std::size_t>(s->index)] = prof::now_ticks();
          if (mine) std::rethrow_exception(mine);
        }));
      } catch (...) {  // a job that never started would leave the others at the barriers
        failure = std::current_exception();
        failed.store(true);
        for (std::size_t missing = jobs.size(); rounds.size() > 1 && missing < shards.size(); ++missing)
          meet.arrive_and_drop();
        break;
      }
    }
    for (auto& job : jobs) {
      job->wait();
      if (!failure && job->error()) failure = job->error();
    }
    // The call ends with its slowest shard: the others' wait for it is a barrier wait too (recorded here,
    // on the calling thread, so shard_barrier counts every wait of the shards for each other).
    const std::uint64_t last = *std::max_element(finished.begin(), finished.end());
    for (const std::uint64_t end : finished)
      if (end && last > end) prof::record(prof::Stage::shard_barrier, prof::Kind::wall, end, last);
    if (failure) std::rethrow_exception(failure);
  }

  // Shards on one node (loading): round after round, shard after shard, all on shard 0's driver and
  // shard 0's pool, which spans all the layout's cores (the constructor). The first failure ends it.
  void one_after_another(const std::vector<Round>& rounds, std::pair<int, int> fault) {
    on_first_driver([&] {
      for (std::size_t k = 0; k < rounds.size(); ++k)
        for (auto& shard : shards) run_round(rounds[k], 1 + static_cast<int>(k), *shard, fault);
    });
  }

  // Shards on one node: a forward / backward is one call over all shards, counted as round 1 of every
  // shard (KT_SFT_NUMA_FAULT "1,<s>" fails it).
  void run_as_one_call(const std::function<void()>& call) {
    const auto fault = injected_fault();
    on_first_driver([&] {
      const prof::Scope timed(prof::Stage::shard_round1, prof::Kind::wall);
      if (fault.first == 1 && fault.second >= 0 && fault.second < static_cast<int>(shards.size()))
        throw_injected(1, fault.second);
      call();
    });
  }

  // `job` on shard 0's driver (thread 0 of the shards' one pool when they share a node); rethrows.
  void on_first_driver(const std::function<void()>& job) {
    const auto done = shards.front()->rt->driver.submit(job);
    done->wait();
    if (done->error()) std::rethrow_exception(done->error());
  }

  [[noreturn]] static void throw_injected(int round, int shard) {
    throw std::runtime_error("KT_SFT_NUMA_FAULT: injected failure in round " + std::to_string(round) + " of shard " +
                             std::to_string(shard));
  }

  static void run_round(const Round& round_of, int round, ShardState& s, std::pair<int, int> fault) {
    const prof::Scope timed(round == 1 ? prof::Stage::shard_round1 : prof::Stage::shard_round2, prof::Kind::wall);
    if (fault == std::pair<int, int>{round, s.index}) throw_injected(round, s.index);
    round_of(s);
  }

  std::unique_ptr<LoRASlice> slice_lora(const ShardState& s, const LoRAViews& lora) const;
};

std::vector<std::pair<int, int>> shard_slices(int intermediate, int shards, int block) {
  const int blocks = intermediate / block;
  if (shards < 1) throw std::invalid_argument("numa_shards must be >= 1, got " + std::to_string(shards));
  if (blocks < shards)
    throw std::invalid_argument(
        "numa_shards=" + std::to_string(shards) + " does not fit intermediate=" + std::to_string(intermediate) +
        (block == 32 ? std::string(": every shard needs a multiple of 32 rows, so numa_shards can be at most "
                                   "intermediate / 32 = ")
                     : ": an int4 base with group_size=" + std::to_string(block) +
                           " needs every shard to hold whole groups, so numa_shards can be at most "
                           "intermediate / group_size = ") +
        std::to_string(blocks));
  std::vector<std::pair<int, int>> slices;
  for (int s = 0; s < shards; ++s)
    slices.emplace_back(block * (s * blocks / shards), block * ((s + 1) * blocks / shards));
  return slices;
}

ShardedLayer::ShardedLayer(const MoEConfig& config) : impl_(std::make_unique<Impl>()) {
  impl_->config = config;
  const int n = config.numa_shards;
  // int4's groups run along I in down: a slice boundary inside a group would split one scale.
  const int block = config.weight_dtype == WeightDType::int4 ? std::max(32, config.group_size) : 32;
  const auto slices = shard_slices(config.intermediate, n, block);
  auto places = runtime::plan_shards(runtime::system_topology(), n, runtime::numa_setting_from_env());
  impl_->one_node = runtime::shards_run_in_turn(places);
  if (impl_->one_node) {  // one node: the shards run as one call, on all of the node's cores
    std::vector<int> all;
    for (const runtime::Shard& place : places) all.insert(all.end(), place.cpus.begin(), place.cpus.end());
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    for (runtime::Shard& place : places) place.cpus = all;
  }
  for (int s = 0; s < n; ++s) {
    auto shard = std::make_unique<ShardState>();
    shard->index = s;
    shard->i0 = slices[static_cast<std::size_t>(s)].first;
    shard->i1 = slices[static_cast<std::size_t>(s)].second;
    shard->place = places[static_cast<std::size_t>(s)];
    const bool on_first_pool = impl_->one_node && s > 0;
    shard->rt = runtime_for(s, shard->place.cpus, on_first_pool ? impl_->shards.front()->rt.get() : nullptr);
    MoEConfig inner = config;
    inner.intermediate = shard->width();
    inner.numa_shards = 1;
    shard->layer = std::make_unique<MoELayer>(inner, shard->pool(), on_first_pool ? s : 0);
    impl_->layers.push_back(shard->layer.get());
    impl_->shards.push_back(std::move(shard));
  }
}

ShardedLayer::~ShardedLayer() = default;

void ShardedLayer::load_weights(const View* gate_up, const View* gate, const View* up, const View& down) {
  const int I = impl_->config.intermediate;
  const std::lock_guard<std::mutex> one_call(sharded_call_mutex());
  impl_->on_shards({[&](ShardState& s) { s.layer->load_weight_slice(gate_up, gate, up, down, I, s.i0); }});
}

void ShardedLayer::load_quantized(const QuantViews& q) {
  const int I = impl_->config.intermediate;
  const std::lock_guard<std::mutex> one_call(sharded_call_mutex());
  impl_->on_shards({[&](ShardState& s) { s.layer->load_quantized_slice(q, I, s.i0); }});
}

void ShardedLayer::read_quantized(const QuantViews& q) {
  // On the calling thread, shard after shard: int8 shards all write the same full-row down scales.
  const int I = impl_->config.intermediate;
  const std::lock_guard<std::mutex> one_call(sharded_call_mutex());
  for (const auto& s : impl_->shards) s->layer->read_quantized_slice(q, I, s->i0);
}

std::unique_ptr<LoRASlice> ShardedLayer::Impl::slice_lora(const ShardState& s, const LoRAViews& lora) const {
  const prof::Scope timed(prof::Stage::shard_lora_slice, prof::Kind::wall);
  std::unique_ptr<LoRASlice> out = s.rt->slices->take();
  LoRAViews& v = out->views;
  v = lora;  // scales, version, A_gu and B_d as given
  const std::int64_t E = config.num_experts, I = config.intermediate, w = s.width();
  const std::int64_t rg = lora.a_gu ? lora.a_gu.shape[1] : 0, rd = lora.a_d ? lora.a_d.shape[1] : 0;
  const std::size_t size = dtype_bytes(rg ? lora.a_gu.dtype : lora.a_d.dtype);
  std::byte* b_gu = rg ? node_local(out->b_gu, E * 2 * w * rg * size, s.node()) : nullptr;
  std::byte* a_d = rd ? node_local(out->a_d, E * rd * w * size, s.node()) : nullptr;
  if (rg) v.b_gu = like(lora.b_gu, b_gu, E, 2 * w, rg);
  if (rd) v.a_d = like(lora.a_d, a_d, E, rd, w);
  // Per expert, on the shard's own threads (first touch puts the slices on its node). Gate rows
  // S_s then up rows I + S_s of B_gu (contiguous runs of w * rg), columns S_s of A_d.
  const auto* src_b_gu = static_cast<const std::byte*>(lora.b_gu.data);
  const auto* src_a_d = static_cast<const std::byte*>(lora.a_d.data);
  s.pool().parallel_for(E, [&](std::int64_t e, int) {
    const prof::Scope busy(prof::Stage::shard_lora_slice, prof::Kind::busy);
    if (rg)
      for (const std::int64_t first : {std::int64_t{s.i0}, I + s.i0})
        std::memcpy(b_gu + ((e * 2 * w) + (first == s.i0 ? 0 : w)) * rg * size,
                    src_b_gu + (e * 2 * I + first) * rg * size, static_cast<std::size_t>(w * rg) * size);
    if (rd)
      for (std::int64_t q = 0; q < rd; ++q)
        std::memcpy(a_d + (e * rd + q) * w * size, src_a_d + ((e * rd + q) * I + s.i0) * size,
                    static_cast<std::size_t>(w) * size);
  });
  return out;
}

namespace {

// dst[a:b) = Σ_s (shard s's fp32 partial)[a:b) in shard order, rounded once (the form across nodes:
// each shard combined its own rows into a [T, H] partial, so only T·H floats a shard cross the link,
// not the k·T·H of its per-pair rows).
void sum_partials(const std::vector<std::unique_ptr<ShardState>>& shards, Buffer<float> ShardRuntime::*part,
                  const View& dst, std::int64_t a, std::int64_t b) {
  for (std::int64_t i = a; i < b; ++i) {
    float sum = 0.f;
    for (const auto& other : shards) sum += ((*other->rt).*part).data()[i];
    store_value(dst.data, dst.dtype, i, sum);
  }
}

// dst's elements [at, at + n) = elements [from, from + n) of src, an array of dst's dtype.
void copy_run(const View& dst, std::int64_t at, const void* src, std::int64_t from, std::int64_t n) {
  const std::size_t size = dtype_bytes(dst.dtype);
  std::memcpy(static_cast<std::byte*>(dst.data) + static_cast<std::size_t>(at) * size,
              static_cast<const std::byte*>(src) + static_cast<std::size_t>(from) * size,
              static_cast<std::size_t>(n) * size);
}

// The token-split reduction of round 2 (across nodes): tokens [t0, t1) of every partial in `parts`.
void reduce_tokens(const std::vector<std::unique_ptr<ShardState>>& shards, runtime::ThreadPool& pool,
                   std::int64_t t0, std::int64_t t1,
                   const std::vector<std::tuple<Buffer<float> ShardRuntime::*, const View*, std::int64_t>>& parts) {
  pool.parallel_for((t1 - t0 + kTokenChunk - 1) / kTokenChunk, [&](std::int64_t task, int) {
    const std::int64_t a = t0 + task * kTokenChunk, b = std::min(t1, a + kTokenChunk);
    for (const auto& [part, dst, width] : parts)
      if (*dst) sum_partials(shards, part, *dst, a * width, b * width);
  });
}

}  // namespace

std::shared_ptr<ShardedCache> ShardedLayer::forward(const View& x, const View& ids, const View& weights,
                                                    const View& out, const LoRAViews& lora, bool save) {
  Impl& L = *impl_;
  const std::int64_t T = x.shape[0], H = L.config.hidden;
  const auto n = static_cast<int>(L.shards.size());
  auto cache = std::make_shared<ShardedCache>();
  cache->caches.resize(static_cast<std::size_t>(n));
  cache->lora.resize(static_cast<std::size_t>(n));
  for (const auto& shard : L.shards) cache->slice_pools.push_back(shard->rt->slices);
  const bool has_lora = lora.has_gate_up() || lora.has_down();
  const auto slice_lora = [&](ShardState& s) {
    const auto k = static_cast<std::size_t>(s.index);
    if (has_lora) cache->lora[k] = L.slice_lora(s, lora);
    return has_lora ? cache->lora[k]->views : LoRAViews{};
  };
  const std::lock_guard<std::mutex> one_call(sharded_call_mutex());
  if (L.one_node) {  // one call over all shards' slices on their one pool
    L.run_as_one_call([&] {
      std::vector<LoRAViews> loras;
      for (auto& shard : L.shards) loras.push_back(slice_lora(*shard));
      std::vector<ForwardCachePtr> caches =
          L.layers.front()->forward_shards(L.layers, loras, x, ids, weights, out, save);
      if (save) cache->caches = std::move(caches);
    });
    return save ? cache : nullptr;
  }
  // Round 1: each shard's slice through its own combine, into its fp32 partial; round 2: out = Σ_s
  // partial_s for shard s's share of the tokens.
  const std::vector<Impl::Round> rounds{
      [&](ShardState& s) {
        const View partial = f32_view(node_local(s.rt->out, T * H, s.node()), T, H);
        cache->caches[static_cast<std::size_t>(s.index)] =
            s.layer->forward_validated(x, ids, weights, partial, slice_lora(s), save);
      },
      [&](ShardState& s) {
        reduce_tokens(L.shards, s.pool(), T * s.index / n, T * (s.index + 1) / n, {{&ShardRuntime::out, &out, H}});
      }};
  L.on_shards(rounds);
  return save ? cache : nullptr;
}

void ShardedLayer::backward(const ShardedCache& cache, const View& x, const LoRAViews& lora, const View& grad_out,
                            const View& grad_x, const View& grad_weights, const LoRAGradViews& lg) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  const std::int64_t T = grad_out.shape[0], H = c.hidden, E = c.num_experts, I = c.intermediate;
  const int K = c.top_k;
  const auto n = static_cast<int>(L.shards.size());
  const std::int64_t rg = lg.da_gu ? lg.da_gu.shape[1] : lg.db_gu ? lg.db_gu.shape[2] : 0;
  const std::int64_t rd = lg.da_d ? lg.da_d.shape[1] : lg.db_d ? lg.db_d.shape[2] : 0;
  // Where x and A_gu / B_d live now (the caller may have moved them since the forward: the outer
  // cache was re-pointed, these are the same arrays).
  for (const ForwardCachePtr& inner_cache : cache.caches) {
    inner_cache->x = x;
    inner_cache->lora.a_gu = lora.a_gu;
    inner_cache->lora.b_d = lora.b_d;
  }
  // The slice's own dB_gu rows / dA_d columns, in the caller's dtype (the layer rounds each once, as
  // N = 1 does), so that they only need copying into place.
  const auto slice_grads = [&](ShardState& s) {
    const std::int64_t w = s.width();
    LoRAGradViews inner;
    if (lg.db_gu) inner.db_gu = like(lg.db_gu, node_local(s.rt->db_gu, E * 2 * w * rg, s.node()), E, 2 * w, rg);
    if (lg.da_d) inner.da_d = like(lg.da_d, node_local(s.rt->da_d, E * rd * w, s.node()), E, rd, w);
    return inner;
  };
  // The slices' dB_gu rows / dA_d columns into place, in contiguous runs: per expert the gate rows and
  // the up rows of dB_gu (w * rg each), per (expert, q) the w columns of dA_d.
  const auto place_slices = [&](runtime::ThreadPool& pool, const std::vector<const ShardState*>& slices) {
    if (!(lg.db_gu || lg.da_d)) return;
    pool.parallel_for(E, [&](std::int64_t e, int) {
      const prof::Scope busy(prof::Stage::bwd_lora_grads_gu_d, prof::Kind::busy);
      for (const ShardState* o : slices) {
        const std::int64_t w = o->width();
        if (lg.db_gu) {
          const std::int64_t from = e * 2 * w * rg;
          copy_run(lg.db_gu, (e * 2 * I + o->i0) * rg, o->rt->db_gu.data(), from, w * rg);
          copy_run(lg.db_gu, (e * 2 * I + I + o->i0) * rg, o->rt->db_gu.data(), from + w * rg, w * rg);
        }
        if (lg.da_d)
          for (std::int64_t q = 0; q < rd; ++q)
            copy_run(lg.da_d, (e * rd + q) * I + o->i0, o->rt->da_d.data(), (e * rd + q) * w, w);
      }
    });
  };
  const std::lock_guard<std::mutex> one_call(sharded_call_mutex());
  if (L.one_node) {  // one call over all shards' slices on their one pool
    L.run_as_one_call([&] {
      std::vector<const ForwardCache*> caches;
      std::vector<LoRAGradViews> slices;
      std::vector<const ShardState*> states;
      for (auto& shard : L.shards) {
        caches.push_back(cache.caches[static_cast<std::size_t>(shard->index)].get());
        slices.push_back(slice_grads(*shard));
        states.push_back(shard.get());
      }
      LoRAGradViews whole;  // dA_gu and dB_d: from the pair sums over the slices
      whole.da_gu = lg.da_gu;
      whole.db_d = lg.db_d;
      L.layers.front()->backward_shards(L.layers, caches, grad_out, grad_x, grad_weights, whole, slices);
      place_slices(L.shards.front()->pool(), states);
    });
    return;
  }
  // Round 1: each shard's backward through its own combine into fp32 partials of dx and grad_w, its
  // B_gu^T dgu (its pool's workspace) and its slice's dB_gu rows / dA_d columns. dA_gu and dB_d wait
  // for the sums over shards. Round 2: dx and grad_w of shard s's share of the tokens (the sum of all
  // shards' partials); dA_gu and dB_d of its share of the experts from A_d h and B_gu^T dgu summed over
  // shards; its own dB_gu rows / dA_d columns.
  std::vector<PairRows> rows(static_cast<std::size_t>(n));
  const std::vector<Impl::Round> rounds{
      [&](ShardState& s) {
        View gx, gw;
        if (grad_x) gx = f32_view(node_local(s.rt->gx, T * H, s.node()), T, H);
        if (grad_weights) gw = f32_view(node_local(s.rt->gw, T * K, s.node()), T, K);
        s.layer->backward_validated(*cache.caches[static_cast<std::size_t>(s.index)], grad_out, gx, gw, slice_grads(s),
                                    &rows[static_cast<std::size_t>(s.index)]);
      },
      [&](ShardState& s) {
        const std::int64_t t0 = T * s.index / n, t1 = T * (s.index + 1) / n;
        reduce_tokens(L.shards, s.pool(), t0, t1,
                      {{&ShardRuntime::gx, &grad_x, H}, {&ShardRuntime::gw, &grad_weights, K}});
        const int e0 = static_cast<int>(E * s.index / n), e1 = static_cast<int>(E * (s.index + 1) / n);
        if (lg.da_gu || lg.db_d) {
          // Pair sums in shard order for the pairs of experts [e0, e1) (contiguous sorted rows).
          const std::vector<std::int64_t>& offsets = cache.caches[0]->routing.offsets;
          const std::int64_t p0 = offsets[static_cast<std::size_t>(e0)], p1 = offsets[static_cast<std::size_t>(e1)];
          const std::int64_t P = offsets.back();
          float* ad = lg.db_d ? node_local(s.rt->ad, P * rd, s.node()) : nullptr;
          float* bgu = lg.da_gu ? node_local(s.rt->bgu, P * rg, s.node()) : nullptr;
          s.pool().parallel_for((p1 - p0 + kPairChunk - 1) / kPairChunk, [&](std::int64_t task, int) {
            const prof::Scope busy(prof::Stage::bwd_db_d, prof::Kind::busy);
            const std::int64_t q0 = p0 + task * kPairChunk, q1 = std::min(p1, q0 + kPairChunk);
            for (std::int64_t i = q0 * rd; ad && i < q1 * rd; ++i) {
              float sum = 0.f;
              for (const ForwardCachePtr& part : cache.caches) sum += part->ad.data()[i];
              ad[i] = sum;
            }
            for (std::int64_t i = q0 * rg; bgu && i < q1 * rg; ++i) {
              float sum = 0.f;
              for (const PairRows& part : rows) sum += part.bgu[i];
              bgu[i] = sum;
            }
          });
          LoRAGradViews once;
          once.da_gu = lg.da_gu;
          once.db_d = lg.db_d;
          s.layer->shard_lora_grads(*cache.caches[static_cast<std::size_t>(s.index)], ad, bgu, e0, e1, once);
        }
        place_slices(s.pool(), {&s});
      }};
  L.on_shards(rounds);
}

std::vector<MemoryReport> ShardedLayer::memory_reports() {
  std::vector<MemoryReport> out;
  for (const auto& s : impl_->shards) out.push_back(s->layer->memory_report());
  return out;
}

std::size_t ShardedLayer::cache_bytes(const ShardedCache& cache) {
  std::size_t total = 0;
  for (const ForwardCachePtr& c : cache.caches)
    if (c) total += moe::cache_bytes(*c);
  for (const auto& slice : cache.lora)
    if (slice) total += slice->bytes();
  return total;
}

std::vector<ShardInfo> ShardedLayer::report() const {
  std::vector<ShardInfo> out;
  for (const auto& s : impl_->shards) {
    ShardInfo info;
    info.i0 = s->i0;
    info.i1 = s->i1;
    info.nodes = s->place.nodes;
    info.cpus = s->place.cpus;
    info.weight_bytes = s->layer->packed_weight_bytes();
    info.buffer_bytes = s->rt->buffer_bytes();
    const void* first = s->layer->packed_weight_address();
    info.weight_node = first ? runtime::node_of_address(first) : -1;
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace kt::moe
