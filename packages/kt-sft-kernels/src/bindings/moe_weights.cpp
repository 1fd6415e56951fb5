// Bindings of a layer's weights and memory: load_weights, load_quantized / read_quantized,
// memory_report, shard_report and estimate_layer_bytes (shapes and dtypes are checked in C++,
// kt/moe/validate.hpp; the loads run on the layer's pool executor, in order with its calls).
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "kt/core/errors.hpp"
#include "kt/moe/validate.hpp"
#include "py_layer.hpp"

namespace kt::bindings {
namespace {

// load_quantized / read_quantized: the four arrays of a quantized base (shapes checked in C++).
struct QuantArrays {
  Array gu_q, gu_s, d_q, d_s;
};

QuantArrays import_quant_arrays(const PyMoELayer& self, nb::handle gu_q, nb::handle gu_s, nb::handle d_q,
                                nb::handle d_s, Access access) {
  const moe::MoEConfig& c = self.layer->config();
  if (c.weight_dtype == moe::WeightDType::bf16)
    raise_value(std::string(access == Access::read ? "load_quantized" : "read_quantized") +
                ": this layer's weight_dtype is 'bf16'; use MoEConfig(weight_dtype='int8' or 'int4')");
  const int scale_ndim = c.weight_dtype == moe::WeightDType::int8 ? 2 : 3;
  const unsigned scale_dtypes = access == Access::read ? (kF32 | kBF16) : kF32;
  QuantArrays q;
  q.gu_q = import_array(gu_q, "gate_up_q", kI8 | kU8, 3, access);
  q.gu_s = import_array(gu_s, "gate_up_scale", scale_dtypes, scale_ndim, access);
  q.d_q = import_array(d_q, "down_q", kI8 | kU8, 3, access);
  q.d_s = import_array(d_s, "down_scale", scale_dtypes, scale_ndim, access);
  if (access == Access::write) check_no_overlap({q.gu_q.named(), q.gu_s.named(), q.d_q.named(), q.d_s.named()}, {});
  return q;
}

}  // namespace

void load_weights(PyMoELayer& self, nb::handle gate_up, nb::handle down, nb::handle gate, nb::handle up) {
  if (!gate_up.is_none() && (!gate.is_none() || !up.is_none()))
    raise_type("load_weights: give either gate_up, or gate and up, not both");
  const bool separate = gate_up.is_none();
  if (separate && (gate.is_none() || up.is_none()))
    raise_type(gate_up.is_none() && gate.is_none() && up.is_none()
                   ? "gate_up: required (or gate= and up= separately)"
                   : std::string(gate.is_none() ? "gate" : "up") + ": required together with " +
                         (gate.is_none() ? "up" : "gate"));
  // A quantized layer quantizes bf16 or fp32 sources while packing.
  const unsigned kWeightDTypes = self.layer->config().weight_dtype == moe::WeightDType::bf16 ? kBF16 : kBF16 | kF32;
  Array down_a = import_array(down, "down", kWeightDTypes, 3, Access::read);
  Array gu_a, g_a, u_a;
  if (separate) {
    g_a = import_array(gate, "gate", kWeightDTypes, 3, Access::read);
    u_a = import_array(up, "up", kWeightDTypes, 3, Access::read);
  } else {
    gu_a = import_array(gate_up, "gate_up", kWeightDTypes, 3, Access::read);
  }
  moe::MoELayer* layer = self.layer.get();
  const View gu = gu_a.view, g = g_a.view, u = u_a.view, d = down_a.view;
  moe::validate_weights(layer->config(), gu, g, u, d);  // here, so a mistake leaves loaded weights loaded
  self.weights_loaded = false;
  auto job = self.context->submit([=] {
    if (separate)
      layer->load_weights(g, u, d);
    else
      layer->load_weights(gu, d);
  });
  wait_and_rethrow(*job);
  self.weights_loaded = true;
}

void load_quantized(PyMoELayer& self, nb::handle gu_q, nb::handle gu_s, nb::handle d_q, nb::handle d_s) {
  const QuantArrays q = import_quant_arrays(self, gu_q, gu_s, d_q, d_s, Access::read);
  moe::MoELayer* layer = self.layer.get();
  const View a = q.gu_q.view, b = q.gu_s.view, cq = q.d_q.view, d = q.d_s.view;
  self.weights_loaded = false;
  auto job = self.context->submit([=] { layer->load_quantized(a, b, cq, d); });
  wait_and_rethrow(*job);
  self.weights_loaded = true;
}

void read_quantized(PyMoELayer& self, nb::handle gu_q, nb::handle gu_s, nb::handle d_q, nb::handle d_s) {
  if (!self.weights_loaded) throw std::runtime_error("MoELayer: call load_weights() or load_quantized() first");
  const QuantArrays q = import_quant_arrays(self, gu_q, gu_s, d_q, d_s, Access::write);
  moe::MoELayer* layer = self.layer.get();
  const View a = q.gu_q.view, b = q.gu_s.view, cq = q.d_q.view, d = q.d_s.view;
  auto job = self.context->submit([=] { layer->read_quantized(a, b, cq, d); });
  wait_and_rethrow(*job);
}

nb::dict memory_report(PyMoELayer& self) {
  moe::MemoryReport m;
  {
    nb::gil_scoped_release release;  // waits for the layer's call in flight, if any
    m = self.layer->memory_report();
  }
  nb::dict d;
  d["weights"] = m.weights;
  d["scales"] = m.scales;
  d["cache_spare"] = m.cache_spare;
  d["total"] = m.weights + m.scales + m.cache_spare;
  d["workspace_shared"] = m.workspace_shared;
  d["workspace_layers"] = m.workspace_layers;
  if (!m.shards.empty()) {  // numa_shards > 1: the fields above are the shards' sums
    nb::list shards;
    for (const moe::MemoryReport& s : m.shards) {
      nb::dict one;
      one["weights"] = s.weights;
      one["scales"] = s.scales;
      one["cache_spare"] = s.cache_spare;
      one["total"] = s.weights + s.scales + s.cache_spare;
      one["workspace_shared"] = s.workspace_shared;
      shards.append(one);
    }
    d["shards"] = shards;
  }
  return d;
}

nb::dict estimate_layer_bytes(const moe::MoEConfig& c, std::int64_t tokens, int lora_rank) {
  if (tokens < 0) raise_value("tokens must be >= 0, got " + std::to_string(tokens));
  if (lora_rank < 0) raise_value("lora_rank must be >= 0, got " + std::to_string(lora_rank));
  const moe::LayerSizes s = moe::layer_sizes(c);
  const std::size_t cache =
      static_cast<std::size_t>(tokens) * static_cast<std::size_t>(c.top_k) * moe::cache_bytes_per_pair(c, lora_rank, lora_rank);
  nb::dict d;
  d["weights"] = s.weights;
  d["scales"] = s.scales;
  d["cache"] = cache;
  d["total"] = s.weights + s.scales + cache;
  return d;
}

nb::list shard_report(PyMoELayer& self) {
  std::vector<moe::ShardInfo> infos;
  // On the pool's executor: never concurrent with a call that grows the shards' buffers.
  wait_and_rethrow(*self.context->submit([&] { infos = self.layer->shard_report(); }));
  nb::list out;
  for (const moe::ShardInfo& s : infos) {
    nb::dict d;
    d["i0"] = s.i0;
    d["i1"] = s.i1;
    d["nodes"] = s.nodes;
    d["cpus"] = s.cpus;
    d["weight_bytes"] = s.weight_bytes;
    d["buffer_bytes"] = s.buffer_bytes;
    d["weight_node"] = s.weight_node;
    out.append(d);
  }
  return out;
}

}  // namespace kt::bindings
