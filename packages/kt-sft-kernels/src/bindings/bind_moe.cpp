// MoE bindings: MoEConfig, LoRA, LoRAGrads, MoELayer, ForwardHandle, Pending (the layer's weight
// loading and memory reports: moe_weights.cpp).
//
// Only array import, GIL handling and the Python classes live here: argument checks are the C++
// API's (kt/moe/validate.hpp), calls are queued and kept in order by it (kt/moe/calls.hpp).
// Memory safety (issue 16 item 8a): a LoRA, LoRAGrads or ForwardHandle keeps the Python objects it
// was given, never a data pointer; each call imports them again and checks that shape and dtype are
// unchanged, so a tensor whose storage moved (resize_, set_, param.data = ...) is followed to its
// new memory, and one whose shape or dtype changed raises ValueError naming it.
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
#include "py_layer.hpp"
#include "kt/core/errors.hpp"
#include "kt/moe/calls.hpp"
#include "kt/moe/config.hpp"
#include "kt/moe/layer.hpp"
#include "kt/moe/validate.hpp"

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
// LoRA and LoRAGrads: the four owners, and the shape/dtype each had when the object was built.

struct LoRAObjects {
  const char* const* names = nullptr;
  Access access = Access::read;
  nb::object objects[4];  // what the caller passed (returned by the properties; None = absent)
  View taken[4];          // shape and dtype at construction (the data pointer is never used)

  // Imports the four arrays again (kept alive by `keep`); each must still have its shape and dtype.
  std::vector<View> current(std::vector<Array>& keep, const char* taken_at) const {
    std::vector<View> views(4);
    for (int i = 0; i < 4; ++i) {
      if (objects[i].is_none()) continue;
      keep.push_back(import_array(objects[i], names[i], kLoRADTypes, 3, access));
      moe::check_unchanged(taken[i], keep.back().view, names[i], taken_at);
      views[static_cast<std::size_t>(i)] = keep.back().view;
    }
    return views;
  }
};

LoRAObjects import_lora_objects(const nb::handle (&given)[4], const char* const names[4], Access access,
                                std::vector<Array>& keep) {
  LoRAObjects l;
  l.names = names;
  l.access = access;
  for (int i = 0; i < 4; ++i) {
    keep.push_back(import_array(given[i], names[i], kLoRADTypes, 3, access, /*optional=*/true));
    l.objects[i] = nb::borrow(given[i]);
    l.taken[i] = keep.back().view;
  }
  return l;
}

moe::LoRAViews lora_views(const std::vector<View>& v, float scale_gu, float scale_d, std::int64_t version) {
  moe::LoRAViews l;
  l.a_gu = v[0];
  l.b_gu = v[1];
  l.a_d = v[2];
  l.b_d = v[3];
  l.scale_gu = scale_gu;
  l.scale_d = scale_d;
  l.version = version;
  return l;
}

moe::LoRAGradViews grad_views(const std::vector<View>& v) {
  moe::LoRAGradViews g;
  g.da_gu = v[0];
  g.db_gu = v[1];
  g.da_d = v[2];
  g.db_d = v[3];
  return g;
}

struct PyLoRA {
  static constexpr const char* kNames[4] = {"a_gu", "b_gu", "a_d", "b_d"};
  LoRAObjects arrays;
  float scale_gu = 0.f, scale_d = 0.f;
  std::int64_t version = 0;

  DType dtype() const { return arrays.taken[0] ? arrays.taken[0].dtype : arrays.taken[2].dtype; }
  std::int64_t rank_gate_up() const { return arrays.taken[0] ? arrays.taken[0].shape[1] : 0; }
  std::int64_t rank_down() const { return arrays.taken[2] ? arrays.taken[2].shape[1] : 0; }

  // The LoRA as it is now, its arrays imported again into `keep`.
  moe::LoRAViews current(std::vector<Array>& keep) const {
    return lora_views(arrays.current(keep, "the LoRA was built"), scale_gu, scale_d, version);
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
  PyLoRA l;
  std::vector<Array> imported;
  l.arrays = import_lora_objects({a_gu, b_gu, a_d, b_d}, PyLoRA::kNames, Access::read, imported);
  const moe::LoRAViews views = lora_views({l.arrays.taken, l.arrays.taken + 4}, 0.f, 0.f, version);
  moe::validate_lora(views);
  l.scale_gu = checked_scale(scale_gu, views.has_gate_up(), "scale_gu");
  l.scale_d = checked_scale(scale_d, views.has_down(), "scale_d");
  l.version = version;
  return l;
}

struct PyLoRAGrads {
  static constexpr const char* kNames[4] = {"da_gu", "db_gu", "da_d", "db_d"};
  LoRAObjects arrays;

  moe::LoRAGradViews current(std::vector<Array>& keep) const {
    return grad_views(arrays.current(keep, "the LoRAGrads was built"));
  }
};

PyLoRAGrads make_lora_grads(nb::handle da_gu, nb::handle db_gu, nb::handle da_d, nb::handle db_d) {
  PyLoRAGrads g;
  std::vector<Array> imported;
  g.arrays = import_lora_objects({da_gu, db_gu, da_d, db_d}, PyLoRAGrads::kNames, Access::write, imported);
  moe::validate_lora_grads(grad_views({g.arrays.taken, g.arrays.taken + 4}));
  return g;
}

// ---------------------------------------------------------------------------------------------
// MoELayer, ForwardHandle, Pending

struct PyForwardHandle {
  nb::object layer_object;  // keeps the layer alive
  const PyMoELayer* layer = nullptr;
  std::shared_ptr<ForwardCache> cache;  // null once consumed
  nb::object x_object;                  // the forward's input: the backward reads it (imported again)
  nb::object lora_object;               // the forward's PyLoRA (or None): likewise
  std::int64_t tokens = 0;
  bool consumed = false;

  const PyLoRA* lora() const { return lora_object.is_none() ? nullptr : nb::cast<const PyLoRA*>(lora_object); }
};

void warn_unraisable(const std::string& message) {
  nb::error_scope keep_pending_error;
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) PyErr_WriteUnraisable(nullptr);
}

// The Python face of a moe::PendingCall: the call plus the Python owners of every array it touches,
// released (with the GIL) once it finished.
struct PyPending {
  moe::PendingCall call;
  std::vector<Array> arrays;        // every array the call reads or writes
  std::vector<nb::object> objects;  // the layer, LoRA, handle, ... the call uses
  // forward(save=True) only: what the ForwardHandle made on completion needs.
  bool save = false;
  nb::object layer_object, x_object, lora_object;
  const PyMoELayer* layer = nullptr;
  std::int64_t tokens = 0;
  PyForwardHandle* consumed_handle = nullptr;  // backward only (kept alive by `objects`)
  const char* what = "";                       // "forward" / "backward", for messages

  bool finished = false;
  std::exception_ptr error;
  nb::object result = nb::none();

  PyPending() = default;
  PyPending(PyPending&&) = default;
  PyPending& operator=(PyPending&&) = delete;
  PyPending(const PyPending&) = delete;
  PyPending& operator=(const PyPending&) = delete;

  ~PyPending() {
    if (finished) return;
    {
      nb::gil_scoped_release release;
      call.wait();
    }
    if (std::exception_ptr e = call.error()) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        warn_unraisable(std::string("kt_sft_kernels: a ") + what + "_async() call failed and its Pending was dropped "
                        "without wait(): " + ex.what());
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
        call.wait();
      }
      if (!finished) finish();  // another Python thread may have finished it meanwhile
    }
    if (error) std::rethrow_exception(error);
    return result;
  }

  bool done() const { return finished || call.done(); }

 private:
  // With the GIL held, once the call has run: build the result and drop every reference.
  void finish() {
    finished = true;
    error = call.error();
    if (!error && save) {
      PyForwardHandle handle;
      handle.layer_object = layer_object;
      handle.layer = layer;
      handle.cache = call.take_cache();
      handle.x_object = x_object;
      handle.lora_object = lora_object;
      handle.tokens = tokens;
      result = nb::cast(std::move(handle));
    }
    if (consumed_handle) {  // the backward has run: the handle need not keep x and the LoRA any more
      consumed_handle->x_object = nb::none();
      consumed_handle->lora_object = nb::none();
    }
    arrays.clear();
    objects.clear();
    layer_object = x_object = lora_object = nb::object();
  }
};

PyMoELayer make_layer(const moe::MoEConfig& config, nb::handle pool) {
  std::shared_ptr<runtime::PoolContext> context;
  if (pool.is_none()) {
    context = runtime::default_pool_context();
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

// where = RunOn::caller_if_idle (sync calls): the work may run right here, with the GIL released.
PyPending start_forward_on(moe::RunOn where, PyMoELayer& self, nb::handle x, nb::handle ids, nb::handle weights,
                           nb::handle out, nb::handle lora, bool save) {
  if (!self.weights_loaded) throw std::runtime_error("MoELayer: call load_weights() before forward()");
  PyPending p;
  p.what = "forward";
  p.arrays.reserve(8);
  p.arrays.push_back(import_array(x, "x", kActivationDTypes, 2, Access::read));
  p.arrays.push_back(import_array(ids, "ids", kIdDTypes, 2, Access::read));
  p.arrays.push_back(import_array(weights, "weights", kRoutingDTypes, 2, Access::read));
  p.arrays.push_back(import_array(out, "out", kActivationDTypes, 2, Access::write));
  const PyLoRA* l = nullptr;
  if (!lora.is_none() && (!nb::try_cast(lora, l) || l == nullptr))
    raise_type("lora: expected a kt_sft_kernels.LoRA or None, got " + object_type_name(lora));
  const View xv = p.arrays[0].view, idv = p.arrays[1].view, wv = p.arrays[2].view, ov = p.arrays[3].view;
  const moe::LoRAViews lv = l ? l->current(p.arrays) : moe::LoRAViews{};
  if (where == moe::RunOn::caller_if_idle) {
    nb::gil_scoped_release release;
    p.call = moe::submit_forward(*self.context, *self.layer, xv, idv, wv, ov, lv, save, where);
  } else {
    p.call = moe::submit_forward(*self.context, *self.layer, xv, idv, wv, ov, lv, save, where);
  }
  p.layer_object = nb::find(&self);
  p.objects.push_back(nb::borrow(lora));
  p.objects.push_back(p.layer_object);
  if (save) {
    p.save = true;
    p.layer = &self;
    p.x_object = nb::borrow(x);
    p.lora_object = nb::borrow(lora);
    p.tokens = xv.shape[0];
  }
  return p;
}

PyPending start_backward_on(moe::RunOn where, PyMoELayer& self, nb::handle saved, nb::handle grad_out,
                            nb::handle grad_x, nb::handle grad_weights, nb::handle lora_grads) {
  PyForwardHandle* h = nullptr;
  if (!nb::try_cast(saved, h) || h == nullptr)
    raise_type("saved: expected the ForwardHandle returned by forward(..., save=True), got " + object_type_name(saved));
  if (h->consumed)
    throw std::runtime_error("saved: this ForwardHandle was already consumed by a backward call "
                             "(each forward(save=True) allows exactly one backward)");
  if (h->layer != &self) raise_value("saved: this ForwardHandle was returned by a different MoELayer");
  if (!self.weights_loaded)
    throw std::runtime_error("MoELayer: its weights were not loaded completely (a load_weights() call failed)");

  PyPending p;
  p.what = "backward";
  p.arrays.reserve(16);
  p.arrays.push_back(import_array(grad_out, "grad_out", kActivationDTypes, 2, Access::read));
  p.arrays.push_back(import_array(grad_x, "grad_x", kActivationDTypes, 2, Access::write));
  p.arrays.push_back(import_array(grad_weights, "grad_weights", kRoutingDTypes, 2, Access::write));
  const PyLoRA* l = h->lora();
  const PyLoRAGrads* g = nullptr;
  if (!lora_grads.is_none() && (!nb::try_cast(lora_grads, g) || g == nullptr))
    raise_type("lora_grads: expected a kt_sft_kernels.LoRAGrads or None, got " + object_type_name(lora_grads));
  if (l && !g)
    raise_type("lora_grads: required: the forward ran with LoRA, so pass kt_sft_kernels.LoRAGrads(...) "
               "for its gradients");
  if (g && !l) raise_value("lora_grads: the forward ran without LoRA; pass lora_grads=None");
  // x and the LoRA as they are now (their storage may have moved since the forward).
  p.arrays.push_back(import_array(h->x_object, "x", kActivationDTypes, 2, Access::read));
  const View xv = p.arrays.back().view;
  const moe::LoRAViews lv = l ? l->current(p.arrays) : moe::LoRAViews{};
  const moe::LoRAGradViews gv = g ? g->current(p.arrays) : moe::LoRAGradViews{};
  moe::rebind_cache_inputs(*h->cache, xv, lv);

  const View gov = p.arrays[0].view, gxv = p.arrays[1].view, gwv = p.arrays[2].view;
  if (where == moe::RunOn::caller_if_idle) {
    nb::gil_scoped_release release;
    p.call = moe::submit_backward(*self.context, *self.layer, h->cache, gov, gxv, gwv, gv, where);
  } else {
    p.call = moe::submit_backward(*self.context, *self.layer, h->cache, gov, gxv, gwv, gv, where);
  }
  h->cache.reset();
  h->consumed = true;
  p.objects.push_back(nb::borrow(saved));
  p.consumed_handle = h;
  p.objects.push_back(nb::borrow(lora_grads));
  p.objects.push_back(nb::find(&self));
  return p;
}

PyPending start_forward(PyMoELayer& self, nb::handle x, nb::handle ids, nb::handle weights, nb::handle out,
                        nb::handle lora, bool save) {
  return start_forward_on(moe::RunOn::executor, self, x, ids, weights, out, lora, save);
}

PyPending start_backward(PyMoELayer& self, nb::handle saved, nb::handle grad_out, nb::handle grad_x,
                         nb::handle grad_weights, nb::handle lora_grads) {
  return start_backward_on(moe::RunOn::executor, self, saved, grad_out, grad_x, grad_weights, lora_grads);
}

// Test hook: a Pending whose job throws, to check that wait() re-raises and that dropping it warns.
PyPending failing_pending(PyThreadPool& pool, const std::string& message) {
  PyPending p;
  p.what = "test";
  p.call = moe::testing_failing_call(*pool.context, message);
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
           "shards lists each shard's own (int8: each shard keeps down's full-row scales).")
      .def("forward",
           [](PyMoELayer& self, nb::handle x, nb::handle ids, nb::handle weights, nb::handle out, nb::handle lora,
              bool save) {
             return start_forward_on(moe::RunOn::caller_if_idle, self, x, ids, weights, out, lora, save).wait();
           },
           nb::arg("x").none(), nb::arg("ids").none(), nb::arg("weights").none(), nb::arg("out").none(),
           nb::arg("lora").none() = nb::none(), nb::arg("save") = false,
           "out[T,H] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]). Returns a ForwardHandle if save, else None.")
      .def("forward_async", &start_forward, nb::arg("x").none(), nb::arg("ids").none(), nb::arg("weights").none(),
           nb::arg("out").none(), nb::arg("lora").none() = nb::none(), nb::arg("save") = false,
           "forward() queued on the layer's pool; returns a Pending.")
      .def("backward",
           [](PyMoELayer& self, nb::handle saved, nb::handle grad_out, nb::handle grad_x, nb::handle grad_weights,
              nb::handle lora_grads) {
             start_backward_on(moe::RunOn::caller_if_idle, self, saved, grad_out, grad_x, grad_weights, lora_grads)
                 .wait();
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
  testing.def("set_row_budget", &moe::set_row_budget_for_testing, nb::arg("nbytes"),
              "Lowers the byte budget of a call's per-pair fp32 rows (ADR 0405) so small shapes run in several "
              "token chunks; 0 restores the default. Returns the budget in force before.");
}

}  // namespace kt::bindings
