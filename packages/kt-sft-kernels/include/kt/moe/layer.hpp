// One MoE layer's routed experts on the CPU: the math of DESIGN.md §2.
//
// Contract (checked by forward()/backward() through include/kt/moe/validate.hpp):
//   x, out, grad_out, grad_x : [T, H]      bf16 or f32
//   ids                      : [T, k]      i32 or i64; ids outside [0, E) are skipped
//   weights, grad_weights    : [T, k]      f32 or bf16
//   LoRA (all four one dtype): a_gu [E, r, H], b_gu [E, 2I, r], a_d [E, r, I], b_d [E, H, r]; f32 or
//                              bf16; a projection without LoRA has absent views (both A and B).
//   LoRA grads               : same shapes and dtype as the LoRA weights; written, never accumulated.
// Outputs are always fully written (zeros included). T = 0 is legal.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"
#include "kt/runtime/thread_pool.hpp"

namespace kt::moe {

// One NUMA shard of a layer with numa_shards > 1 (ADR 0701).
struct ShardInfo {
  int i0 = 0, i1 = 0;            // the intermediate slice [i0, i1)
  std::vector<int> nodes, cpus;  // placement (runtime::plan_shards): one pinned thread per CPU
  std::size_t weight_bytes = 0;  // packed base weights the shard owns
  std::size_t buffer_bytes = 0;  // fp32 partials of its runtime (shared by layers with this shard)
  int weight_node = -1;          // NUMA node of its first packed weight page (-1 = unknown)
};

struct LoRAViews {
  View a_gu, b_gu, a_d, b_d;
  float scale_gu = 0.f, scale_d = 0.f;
  std::int64_t version = 0;  // caller-bumped after each optimizer step (for tiers caching derived copies)
  bool has_gate_up() const { return static_cast<bool>(a_gu); }
  bool has_down() const { return static_cast<bool>(a_d); }
};

struct LoRAGradViews {
  View da_gu, db_gu, da_d, db_d;  // absent = not wanted (must match which projections have LoRA)
};

// What forward(save=true) keeps for backward (DESIGN.md §2): the routing, gu (bf16) and A_d·h (f32)
// per routed pair, and the views of x and the LoRA it ran with. Sized by the actual token count.
class ForwardCache;
struct ForwardCacheDeleter {
  void operator()(ForwardCache* cache) const;  // defined in src/moe, where ForwardCache is complete
};
using ForwardCachePtr = std::unique_ptr<ForwardCache, ForwardCacheDeleter>;

// Host bytes of one layer (MoELayer::memory_report). weights + scales + cache_spare are the layer's
// own; the workspace is the thread pool's, shared by `workspace_layers` layers (count it once per pool).
// load_quantized / read_quantized's four arrays (shapes: kt/moe/validate.hpp).
struct QuantViews {
  View gate_up_q, gate_up_scale, down_q, down_scale;
};

struct MemoryReport {
  std::size_t weights = 0;           // packed base weights (bf16 tiles, or int8 / int4 values)
  std::size_t scales = 0;            // fp32 scales of a quantized base
  std::size_t cache_spare = 0;       // the freed activation cache the layer keeps for its next forward
  std::size_t workspace_shared = 0;  // the pool's grow-only per-call workspace
  int workspace_layers = 0;          // layers sharing that workspace
  std::vector<MemoryReport> shards;  // numa_shards > 1: each shard's own (the fields above are their sums)
};

// Packed weight and scale bytes of a layer of this config (exact; what memory_report shows once loaded).
struct LayerSizes {
  std::size_t weights = 0, scales = 0;
};
LayerSizes layer_sizes(const MoEConfig& config);
// Activation-cache bytes a forward(save=true) keeps per routed pair (gu bf16, A_gu x and A_d h fp32).
std::size_t cache_bytes_per_pair(const MoEConfig& config, int rank_gu, int rank_d);
// Tests only: lowers the byte budget of a call's per-pair fp32 rows (ADR 0405) so that small shapes
// run in several token chunks; 0 restores the default. Returns the budget in force before.
std::size_t set_row_budget_for_testing(std::size_t bytes);

// For the NUMA shard wrapper, shards on different nodes (src/moe/sharded_layer.cpp): where a shard's
// backward left what the wrapper's second round reads (the pool's workspace; valid until the pool's
// next call).
struct PairRows {
  const float* bgu = nullptr;  // [P, r_gu] B_gu^T dgu of the layer's slice
};

class MoELayer {
 public:
  // The layers on one pool share its per-call workspace; workspace_slot gives a layer another one on
  // the same pool (the NUMA shards of one node run on one pool, each slice's rows in its own slot).
  MoELayer(const MoEConfig& config, runtime::ThreadPool& pool, int workspace_slot = 0);
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  const MoEConfig& config() const;
  bool loaded() const;

  // Packs the weights into the layer's own memory; the caller may free its arrays afterwards.
  void load_weights(const View& gate_up /*[E,2I,H] bf16*/, const View& down /*[E,H,I] bf16*/);
  void load_weights(const View& gate /*[E,I,H]*/, const View& up /*[E,I,H]*/, const View& down);
  // weight_dtype int8 / int4: the sources may be bf16 or f32; they are quantized while packing
  // (src/moe/quantize.hpp: the one rule). load_quantized takes pre-quantized values as they are
  // (include/kt/moe/quant.hpp), bit-exact: q int8 [E,N,K] + scale [E,N], or q uint8 [E,N,K/2] +
  // scale [E,N,K/group_size]; scales f32 or bf16. read_quantized writes them back (f32 scales).
  void load_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q, const View& down_scale);
  void read_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q, const View& down_scale);
  MemoryReport memory_report();

  // For the NUMA shard wrapper (src/moe/sharded_layer.cpp): packs the slice [i0, i0 + intermediate)
  // of full-width weights (gate_up [E, 2*source_intermediate, H] or gate/up [E, source_intermediate,
  // H]; down [E, H, source_intermediate]), checked by the caller. Exactly one of gate_up / (gate, up).
  void load_weight_slice(const View* gate_up, const View* gate, const View* up, const View& down,
                         int source_intermediate, int i0);
  // The same for a quantized base: the slice of load_quantized's full arrays (checked by the caller),
  // and read_quantized's inverse into the slice of full arrays (ADR 0701, "Quantized bases").
  void load_quantized_slice(const QuantViews& q, int source_intermediate, int i0);
  void read_quantized_slice(const QuantViews& q, int source_intermediate, int i0);
  // Bytes of packed base weights this layer owns (all shards together when numa_shards > 1), and the
  // first of them (null before load_weights).
  std::size_t packed_weight_bytes() const;
  const void* packed_weight_address() const;
  // numa_shards > 1: each shard's slice, placement and bytes; empty for an unsharded layer.
  std::vector<ShardInfo> shard_report() const;

  // Returns the activation cache when save is true, nullptr otherwise.
  ForwardCachePtr forward(const View& x, const View& ids, const View& weights,
                         const View& out, const LoRAViews& lora, bool save);
  // Consumes nothing itself: the caller (the binding's handle) decides when the cache dies.
  void backward(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                const View& grad_weights, const LoRAGradViews& lora_grads);

  // forward()/backward() without the argument checks, for callers that ran validate_forward /
  // validate_backward themselves (calls.cpp: checks in the submitting thread, work on the executor).
  // rows != null (the shard wrapper, shards on different nodes): where the call's B_gu^T dgu is.
  ForwardCachePtr forward_validated(const View& x, const View& ids, const View& weights, const View& out,
                                    const LoRAViews& lora, bool save);
  void backward_validated(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                          const View& grad_weights, const LoRAGradViews& lora_grads, PairRows* rows = nullptr);
  // For the NUMA shard wrapper, shards on different nodes, right after backward_validated(cache, ...,
  // rows) on this layer (its pool's workspace still holds that call's bf16 rows of x and grad_out):
  // dB_d and dA_gu of experts [e0, e1) from the pair sums over all shards of A_d h (ad, [P, r_d]) and
  // B_gu^T dgu (bgu, [P, r_gu]), written straight into lora_grads.db_d / da_gu (experts without pairs:
  // zeros).
  void shard_lora_grads(const ForwardCache& cache, const float* ad, const float* bgu, int e0, int e1,
                        const LoRAGradViews& lora_grads);
  // For the NUMA shard wrapper, shards on one node (one pool; this layer is shards[0]): the forward /
  // backward of all shards as one call, every phase one task list over the shards' slices of I, what
  // does not depend on the slice computed once (ADR 0701). loras[s]: shard s's LoRA (its B_gu rows and
  // A_d columns; A_gu, B_d as the caller's). Returns each shard's cache (save); the first also keeps the
  // routing and A_gu x, and the backward takes them in the same order. lora_grads: dA_gu and dB_d;
  // slice_grads[s]: shard s's dB_gu rows and dA_d columns.
  std::vector<ForwardCachePtr> forward_shards(const std::vector<MoELayer*>& shards, const std::vector<LoRAViews>& loras,
                                              const View& x, const View& ids, const View& weights, const View& out,
                                              bool save);
  void backward_shards(const std::vector<MoELayer*>& shards, const std::vector<const ForwardCache*>& caches,
                       const View& grad_out, const View& grad_x, const View& grad_weights,
                       const LoRAGradViews& lora_grads, const std::vector<LoRAGradViews>& slice_grads);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;

  // Each shard's call lock and workspace lock, in shard order (the wrapper runs one call at a time).
  static std::vector<std::unique_lock<std::mutex>> lock_all(const std::vector<MoELayer*>& shards);
  // The bodies of forward / backward over the slices of I that `shards` own ({this}: the plain layer),
  // on this layer's pool, with the layers' locks held.
  std::vector<ForwardCachePtr> forward_over(const std::vector<MoELayer*>& shards, const std::vector<LoRAViews>& loras,
                                            const View& x, const View& ids, const View& weights, const View& out,
                                            bool save);
  void backward_over(const std::vector<MoELayer*>& shards, const std::vector<const ForwardCache*>& caches,
                     const View& grad_out, const View& grad_x, const View& grad_weights,
                     const LoRAGradViews& lora_grads, const std::vector<LoRAGradViews>& slice_grads, PairRows* rows);
};

// Accessors to validate a backward call against its forward.
std::int64_t cache_tokens(const ForwardCache& cache);
const MoELayer* cache_layer(const ForwardCache& cache);
const View& cache_x(const ForwardCache& cache);
const LoRAViews& cache_lora(const ForwardCache& cache);
// Points the cache at where x and the LoRA arrays live now (a caller's tensor storage may move between
// forward and backward: resize_, set_, param.data = ...). Each must keep its shape and dtype
// (std::invalid_argument naming it otherwise); only the address may change (issue 16 item 8a).
void rebind_cache_inputs(ForwardCache& cache, const View& x, const LoRAViews& lora);
bool cache_has_lora_gate_up(const ForwardCache& cache);
bool cache_has_lora_down(const ForwardCache& cache);
// Host bytes the cache holds (its buffers as allocated, the routing included); 0 once consumed.
std::size_t cache_bytes(const ForwardCache& cache);

}  // namespace kt::moe
