// Argument validation of the layer's public entry points, in one place (DESIGN.md §3.3, §5). The
// bindings only import arrays (device, dtype, rank, contiguity, alignment, writability) and hand the
// views here; MoELayer's entry points call the same checks, so the C++ API is memory-safe on its own.
// Errors: std::invalid_argument (Python ValueError) for shapes/values, kt::TypeError for dtypes and
// missing pieces, both naming the argument as Python spells it.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "kt/core/tensor.hpp"
#include "kt/moe/config.hpp"
#include "kt/moe/layer.hpp"

namespace kt::moe {

// One argument as the user named it.
struct NamedView {
  View view;
  const char* name = "";
};

std::string dtype_name(DType dtype);
std::size_t dtype_bytes(DType dtype);
std::string shape_text(const View& view);  // Python style: "(2, 3)", "(4,)"

// `expected` entries < 0 are free dimensions, printed as `free_label`.
void check_shape(const NamedView& a, std::initializer_list<std::int64_t> expected, const char* free_label = "T");
// Every output must not share memory with any other argument (inputs or outputs).
void check_no_overlap(const std::vector<NamedView>& outputs, const std::vector<NamedView>& inputs);

// load_weights: down [E,H,I] and either gate_up [E,2I,H] or gate and up [E,I,H] each; bf16 (quantized
// layers: bf16 or f32).
void validate_weights(const MoEConfig& config, const View& gate_up, const View& gate, const View& up,
                      const View& down);

// load_quantized / read_quantized: q [E, N, K] int8 (int8) or [E, N, K/2] uint8 (int4); scale [E, N]
// (int8) or [E, N, K/group] (int4), f32 or bf16; gate_up N = 2I, K = H; down N = H, K = I.
void validate_quantized(const MoEConfig& config, const View& gate_up_q, const View& gate_up_scale,
                        const View& down_q, const View& down_scale);
// load_quantized: every scale finite (a NaN or infinite scale would turn its whole row into NaN).
void validate_quantized_scales(const View& gate_up_scale, const View& down_scale);

// kk.LoRA(...): both arrays of a projection or neither, at least one projection, one dtype, rank >= 1,
// each B matching its A.
void validate_lora(const LoRAViews& lora);
// kk.LoRAGrads(...): both arrays of a projection or neither, at least one projection, one dtype.
void validate_lora_grads(const LoRAGradViews& grads);
// The LoRA against a layer: a_gu [E,r,H], b_gu [E,2I,r], a_d [E,r,I], b_d [E,H,r].
void validate_lora_for(const LoRAViews& lora, const MoEConfig& config);

// forward(x [T,H], ids [T,k], weights [T,k], out [T,H], lora): shapes, the LoRA against the
// layer, and out aliasing nothing. Returns T.
std::int64_t validate_forward(const MoEConfig& config, const View& x, const View& ids, const View& weights,
                              const View& out, const LoRAViews& lora);

// backward of a forward over `tokens` tokens that read `x` and `lora`: grad_out [T,H]; grad_x [T,H]
// and grad_weights [T,k] may be absent (not wanted); a LoRA gradient must be absent where the
// forward's LoRA has no array, and present where it has one when `all_lora_grads` is set.
void validate_backward(const MoEConfig& config, std::int64_t tokens, const View& x, const LoRAViews& lora,
                       const View& grad_out, const View& grad_x, const View& grad_weights,
                       const LoRAGradViews& grads, bool all_lora_grads);

// The memory-safety re-check (issue 16 item 8a): an array read again from its owner at a later call
// must have the shape and dtype it had when it was taken; only its address may have moved.
void check_unchanged(const View& before, const View& now, const char* name, const char* taken_at);

}  // namespace kt::moe
