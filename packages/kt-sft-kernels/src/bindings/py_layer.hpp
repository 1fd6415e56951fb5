// The Python MoELayer object and the bindings of its weights and memory (moe_weights.cpp); its
// forward/backward and the class definitions are in bind_moe.cpp.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <memory>

#include "kt/moe/config.hpp"
#include "kt/moe/layer.hpp"
#include "kt/runtime/pool_context.hpp"

namespace kt::bindings {

namespace nb = nanobind;

struct PyMoELayer {
  std::shared_ptr<runtime::PoolContext> context;  // declared first: outlives the layer that uses its pool
  std::unique_ptr<moe::MoELayer> layer;
  bool weights_loaded = false;  // only touched with the GIL held
};

// gate_up (or gate and up) and down, bf16 (or fp32 for a quantized layer): packed, quantized if asked.
void load_weights(PyMoELayer& self, nb::handle gate_up, nb::handle down, nb::handle gate, nb::handle up);
// The four arrays of a quantized base: loaded as given (bit-exact), or written back into caller arrays.
void load_quantized(PyMoELayer& self, nb::handle gu_q, nb::handle gu_s, nb::handle d_q, nb::handle d_s);
void read_quantized(PyMoELayer& self, nb::handle gu_q, nb::handle gu_s, nb::handle d_q, nb::handle d_s);
nb::dict memory_report(PyMoELayer& self);
nb::list shard_report(PyMoELayer& self);
nb::dict estimate_layer_bytes(const moe::MoEConfig& c, std::int64_t tokens, int lora_rank);

}  // namespace kt::bindings
