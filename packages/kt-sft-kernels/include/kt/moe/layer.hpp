// One MoE layer's routed experts on the CPU: the math of DESIGN.md §2.
//
// Contract with the bindings (which validate every shape/dtype/contiguity before calling here):
//   x, out, grad_out, grad_x : [T, H]      bf16 or f32
//   ids                      : [T, k]      i32 or i64; ids outside [0, E) are skipped
//   weights, grad_weights    : [T, k]      f32 or bf16
//   LoRA (all four one dtype): a_gu [E, r, H], b_gu [E, 2I, r], a_d [E, r, I], b_d [E, H, r]; f32 or
//                              bf16; a projection without LoRA has absent views (both A and B).
//   LoRA grads               : same shapes and dtype as the LoRA weights; written, never accumulated.
// Outputs are always fully written (zeros included). T = 0 is legal.
#pragma once
#include <cstdint>
#include <memory>

#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"
#include "kt/runtime/thread_pool.hpp"

namespace kt::moe {

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

class MoELayer {
 public:
  MoELayer(const MoEConfig& config, runtime::ThreadPool& pool);
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  const MoEConfig& config() const;
  bool loaded() const;

  // Packs the weights into the layer's own memory; the caller may free its arrays afterwards.
  void load_weights(const View& gate_up /*[E,2I,H] bf16*/, const View& down /*[E,H,I] bf16*/);
  void load_weights(const View& gate /*[E,I,H]*/, const View& up /*[E,I,H]*/, const View& down);

  // Returns the activation cache when save is true, nullptr otherwise.
  ForwardCachePtr forward(const View& x, const View& ids, const View& weights,
                         const View& out, const LoRAViews& lora, bool save);
  // Consumes nothing itself: the caller (the binding's handle) decides when the cache dies.
  void backward(const ForwardCache& cache, const View& grad_out, const View& grad_x,
                const View& grad_weights, const LoRAGradViews& lora_grads);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Accessors the bindings need to validate a backward call against its forward.
std::int64_t cache_tokens(const ForwardCache& cache);
const MoELayer* cache_layer(const ForwardCache& cache);
bool cache_has_lora_gate_up(const ForwardCache& cache);
bool cache_has_lora_down(const ForwardCache& cache);

}  // namespace kt::moe
