// MoE bindings: MoEConfig, LoRA, LoRAGrads, MoELayer, ForwardHandle, Pending.
//
// Every call validates its arguments here, in the calling thread, then becomes a job on the layer's
// pool executor (sync = submit + wait with the GIL released). Jobs see only raw views; the Python
// objects that own the memory stay with the Pending / ForwardHandle, whose lifetime covers the job.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "kt/core/errors.hpp"
#include "kt/moe/config.hpp"
#include "kt/moe/layer.hpp"

namespace kt::bindings {
namespace {

using moe::ForwardCache;

constexpr unsigned kActivationDTypes = kBF16 | kF32;
constexpr unsigned kRoutingDTypes = kF32 | kBF16;
constexpr unsigned kIdDTypes = kI32 | kI64;
constexpr unsigned kLoRADTypes = kF32 | kBF16;

std::string object_type_name(nb::handle obj) {
  return nb::str(obj.type().attr("__qualname__")).c_str();
}

// ---------------------------------------------------------------------------------------------
// LoRA and LoRAGrads

// The four LoRA arrays (weights or gradients); a projection without LoRA has both arrays absent.
struct LoRAArrays {
  Array a_gu, b_gu, a_d, b_d;
  nb::object objects[4];  // what the caller passed (returned by the properties)

  bool has_gate_up() const { return static_cast<bool>(a_gu); }
  bool has_down() const { return static_cast<bool>(a_d); }
  std::vector<const Array*> all() const { return {&a_gu, &b_gu, &a_d, &b_d}; }
};

LoRAArrays import_lora_arrays(nb::handle a_gu, nb::handle b_gu, nb::handle a_d, nb::handle b_d,
                              const char* const names[4], Access access) {
  LoRAArrays l;
  const nb::handle given[4] = {a_gu, b_gu, a_d, b_d};
  Array* slots[4] = {&l.a_gu, &l.b_gu, &l.a_d, &l.b_d};
  for (int i = 0; i < 4; ++i) {
    *slots[i] = import_array(given[i], names[i], kLoRADTypes, 3, access, /*optional=*/true);
    l.objects[i] = nb::borrow(given[i]);
  }
  for (int pair = 0; pair < 2; ++pair) {
    const Array& a = *slots[2 * pair];
    const Array& b = *slots[2 * pair + 1];
    if (static_cast<bool>(a) != static_cast<bool>(b)) {
      raise_type(std::string(a ? b.name : a.name) + ": required together with " + (a ? a.name : b.name) +
                 " (give both arrays of a projection, or neither for no LoRA on it)");
    }
  }
  if (!l.has_gate_up() && !l.has_down())
    raise_type(std::string("LoRA: no arrays given; give the gate_up pair, the down pair, or both"));
  const Array* first = l.has_gate_up() ? &l.a_gu : &l.a_d;
  for (const Array* a : l.all()) {
    if (*a && a->view.dtype != first->view.dtype) {
      raise_type(std::string(a->name) + ": dtype " + dtype_name(a->view.dtype) + " differs from " + first->name +
                 "'s " + dtype_name(first->view.dtype) + "; all LoRA arrays must share one dtype");
    }
  }
  return l;
}

struct PyLoRA {
  LoRAArrays arrays;
  float scale_gu = 0.f, scale_d = 0.f;
  std::int64_t version = 0;

  DType dtype() const { return arrays.has_gate_up() ? arrays.a_gu.view.dtype : arrays.a_d.view.dtype; }
  std::int64_t rank_gate_up() const { return arrays.has_gate_up() ? arrays.a_gu.dim(1) : 0; }
  std::int64_t rank_down() const { return arrays.has_down() ? arrays.a_d.dim(1) : 0; }

  // Shapes against the layer (DESIGN.md §2): a_gu [E,r,H], b_gu [E,2I,r], a_d [E,r,I], b_d [E,H,r].
  void check_config(const moe::MoEConfig& c) const {
    const std::int64_t E = c.num_experts, H = c.hidden, I = c.intermediate;
    if (arrays.has_gate_up()) {
      check_shape(arrays.a_gu, {E, -1, H}, "r");
      check_shape(arrays.b_gu, {E, 2 * I, rank_gate_up()});
    }
    if (arrays.has_down()) {
      check_shape(arrays.a_d, {E, -1, I}, "r");
      check_shape(arrays.b_d, {E, H, rank_down()});
    }
  }

  moe::LoRAViews views() const {
    moe::LoRAViews v;
    v.a_gu = arrays.a_gu.view;
    v.b_gu = arrays.b_gu.view;
    v.a_d = arrays.a_d.view;
    v.b_d = arrays.b_d.view;
    v.scale_gu = scale_gu;
    v.scale_d = scale_d;
    v.version = version;
    return v;
  }
};

float checked_scale(std::optional<double> scale, bool needed, const char* name) {
  if (!needed) return scale ? static_cast<float>(*scale) : 0.f;
  if (!scale) raise_type(std::string(name) + ": required when its projection has LoRA arrays");
  if (!std::isfinite(*scale)) raise_value(std::string(name) + ": must be finite, got " + std::to_string(*scale));
  return static_cast<float>(*scale);
}

PyLoRA make_lora(nb::handle a_gu, nb::handle b_gu, nb::handle a_d, nb::handle b_d, std::optional<double> scale_gu,
                 std::optional<double> scale_d, std::int64_t version) {
  static const char* const names[4] = {"a_gu", "b_gu", "a_d", "b_d"};
  PyLoRA l;
  l.arrays = import_lora_arrays(a_gu, b_gu, a_d, b_d, names, Access::read);
  // Pair-internal consistency now, so mistakes surface where the LoRA is built.
  const auto check_pair = [](const Array& a, const Array& b, bool gate_up) {
    if (!a) return;
    const std::int64_t E = a.dim(0), r = a.dim(1);
    if (r < 1) raise_value(std::string(a.name) + ": rank (dimension 1) must be >= 1; pass None for no LoRA");
    if (b.dim(0) != E || b.dim(2) != r) {
      raise_value(std::string(b.name) + ": expected shape (" + std::to_string(E) + ", " + (gate_up ? "2I" : "H") +
                  ", " + std::to_string(r) + ") to match " + a.name + " " + shape_text(a.view) + ", got " +
                  shape_text(b.view));
    }
    if (gate_up && b.dim(1) % 2 != 0)
      raise_value(std::string(b.name) + ": dimension 1 is 2I (gate rows, then up rows) and must be even, got " +
                  std::to_string(b.dim(1)));
  };
  check_pair(l.arrays.a_gu, l.arrays.b_gu, true);
  check_pair(l.arrays.a_d, l.arrays.b_d, false);
  l.scale_gu = checked_scale(scale_gu, l.arrays.has_gate_up(), "scale_gu");
  l.scale_d = checked_scale(scale_d, l.arrays.has_down(), "scale_d");
  l.version = version;
  return l;
}

struct PyLoRAGrads {
  LoRAArrays arrays;
};

PyLoRAGrads make_lora_grads(nb::handle da_gu, nb::handle db_gu, nb::handle da_d, nb::handle db_d) {
  static const char* const names[4] = {"da_gu", "db_gu", "da_d", "db_d"};
  return PyLoRAGrads{import_lora_arrays(da_gu, db_gu, da_d, db_d, names, Access::write)};
}

// ---------------------------------------------------------------------------------------------
// MoELayer, ForwardHandle, Pending

struct PyMoELayer {
  std::shared_ptr<PoolContext> context;   // declared first: outlives the layer that uses its pool
  std::unique_ptr<moe::MoELayer> layer;
  bool weights_loaded = false;            // only touched with the GIL held
};

struct PyForwardHandle {
  nb::object layer_object;                 // keeps the layer alive
  const PyMoELayer* layer = nullptr;
  std::shared_ptr<ForwardCache> cache;     // null once consumed
  Array x;                                 // the forward's input: the backward reads it
  nb::object lora_object;                  // the forward's PyLoRA (or None): the backward reads it
  std::int64_t tokens = 0;
  bool consumed = false;

  const PyLoRA* lora() const { return lora_object.is_none() ? nullptr : nb::cast<const PyLoRA*>(lora_object); }
};

// Where a forward job leaves its cache.
struct CacheSlot {
  std::shared_ptr<ForwardCache> cache;
};

void warn_unraisable(const std::string& message) {
  nb::error_scope keep_pending_error;
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) PyErr_WriteUnraisable(nullptr);
}

struct PyPending {
  std::shared_ptr<runtime::Job> job;
  std::vector<Array> arrays;        // every array the call reads or writes
  std::vector<nb::object> objects;  // the layer, LoRA, handle, ... the call uses
  // forward(save=True) only: the ForwardHandle made on completion.
  std::shared_ptr<CacheSlot> slot;
  nb::object layer_object;
  const PyMoELayer* layer = nullptr;
  nb::object lora_object;
  std::int64_t tokens = 0;
  PyForwardHandle* consumed_handle = nullptr;  // backward only (kept alive by `objects`)
  const char* what = "";            // "forward" / "backward", for messages

  bool finished = false;
  std::exception_ptr error;
  nb::object result = nb::none();

  PyPending() = default;
  PyPending(PyPending&&) = default;
  PyPending& operator=(PyPending&&) = delete;
  PyPending(const PyPending&) = delete;
  PyPending& operator=(const PyPending&) = delete;

  ~PyPending() {
    if (!job || finished) return;
    {
      nb::gil_scoped_release release;
      job->wait();
    }
    if (job->error()) {
      try {
        std::rethrow_exception(job->error());
      } catch (const std::exception& e) {
        warn_unraisable(std::string("kt_sft_kernels: a ") + what + "_async() call failed and its Pending was dropped "
                        "without wait(): " + e.what());
      } catch (...) {
        warn_unraisable(std::string("kt_sft_kernels: a ") + what + "_async() call failed and its Pending was dropped "
                        "without wait()");
      }
    }
  }

  nb::object wait() {
    if (!finished) {
      {
        nb::gil_scoped_release release;
        job->wait();
      }
      if (!finished) finish();  // another Python thread may have finished it meanwhile
    }
    if (error) std::rethrow_exception(error);
    return result;
  }

  bool done() const { return finished || job->done(); }

 private:
  // With the GIL held, once the job has run: build the result and drop every reference.
  void finish() {
    finished = true;
    error = job->error();
    if (!error && slot) {
      PyForwardHandle handle;
      handle.layer_object = layer_object;
      handle.layer = layer;
      handle.cache = std::move(slot->cache);
      handle.x = std::move(arrays.front());  // x is always the first array of a forward
      handle.lora_object = lora_object;
      handle.tokens = tokens;
      result = nb::cast(std::move(handle));
    }
    if (consumed_handle) {  // the backward has run: the handle need not keep x and the LoRA any more
      consumed_handle->x = Array{};
      consumed_handle->lora_object = nb::none();
    }
    arrays.clear();
    objects.clear();
    slot.reset();
    layer_object = nb::object();
    lora_object = nb::object();
  }
};

PyMoELayer make_layer(const moe::MoEConfig& config, nb::handle pool) {
  std::shared_ptr<PoolContext> context;
  if (pool.is_none()) {
    context = default_pool_context();
  } else {
    PyThreadPool* p = nullptr;
    if (!nb::try_cast(pool, p) || p == nullptr)
      raise_type("pool: expected a kt_sft_kernels.ThreadPool or None, got " + object_type_name(pool));
    context = p->context;
  }
  PyMoELayer l;
  l.layer = std::make_unique<moe::MoELayer>(config, *context->pool);
  l.context = std::move(context);
  return l;
}

void load_weights(PyMoELayer& self, nb::handle gate_up, nb::handle down, nb::handle gate, nb::handle up) {
  const moe::MoEConfig& c = self.layer->config();
  const std::int64_t E = c.num_experts, H = c.hidden, I = c.intermediate;
  if (!gate_up.is_none() && (!gate.is_none() || !up.is_none()))
    raise_type("load_weights: give either gate_up, or gate and up, not both");
  const bool separate = gate_up.is_none();
  if (separate && (gate.is_none() || up.is_none()))
    raise_type(gate_up.is_none() && gate.is_none() && up.is_none()
                   ? "gate_up: required (or gate= and up= separately)"
                   : std::string(gate.is_none() ? "gate" : "up") + ": required together with " +
                         (gate.is_none() ? "up" : "gate"));
  // A quantized layer quantizes bf16 or fp32 sources while packing.
  const unsigned kWeightDTypes = c.weight_dtype == moe::WeightDType::bf16 ? kBF16 : kBF16 | kF32;
  Array down_a = import_array(down, "down", kWeightDTypes, 3, Access::read);
  check_shape(down_a, {E, H, I});
  Array gu_a, g_a, u_a;
  if (separate) {
    g_a = import_array(gate, "gate", kWeightDTypes, 3, Access::read);
    check_shape(g_a, {E, I, H});
    u_a = import_array(up, "up", kWeightDTypes, 3, Access::read);
    check_shape(u_a, {E, I, H});
  } else {
    gu_a = import_array(gate_up, "gate_up", kWeightDTypes, 3, Access::read);
    check_shape(gu_a, {E, 2 * I, H});
  }
  moe::MoELayer* layer = self.layer.get();
  const View gu = gu_a.view, g = g_a.view, u = u_a.view, d = down_a.view;
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
  if (access == Access::write) check_no_overlap({&q.gu_q, &q.gu_s, &q.d_q, &q.d_s}, {});
  return q;
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

PyPending start_forward(PyMoELayer& self, nb::handle x, nb::handle ids, nb::handle weights, nb::handle out,
                        nb::handle lora, bool save) {
  if (!self.weights_loaded) throw std::runtime_error("MoELayer: call load_weights() before forward()");
  const moe::MoEConfig& c = self.layer->config();
  const std::int64_t H = c.hidden, k = c.top_k;

  PyPending p;
  p.what = "forward";
  p.arrays.reserve(4);
  p.arrays.push_back(import_array(x, "x", kActivationDTypes, 2, Access::read));
  const Array& xa = p.arrays.back();
  check_shape(xa, {-1, H});
  const std::int64_t T = xa.dim(0);
  p.arrays.push_back(import_array(ids, "ids", kIdDTypes, 2, Access::read));
  check_shape(p.arrays.back(), {T, k});
  p.arrays.push_back(import_array(weights, "weights", kRoutingDTypes, 2, Access::read));
  check_shape(p.arrays.back(), {T, k});
  p.arrays.push_back(import_array(out, "out", kActivationDTypes, 2, Access::write));
  check_shape(p.arrays.back(), {T, H});

  const PyLoRA* l = nullptr;
  if (!lora.is_none() && (!nb::try_cast(lora, l) || l == nullptr))
    raise_type("lora: expected a kt_sft_kernels.LoRA or None, got " + object_type_name(lora));
  if (l) l->check_config(c);

  std::vector<const Array*> inputs = {&p.arrays[0], &p.arrays[1], &p.arrays[2]};
  if (l)
    for (const Array* a : l->arrays.all()) inputs.push_back(a);
  check_no_overlap({&p.arrays[3]}, inputs);

  const View xv = p.arrays[0].view, idv = p.arrays[1].view, wv = p.arrays[2].view, ov = p.arrays[3].view;
  const moe::LoRAViews lv = l ? l->views() : moe::LoRAViews{};
  moe::MoELayer* layer = self.layer.get();
  std::shared_ptr<CacheSlot> slot = save ? std::make_shared<CacheSlot>() : nullptr;
  p.job = self.context->submit([=] {
    moe::ForwardCachePtr cache = layer->forward(xv, idv, wv, ov, lv, save);
    if (!save) return;
    if (!cache) throw std::logic_error("internal error: MoELayer::forward(save=true) returned no cache");
    slot->cache = std::shared_ptr<ForwardCache>(std::move(cache));
  });
  p.objects.push_back(nb::borrow(lora));
  p.layer_object = nb::find(&self);
  p.objects.push_back(p.layer_object);
  if (save) {
    p.slot = std::move(slot);
    p.layer = &self;
    p.lora_object = nb::borrow(lora);
    p.tokens = T;
  }
  return p;
}

PyPending start_backward(PyMoELayer& self, nb::handle saved, nb::handle grad_out, nb::handle grad_x,
                         nb::handle grad_weights, nb::handle lora_grads) {
  PyForwardHandle* h = nullptr;
  if (!nb::try_cast(saved, h) || h == nullptr)
    raise_type("saved: expected the ForwardHandle returned by forward(..., save=True), got " + object_type_name(saved));
  if (h->consumed)
    throw std::runtime_error("saved: this ForwardHandle was already consumed by a backward call "
                             "(each forward(save=True) allows exactly one backward)");
  if (h->layer != &self) raise_value("saved: this ForwardHandle was returned by a different MoELayer");
  if (!self.weights_loaded)
    throw std::runtime_error("MoELayer: its weights were not loaded completely (a load_weights() call failed)");

  const moe::MoEConfig& c = self.layer->config();
  const std::int64_t T = h->tokens, H = c.hidden, k = c.top_k;
  PyPending p;
  p.what = "backward";
  p.arrays.reserve(3);
  p.arrays.push_back(import_array(grad_out, "grad_out", kActivationDTypes, 2, Access::read));
  check_shape(p.arrays.back(), {T, H});
  p.arrays.push_back(import_array(grad_x, "grad_x", kActivationDTypes, 2, Access::write));
  check_shape(p.arrays.back(), {T, H});
  p.arrays.push_back(import_array(grad_weights, "grad_weights", kRoutingDTypes, 2, Access::write));
  check_shape(p.arrays.back(), {T, k});

  const PyLoRA* l = h->lora();
  const PyLoRAGrads* g = nullptr;
  if (!lora_grads.is_none() && (!nb::try_cast(lora_grads, g) || g == nullptr))
    raise_type("lora_grads: expected a kt_sft_kernels.LoRAGrads or None, got " + object_type_name(lora_grads));
  if (l && !g)
    raise_type("lora_grads: required: the forward ran with LoRA, so pass kt_sft_kernels.LoRAGrads(...) "
               "for its gradients");
  if (g && !l) raise_value("lora_grads: the forward ran without LoRA; pass lora_grads=None");
  std::vector<const Array*> outputs = {&p.arrays[1], &p.arrays[2]};
  std::vector<const Array*> inputs = {&p.arrays[0], &h->x};
  moe::LoRAGradViews gv;
  if (l) {
    const std::vector<const Array*> weights = l->arrays.all();
    const std::vector<const Array*> grads = g->arrays.all();
    for (std::size_t i = 0; i < 4; ++i) {
      const Array& w = *weights[i];
      const Array& d = *grads[i];
      if (static_cast<bool>(w) != static_cast<bool>(d)) {
        raise_value(std::string("lora_grads: ") + d.name +
                    (w ? " is required: the forward's LoRA has " : " must be None: the forward's LoRA has no ") +
                    w.name);
      }
      if (!w) continue;
      if (d.view.dtype != w.view.dtype)
        raise_type(std::string(d.name) + ": expected dtype " + dtype_name(w.view.dtype) + " (the dtype of " + w.name +
                   "), got " + dtype_name(d.view.dtype));
      if (d.view.ndim != w.view.ndim || d.view.shape[0] != w.view.shape[0] || d.view.shape[1] != w.view.shape[1] ||
          d.view.shape[2] != w.view.shape[2])
        raise_value(std::string(d.name) + ": expected shape " + shape_text(w.view) + " (the shape of " + w.name +
                    "), got " + shape_text(d.view));
      inputs.push_back(&w);
      outputs.push_back(&d);
    }
    gv.da_gu = g->arrays.a_gu.view;
    gv.db_gu = g->arrays.b_gu.view;
    gv.da_d = g->arrays.a_d.view;
    gv.db_d = g->arrays.b_d.view;
  }
  check_no_overlap(outputs, inputs);

  const View gov = p.arrays[0].view, gxv = p.arrays[1].view, gwv = p.arrays[2].view;
  moe::MoELayer* layer = self.layer.get();
  std::shared_ptr<ForwardCache> cache = std::move(h->cache);
  h->consumed = true;
  p.job = self.context->submit([=] { layer->backward(*cache, gov, gxv, gwv, gv); });
  p.objects.push_back(nb::borrow(saved));
  p.consumed_handle = h;
  p.objects.push_back(nb::borrow(lora_grads));
  p.objects.push_back(nb::find(&self));
  return p;
}

// Test hook: a Pending whose job throws, to check that wait() re-raises and that dropping it warns.
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

PyPending failing_pending(PyThreadPool& pool, const std::string& message) {
  PyPending p;
  p.what = "test";
  p.job = pool.context->submit([message] { throw std::invalid_argument(message); });
  return p;
}

}  // namespace

void bind_moe(nb::module_& m) {
  nb::class_<moe::MoEConfig>(m, "MoEConfig", "Shape and storage of one MoE layer's routed experts.")
      .def("__init__",
           [](moe::MoEConfig* self, int num_experts, int top_k, int hidden, int intermediate,
              const std::string& weight_dtype, int group_size, int numa_shards) {
             new (self) moe::MoEConfig(
                 moe::make_config(num_experts, top_k, hidden, intermediate, weight_dtype, group_size, numa_shards));
           },
           nb::kw_only(), nb::arg("num_experts"), nb::arg("top_k"), nb::arg("hidden"), nb::arg("intermediate"),
           nb::arg("weight_dtype") = "bf16", nb::arg("group_size") = 128, nb::arg("numa_shards") = 1)
      .def_ro("num_experts", &moe::MoEConfig::num_experts)
      .def_ro("top_k", &moe::MoEConfig::top_k)
      .def_ro("hidden", &moe::MoEConfig::hidden)
      .def_ro("intermediate", &moe::MoEConfig::intermediate)
      .def_prop_ro("weight_dtype",
                   [](const moe::MoEConfig& c) { return std::string(moe::weight_dtype_name(c.weight_dtype)); })
      .def_ro("group_size", &moe::MoEConfig::group_size)
      .def_ro("numa_shards", &moe::MoEConfig::numa_shards)
      .def("__eq__", [](const moe::MoEConfig& a, const moe::MoEConfig& b) { return a == b; }, nb::is_operator())
      .def("__repr__", &moe::config_repr);

  nb::class_<PyLoRA>(m, "LoRA",
                     "LoRA weights of one layer's experts, read from caller memory on every call: a_gu [E,r,H], "
                     "b_gu [E,2I,r], a_d [E,r,I], b_d [E,H,r], all float32 or all bfloat16. A projection's pair "
                     "may be None (no LoRA on it). Bump `version` after each optimizer step.")
      .def("__init__",
           [](PyLoRA* self, nb::handle a_gu, nb::handle b_gu, nb::handle a_d, nb::handle b_d,
              std::optional<double> scale_gu, std::optional<double> scale_d, std::int64_t version) {
             new (self) PyLoRA(make_lora(a_gu, b_gu, a_d, b_d, scale_gu, scale_d, version));
           },
           nb::arg("a_gu").none(), nb::arg("b_gu").none(), nb::arg("a_d").none(), nb::arg("b_d").none(),
           nb::arg("scale_gu").none() = nb::none(), nb::arg("scale_d").none() = nb::none(), nb::kw_only(),
           nb::arg("version") = 0)
      .def_prop_ro("a_gu", [](const PyLoRA& l) { return l.arrays.objects[0]; })
      .def_prop_ro("b_gu", [](const PyLoRA& l) { return l.arrays.objects[1]; })
      .def_prop_ro("a_d", [](const PyLoRA& l) { return l.arrays.objects[2]; })
      .def_prop_ro("b_d", [](const PyLoRA& l) { return l.arrays.objects[3]; })
      .def_ro("scale_gu", &PyLoRA::scale_gu)
      .def_ro("scale_d", &PyLoRA::scale_d)
      .def_rw("version", &PyLoRA::version, "Caller-bumped counter; tiers that cache derived copies key them on it.")
      .def_prop_ro("rank_gate_up", &PyLoRA::rank_gate_up, "r of the gate_up pair (0: no LoRA there).")
      .def_prop_ro("rank_down", &PyLoRA::rank_down, "r of the down pair (0: no LoRA there).")
      .def_prop_ro("dtype", [](const PyLoRA& l) { return dtype_name(l.dtype()); })
      .def("__repr__", [](const PyLoRA& l) {
        return "LoRA(rank_gate_up=" + std::to_string(l.rank_gate_up()) +
               ", rank_down=" + std::to_string(l.rank_down()) +
               ", dtype=" + dtype_name(l.dtype()) + ", version=" + std::to_string(l.version) + ")";
      });

  nb::class_<PyLoRAGrads>(m, "LoRAGrads",
                          "Output arrays for the LoRA gradients (same shapes and dtype as the LoRA weights; "
                          "None where the forward's LoRA has no pair). Written, never accumulated.")
      .def("__init__",
           [](PyLoRAGrads* self, nb::handle da_gu, nb::handle db_gu, nb::handle da_d, nb::handle db_d) {
             new (self) PyLoRAGrads(make_lora_grads(da_gu, db_gu, da_d, db_d));
           },
           nb::arg("da_gu").none() = nb::none(), nb::arg("db_gu").none() = nb::none(),
           nb::arg("da_d").none() = nb::none(), nb::arg("db_d").none() = nb::none())
      .def_prop_ro("da_gu", [](const PyLoRAGrads& g) { return g.arrays.objects[0]; })
      .def_prop_ro("db_gu", [](const PyLoRAGrads& g) { return g.arrays.objects[1]; })
      .def_prop_ro("da_d", [](const PyLoRAGrads& g) { return g.arrays.objects[2]; })
      .def_prop_ro("db_d", [](const PyLoRAGrads& g) { return g.arrays.objects[3]; });

  nb::class_<PyForwardHandle>(m, "ForwardHandle",
                              "What forward(save=True) keeps for backward: owns the activation cache and keeps "
                              "the layer, x and the LoRA arrays alive. Consumed by backward; dropping it frees "
                              "the cache.")
      .def_ro("tokens", &PyForwardHandle::tokens)
      .def_ro("consumed", &PyForwardHandle::consumed)
      .def_prop_ro("has_lora", [](const PyForwardHandle& h) { return !h.lora_object.is_none(); })
      .def_prop_ro(
          "cache_bytes", [](const PyForwardHandle& h) { return h.cache ? moe::cache_bytes(*h.cache) : std::size_t{0}; },
          "Host bytes of the activation cache this handle holds (0 once consumed).")
      .def("__repr__", [](const PyForwardHandle& h) {
        return "ForwardHandle(tokens=" + std::to_string(h.tokens) + (h.consumed ? ", consumed" : "") + ")";
      });

  nb::class_<PyPending>(m, "Pending",
                        "A call in flight on the layer's pool. wait() returns what the sync call returns (or "
                        "raises its exception); dropping it waits.")
      .def("wait", &PyPending::wait, "Blocks (without the GIL) until the call finished; returns its result.")
      .def("done", &PyPending::done, "True once the call finished (never blocks).");

  nb::class_<PyMoELayer>(m, "MoELayer", "One MoE layer's routed experts on the CPU (DESIGN.md §2).")
      .def("__init__",
           [](PyMoELayer* self, const moe::MoEConfig& config, nb::handle pool) {
             new (self) PyMoELayer(make_layer(config, pool));
           },
           nb::arg("config"), nb::arg("pool").none() = nb::none())
      .def_prop_ro("config", [](const PyMoELayer& l) { return l.layer->config(); })
      .def_prop_ro("pool", [](const PyMoELayer& l) { return PyThreadPool{l.context}; })
      .def_prop_ro("loaded", [](const PyMoELayer& l) { return l.weights_loaded; })
      .def("load_weights", &load_weights, nb::arg("gate_up").none() = nb::none(), nb::arg("down").none() = nb::none(),
           nb::kw_only(), nb::arg("gate").none() = nb::none(), nb::arg("up").none() = nb::none(),
           "Packs bf16 weights (gate_up [E,2I,H] or gate/up [E,I,H] each, down [E,H,I]) into the layer's own "
           "memory; the caller may free its arrays afterwards.")
      .def("load_quantized", &load_quantized, nb::arg("gate_up_q").none(), nb::arg("gate_up_scale").none(),
           nb::arg("down_q").none(), nb::arg("down_scale").none(),
           "Loads a pre-quantized base bit-exactly (weight_dtype int8: q int8 [E,N,K], scale [E,N]; int4: q uint8 "
           "[E,N,K/2] two nibbles a byte, low nibble = even k, scale [E,N,K/group_size]; scales float32 or bf16).")
      .def("read_quantized", &read_quantized, nb::arg("gate_up_q").none(), nb::arg("gate_up_scale").none(),
           nb::arg("down_q").none(), nb::arg("down_scale").none(),
           "Writes the packed quantized base into caller arrays (load_quantized's shapes, float32 scales).")
      .def("memory_report", &memory_report,
           "Host bytes: weights, scales, cache_spare, total (the layer's own), workspace_shared (the pool's, shared by "
           "workspace_layers layers: count it once per pool); numa_shards > 1: these are the shards' sums and "
           "shards lists each shard's own.")
      .def("forward",
           [](PyMoELayer& self, nb::handle x, nb::handle ids, nb::handle weights, nb::handle out, nb::handle lora,
              bool save) { return start_forward(self, x, ids, weights, out, lora, save).wait(); },
           nb::arg("x").none(), nb::arg("ids").none(), nb::arg("weights").none(), nb::arg("out").none(),
           nb::arg("lora").none() = nb::none(), nb::arg("save") = false,
           "out[T,H] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]). Returns a ForwardHandle if save, else None.")
      .def("forward_async", &start_forward, nb::arg("x").none(), nb::arg("ids").none(), nb::arg("weights").none(),
           nb::arg("out").none(), nb::arg("lora").none() = nb::none(), nb::arg("save") = false,
           "forward() queued on the layer's pool; returns a Pending.")
      .def("backward",
           [](PyMoELayer& self, nb::handle saved, nb::handle grad_out, nb::handle grad_x, nb::handle grad_weights,
              nb::handle lora_grads) {
             start_backward(self, saved, grad_out, grad_x, grad_weights, lora_grads).wait();
           },
           nb::arg("saved").none(), nb::arg("grad_out").none(), nb::arg("grad_x").none(),
           nb::arg("grad_weights").none(), nb::arg("lora_grads").none() = nb::none(),
           "Writes grad_x [T,H], grad_weights [T,k] and the LoRA gradients; consumes `saved`.")
      .def("backward_async", &start_backward, nb::arg("saved").none(), nb::arg("grad_out").none(),
           nb::arg("grad_x").none(), nb::arg("grad_weights").none(), nb::arg("lora_grads").none() = nb::none(),
           "backward() queued on the layer's pool; returns a Pending.")
      .def("shard_report", &shard_report,
           "numa_shards > 1: one dict per shard: intermediate slice [i0, i1), nodes, cpus (one pinned thread "
           "each), weight_bytes (packed base weights it owns), buffer_bytes (fp32 partials of its sub-pool, "
           "shared by the layers on it), weight_node (NUMA node of its first weight page, -1 unknown). [] for "
           "an unsharded layer.")
      .def("__repr__", [](const PyMoELayer& l) {
        return "MoELayer(" + config_repr(l.layer->config()) + (l.weights_loaded ? "" : ", not loaded") + ")";
      });

  m.def("estimate_layer_bytes", &estimate_layer_bytes, nb::arg("config"), nb::arg("tokens") = 0,
        nb::arg("lora_rank") = 0,
        "Host bytes of one layer of this config: weights, scales (exact, as memory_report shows once loaded), cache "
        "(the activation cache of forward(save=True) on `tokens` tokens, LoRA rank lora_rank on both projections), "
        "total. The pool's shared workspace is not included.");

  nb::module_ testing = nb::borrow<nb::module_>(m.attr("_testing"));
  testing.def("failing_pending", &failing_pending, nb::arg("pool"), nb::arg("message"),
              "A Pending whose job raises ValueError(message).");
}

}  // namespace kt::bindings
