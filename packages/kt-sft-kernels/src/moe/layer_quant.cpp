// Quantized bases (int8 / int4, issue 11): loading (quantize while packing, or pre-quantized as
// is), reading back, and the layer's memory report. The packed layout is kt/moe/quant.hpp; the one
// quantization rule is quantize.cpp; the products are the tiers' KernelTable::quant entries.
#include "kt/moe/quant.hpp"
#include "layer_internal.hpp"
#include "quantize.hpp"

namespace kt::moe {

// The quantized form of pack_all: each expert's rows are quantized straight from the caller's
// bf16/fp32 arrays into the packing (quantize.hpp), never through a bf16 copy.
void MoELayer::Impl::quantize_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  const WeightDType dt = c.weight_dtype;
  L.gate_up_stride = quant_matrix_bytes(dt, gs, 2 * I, H);
  L.down_stride = quant_matrix_bytes(dt, gs, H, I);
  L.gate_up.ensure(L.gate_up_stride * E);
  L.down.ensure(L.down_stride * E);
  L.pool->parallel_for(E, [&](std::int64_t e64, int) {
    const int e = static_cast<int>(e64);
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    if (gate_up_w) {
      quantize_rows(expert_slice(*gate_up_w, e), gate_up_w->dtype, 2 * I, H, dt, gs, gu_dst, 2 * I, 0, "gate_up", e);
    } else {
      quantize_rows(expert_slice(*gate, e), gate->dtype, I, H, dt, gs, gu_dst, 2 * I, 0, "gate", e);
      quantize_rows(expert_slice(*up, e), up->dtype, I, H, dt, gs, gu_dst, 2 * I, I, "up", e);
    }
    quantize_rows(expert_slice(down_w, e), down_w.dtype, H, I, dt, gs, L.down.data() + e * L.down_stride, H, 0, "down",
                  e);
  });
  L.packed_by = nullptr;
  L.loaded = true;
}

void MoELayer::load_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q,
                              const View& down_scale) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  if (!L.quantized())
    bad_argument(std::string("load_quantized: this layer's weight_dtype is '") + weight_dtype_name(c.weight_dtype) +
                 "'; use load_weights(), or MoEConfig(weight_dtype='int8' or 'int4')");
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  const WeightDType dt = c.weight_dtype;
  validate_quantized(c, gate_up_q, gate_up_scale, down_q, down_scale);
  std::lock_guard<std::mutex> lock(L.mutex);
  L.loaded = false;
  L.gate_up_stride = quant_matrix_bytes(dt, gs, 2 * I, H);
  L.down_stride = quant_matrix_bytes(dt, gs, H, I);
  L.gate_up.ensure(L.gate_up_stride * E);
  L.down.ensure(L.down_stride * E);
  L.pool->parallel_for(E, [&](std::int64_t e64, int) {
    const int e = static_cast<int>(e64);
    copy_quantized_rows(expert_slice(gate_up_q, e), expert_slice(gate_up_scale, e), gate_up_scale.dtype, 2 * I, H, dt,
                        gs, L.gate_up.data() + e * L.gate_up_stride, 2 * I, 0);
    copy_quantized_rows(expert_slice(down_q, e), expert_slice(down_scale, e), down_scale.dtype, H, I, dt, gs,
                        L.down.data() + e * L.down_stride, H, 0);
  });
  L.packed_by = nullptr;
  L.loaded = true;
}

void MoELayer::read_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q,
                              const View& down_scale) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  if (!L.quantized())
    bad_argument(std::string("read_quantized: this layer's weight_dtype is '") + weight_dtype_name(c.weight_dtype) +
                 "', not int8/int4");
  if (!L.loaded) throw std::logic_error("MoELayer.read_quantized: call load_weights() or load_quantized() first");
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  validate_quantized(c, gate_up_q, gate_up_scale, down_q, down_scale);
  if (gate_up_scale.dtype != DType::f32 || down_scale.dtype != DType::f32)
    throw TypeError("read_quantized: the scale outputs must be float32");
  std::lock_guard<std::mutex> lock(L.mutex);
  for (int e = 0; e < E; ++e) {
    read_quantized_rows(L.gate_up_of(e), 2 * I, H, c.weight_dtype, gs, expert_slice_mut(gate_up_q, e),
                        reinterpret_cast<float*>(expert_slice_mut(gate_up_scale, e)));
    read_quantized_rows(L.down_of(e), H, I, c.weight_dtype, gs, expert_slice_mut(down_q, e),
                        reinterpret_cast<float*>(expert_slice_mut(down_scale, e)));
  }
}

MemoryReport MoELayer::memory_report() {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  MemoryReport m;
  if (L.sharded) {  // the shards own everything: their sums, and each shard's report
    m.shards = L.sharded->memory_reports();
    for (const MemoryReport& s : m.shards) {
      m.weights += s.weights;
      m.scales += s.scales;
      m.cache_spare += s.cache_spare;
      m.workspace_shared += s.workspace_shared;
      m.workspace_layers = std::max(m.workspace_layers, s.workspace_layers);
    }
    return m;
  }
  {
    std::lock_guard<std::mutex> lock(L.mutex);
    if (L.loaded) {  // bf16: the packing as allocated (a tier's tiles); quantized: values and scales apart
      const LayerSizes sizes = layer_sizes(c);
      m.weights = L.quantized() ? sizes.weights
                                : (L.gate_up_stride + L.down_stride) * static_cast<std::size_t>(c.num_experts);
      m.scales = sizes.scales;
    }
  }
  m.cache_spare = L.recycler->bytes();
  {
    const std::lock_guard<std::mutex> ws_lock(L.shared->mutex);
    m.workspace_shared = L.shared->ws.bytes();
  }
  m.workspace_layers = static_cast<int>(L.shared.use_count());  // the registry holds weak references only
  return m;
}

std::size_t cache_bytes_per_pair(const MoEConfig& c, int rank_gu, int rank_d) {
  return 2 * static_cast<std::size_t>(c.intermediate) * sizeof(bf16) +
         static_cast<std::size_t>(rank_gu + rank_d) * sizeof(float);
}

LayerSizes layer_sizes(const MoEConfig& c) {
  const std::size_t E = static_cast<std::size_t>(c.num_experts);
  const int H = c.hidden, I = c.intermediate;
  LayerSizes s;
  if (c.weight_dtype == WeightDType::bf16) {
    s.weights = E * 3 * static_cast<std::size_t>(I) * H * sizeof(bf16);
  } else {
    s.weights = E * (quant_value_bytes(c.weight_dtype, 2 * I, H) + quant_value_bytes(c.weight_dtype, H, I));
    s.scales = E * 4 *
               (quant_scale_count(c.weight_dtype, c.group_size, 2 * I, H) +
                quant_scale_count(c.weight_dtype, c.group_size, H, I));
  }
  return s;
}

}  // namespace kt::moe
