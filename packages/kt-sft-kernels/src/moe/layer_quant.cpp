// Quantized bases (int8 / int4, issue 11): loading (quantize while packing, or pre-quantized as
// is), reading back, and the layer's memory report. The packed layout is kt/moe/quant.hpp; the one
// quantization rule is quantize.cpp; the products are the tiers' KernelTable::quant entries.
#include "kt/moe/quant.hpp"
#include "layer_internal.hpp"
#include "quantize.hpp"

namespace kt::moe {

namespace {

// Row `row` of expert e of a [E, N] or [E, N, K] array.
const std::byte* row_of(const View& v, int e, std::int64_t row) {
  const std::int64_t row_elements = v.ndim == 3 ? v.shape[2] : 1;
  return expert_slice(v, e) + static_cast<std::size_t>(row * row_elements) * dtype_size(v.dtype);
}

}  // namespace

// The quantized form of pack_all: each expert's rows are quantized straight from the caller's
// bf16/fp32 arrays into the packing (quantize.hpp), never through a bf16 copy. source_I > 0: the
// arrays are source_I wide and this layer takes the slice [i0, i0 + I) (a NUMA shard): gate rows i0..,
// up rows source_I + i0.., down columns i0.. with the full rows' scales (ColumnWindow), so the shard
// holds exactly its slice of the whole layer's quantized weights.
void MoELayer::Impl::quantize_all(const View* gate_up_w, const View* gate, const View* up, const View& down_w,
                                  int source_I, int i0) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  const int SI = source_I > 0 ? source_I : I;
  const WeightDType dt = c.weight_dtype;
  L.reserve_experts(quant_matrix_bytes(dt, gs, 2 * I, H), quant_matrix_bytes(dt, gs, H, I));
  L.pool->parallel_for(E, [&](std::int64_t e64, int) {
    const int e = static_cast<int>(e64);
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    // Quantization is per row along H, so gate and up quantized apart equal [gate; up] quantized whole.
    const View& g = gate_up_w ? *gate_up_w : *gate;
    const View& u = gate_up_w ? *gate_up_w : *up;
    const int up_row = gate_up_w ? SI + i0 : i0;
    quantize_rows(row_of(g, e, i0), g.dtype, I, H, dt, gs, gu_dst, 2 * I, 0, gate_up_w ? "gate_up" : "gate", e);
    quantize_rows(row_of(u, e, up_row), u.dtype, I, H, dt, gs, gu_dst, 2 * I, I, gate_up_w ? "gate_up" : "up", e);
    quantize_rows(expert_slice(down_w, e), down_w.dtype, H, I, dt, gs, L.down.data() + e * L.down_stride, H, 0, "down",
                  e, ColumnWindow{SI, i0});
  });
  L.packed_by = nullptr;
  L.loaded = true;
}

// load_quantized's copy into the packing; source_I / i0 as quantize_all.
void MoELayer::Impl::copy_quantized_all(const QuantViews& q, int source_I, int i0) {
  Impl& L = *this;
  const MoEConfig& c = L.config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  const int SI = source_I > 0 ? source_I : I;
  const WeightDType dt = c.weight_dtype;
  L.loaded = false;
  L.reserve_experts(quant_matrix_bytes(dt, gs, 2 * I, H), quant_matrix_bytes(dt, gs, H, I));
  L.pool->parallel_for(E, [&](std::int64_t e64, int) {
    const int e = static_cast<int>(e64);
    std::byte* gu_dst = L.gate_up.data() + e * L.gate_up_stride;
    for (const auto& [from, to] : {std::pair{i0, 0}, std::pair{SI + i0, I}})  // gate rows, then up rows
      copy_quantized_rows(row_of(q.gate_up_q, e, from), row_of(q.gate_up_scale, e, from), q.gate_up_scale.dtype, I, H,
                          dt, gs, gu_dst, 2 * I, to);
    copy_quantized_rows(expert_slice(q.down_q, e), expert_slice(q.down_scale, e), q.down_scale.dtype, H, I, dt, gs,
                        L.down.data() + e * L.down_stride, H, 0, ColumnWindow{SI, i0});
  });
  L.packed_by = nullptr;
  L.loaded = true;
}

// read_quantized's copy out of the packing; source_I / i0 as quantize_all (int8: every shard writes
// the same full-row down scales).
void MoELayer::Impl::read_quantized_all(const QuantViews& q, int source_I, int i0) const {
  const MoEConfig& c = config;
  const int E = c.num_experts, H = c.hidden, I = c.intermediate, gs = c.group_size;
  const int SI = source_I > 0 ? source_I : I;
  const WeightDType dt = c.weight_dtype;
  // Values a tier arranged (packed_by) come back row-major through this copy, one matrix at a time.
  std::vector<std::byte> scratch(packed_by ? std::max(gate_up_stride, down_stride) : 0);
  for (int e = 0; e < E; ++e) {
    const std::byte* gu = row_major_quantized(e, 0, scratch.data());
    for (const auto& [to, from] : {std::pair{i0, 0}, std::pair{SI + i0, I}})
      read_quantized_rows(gu, I, H, dt, gs, const_cast<std::byte*>(row_of(q.gate_up_q, e, to)),
                          reinterpret_cast<float*>(const_cast<std::byte*>(row_of(q.gate_up_scale, e, to))), 2 * I,
                          from);
    read_quantized_rows(row_major_quantized(e, 1, scratch.data()), H, I, dt, gs, expert_slice_mut(q.down_q, e),
                        reinterpret_cast<float*>(expert_slice_mut(q.down_scale, e)), H, 0, ColumnWindow{SI, i0});
  }
}

void MoELayer::load_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q,
                              const View& down_scale) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  if (!L.quantized())
    bad_argument(std::string("load_quantized: this layer's weight_dtype is '") + weight_dtype_name(c.weight_dtype) +
                 "'; use load_weights(), or MoEConfig(weight_dtype='int8' or 'int4')");
  validate_quantized(c, gate_up_q, gate_up_scale, down_q, down_scale);
  validate_quantized_scales(gate_up_scale, down_scale);
  const QuantViews q{gate_up_q, gate_up_scale, down_q, down_scale};
  std::lock_guard<std::mutex> lock(L.mutex);
  L.loaded = false;
  if (L.sharded) {
    L.sharded->load_quantized(q);
    L.loaded = true;
    return;
  }
  L.copy_quantized_all(q, 0, 0);
}

void MoELayer::read_quantized(const View& gate_up_q, const View& gate_up_scale, const View& down_q,
                              const View& down_scale) {
  Impl& L = *impl_;
  const MoEConfig& c = L.config;
  if (!L.quantized())
    bad_argument(std::string("read_quantized: this layer's weight_dtype is '") + weight_dtype_name(c.weight_dtype) +
                 "', not int8/int4");
  if (!L.loaded) throw std::logic_error("MoELayer.read_quantized: call load_weights() or load_quantized() first");
  validate_quantized(c, gate_up_q, gate_up_scale, down_q, down_scale);
  if (gate_up_scale.dtype != DType::f32 || down_scale.dtype != DType::f32)
    throw TypeError("read_quantized: the scale outputs must be float32");
  const QuantViews q{gate_up_q, gate_up_scale, down_q, down_scale};
  std::lock_guard<std::mutex> lock(L.mutex);
  if (L.sharded) return L.sharded->read_quantized(q);
  L.read_quantized_all(q, 0, 0);
}

void MoELayer::load_quantized_slice(const QuantViews& q, int source_intermediate, int i0) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->copy_quantized_all(q, source_intermediate, i0);
}

void MoELayer::read_quantized_slice(const QuantViews& q, int source_intermediate, int i0) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->read_quantized_all(q, source_intermediate, i0);
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
    // numa_shards > 1: every shard keeps the full-row scales of its down columns (int8: H a shard and
    // expert; int4's groups are split, not copied).
    const std::size_t down_copies = c.weight_dtype == WeightDType::int8 ? static_cast<std::size_t>(c.numa_shards) : 1;
    s.scales = E * 4 *
               (quant_scale_count(c.weight_dtype, c.group_size, 2 * I, H) +
                down_copies * quant_scale_count(c.weight_dtype, c.group_size, H, I));
  }
  return s;
}

}  // namespace kt::moe
