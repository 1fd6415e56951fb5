// Argument validation of the layer's public entry points (include/kt/moe/validate.hpp). The
// messages are the ones users see from Python: they name the argument and say what was expected.
#include "kt/moe/validate.hpp"

#include <cmath>
#include <stdexcept>
#include <utility>

#include "kt/core/bf16.hpp"
#include "kt/core/errors.hpp"

namespace kt::moe {
namespace {

[[noreturn]] void raise_value(const std::string& message) { throw std::invalid_argument(message); }
[[noreturn]] void raise_type(const std::string& message) { throw TypeError(message); }

std::int64_t view_bytes(const View& v) {
  return v ? v.numel() * static_cast<std::int64_t>(dtype_bytes(v.dtype)) : 0;
}

void expect_present(const View& v, const char* name) {
  if (!v) raise_type(std::string(name) + ": required, got None");
}

void expect_dtype(const View& v, const char* name, DType a, DType b) {
  if (v && v.dtype != a && v.dtype != b)
    raise_type(std::string(name) + ": expected dtype " + dtype_name(a) + " or " + dtype_name(b) + ", got " +
               dtype_name(v.dtype));
}

// The four arrays of a LoRA or of its gradients, with their argument names.
struct Four {
  NamedView items[4];
  bool has_gate_up() const { return static_cast<bool>(items[0].view); }
  bool has_down() const { return static_cast<bool>(items[2].view); }
};

Four named(const LoRAViews& l) { return {{{l.a_gu, "a_gu"}, {l.b_gu, "b_gu"}, {l.a_d, "a_d"}, {l.b_d, "b_d"}}}; }
Four named(const LoRAGradViews& g) {
  return {{{g.da_gu, "da_gu"}, {g.db_gu, "db_gu"}, {g.da_d, "da_d"}, {g.db_d, "db_d"}}};
}

// Pairs complete, at least one pair, one dtype, LoRA dtypes only.
void check_four(const Four& f) {
  for (int pair = 0; pair < 2; ++pair) {
    const NamedView& a = f.items[2 * pair];
    const NamedView& b = f.items[2 * pair + 1];
    if (static_cast<bool>(a.view) != static_cast<bool>(b.view))
      raise_type(std::string(a.view ? b.name : a.name) + ": required together with " + (a.view ? a.name : b.name) +
                 " (give both arrays of a projection, or neither for no LoRA on it)");
  }
  if (!f.has_gate_up() && !f.has_down())
    raise_type("LoRA: no arrays given; give the gate_up pair, the down pair, or both");
  const NamedView& first = f.has_gate_up() ? f.items[0] : f.items[2];
  for (const NamedView& a : f.items) {
    if (!a.view) continue;
    expect_dtype(a.view, a.name, DType::f32, DType::bf16);
    if (a.view.ndim != 3)
      raise_value(std::string(a.name) + ": expected a 3-d array, got " + std::to_string(a.view.ndim) + "-d");
    if (a.view.dtype != first.view.dtype)
      raise_type(std::string(a.name) + ": dtype " + dtype_name(a.view.dtype) + " differs from " + first.name +
                 "'s " + dtype_name(first.view.dtype) + "; all LoRA arrays must share one dtype");
  }
}

}  // namespace

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::i8: return "int8";
    case DType::u8: return "uint8";
  }
  return "?";
}

std::size_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::bf16: return 2;
    case DType::f32: case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::i8: case DType::u8: return 1;
  }
  return 1;
}

std::string shape_text(const View& view) {
  std::string text = "(";
  for (int i = 0; i < view.ndim; ++i) {
    if (i) text += ", ";
    text += std::to_string(view.shape[i]);
  }
  if (view.ndim == 1) text += ",";
  return text + ")";
}

void check_shape(const NamedView& a, std::initializer_list<std::int64_t> expected, const char* free_label) {
  bool ok = static_cast<int>(expected.size()) == a.view.ndim;
  std::string text = "(";
  int i = 0;
  for (const std::int64_t extent : expected) {
    if (i) text += ", ";
    text += extent < 0 ? std::string(free_label) : std::to_string(extent);
    if (extent >= 0 && i < a.view.ndim && a.view.shape[i] != extent) ok = false;
    ++i;
  }
  text += ")";
  if (!ok) raise_value(std::string(a.name) + ": expected shape " + text + ", got " + shape_text(a.view));
}

void check_no_overlap(const std::vector<NamedView>& outputs, const std::vector<NamedView>& inputs) {
  const auto overlaps = [](const View& x, const View& y) {
    const std::int64_t xn = view_bytes(x), yn = view_bytes(y);
    if (xn == 0 || yn == 0) return false;
    const auto* x0 = static_cast<const char*>(x.data);
    const auto* y0 = static_cast<const char*>(y.data);
    return x0 < y0 + yn && y0 < x0 + xn;
  };
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const NamedView& o = outputs[i];
    const auto check_against = [&](const NamedView& other) {
      if (overlaps(o.view, other.view))
        raise_value(std::string(o.name) + ": shares memory with " + other.name +
                    " (outputs must not alias other arguments)");
    };
    for (std::size_t j = i + 1; j < outputs.size(); ++j) check_against(outputs[j]);
    for (const NamedView& in : inputs) check_against(in);
  }
}

void validate_weights(const MoEConfig& c, const View& gate_up, const View& gate, const View& up,
                      const View& down) {
  // bf16 layers take bf16; quantized layers bf16 or f32 (quantized while packing).
  const bool quantized = c.weight_dtype != WeightDType::bf16;
  const auto check = [quantized](const View& v, const char* name, std::initializer_list<std::int64_t> shape) {
    expect_present(v, name);
    if (quantized) expect_dtype(v, name, DType::bf16, DType::f32);
    else if (v.dtype != DType::bf16)
      raise_type(std::string(name) + ": expected dtype bfloat16, got " + dtype_name(v.dtype));
    check_shape(NamedView{v, name}, shape);
  };
  const std::int64_t E = c.num_experts, H = c.hidden, I = c.intermediate;
  check(down, "down", {E, H, I});
  if (gate_up) {
    check(gate_up, "gate_up", {E, 2 * I, H});
  } else {
    check(gate, "gate", {E, I, H});
    check(up, "up", {E, I, H});
  }
}

void validate_quantized(const MoEConfig& c, const View& gate_up_q, const View& gate_up_scale, const View& down_q,
                        const View& down_scale) {
  const std::int64_t E = c.num_experts;
  const auto check = [&](const View& q, const View& scale, const char* q_name, const char* scale_name,
                         std::int64_t rows, std::int64_t cols) {
    expect_present(q, q_name);
    expect_present(scale, scale_name);
    if (c.weight_dtype == WeightDType::int8) {
      if (q.dtype != DType::i8) raise_type(std::string(q_name) + ": expected dtype int8, got " + dtype_name(q.dtype));
      check_shape({q, q_name}, {E, rows, cols});
      check_shape({scale, scale_name}, {E, rows});
    } else {
      if (q.dtype != DType::u8)
        raise_type(std::string(q_name) + ": expected dtype uint8 (two int4 values a byte), got " + dtype_name(q.dtype));
      check_shape({q, q_name}, {E, rows, cols / 2});
      check_shape({scale, scale_name}, {E, rows, cols / c.group_size});
    }
    expect_dtype(scale, scale_name, DType::f32, DType::bf16);
  };
  check(gate_up_q, gate_up_scale, "gate_up_q", "gate_up_scale", 2 * std::int64_t{c.intermediate}, c.hidden);
  check(down_q, down_scale, "down_q", "down_scale", c.hidden, c.intermediate);
}

void validate_quantized_scales(const View& gate_up_scale, const View& down_scale) {
  for (const auto& [scale, name] : {std::pair{&gate_up_scale, "gate_up_scale"}, std::pair{&down_scale, "down_scale"}}) {
    const std::int64_t n = scale->numel(), per_expert = n / scale->shape[0], per_row = per_expert / scale->shape[1];
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = scale->dtype == DType::bf16 ? bf16_to_f32(scale->as<const bf16>()[i]) : scale->as<const float>()[i];
      if (!std::isfinite(v))
        raise_value(std::string(name) + ": non-finite scale in expert " + std::to_string(i / per_expert) + ", row " +
                    std::to_string(i % per_expert / per_row));
    }
  }
}

void validate_lora(const LoRAViews& lora) {
  const Four f = named(lora);
  check_four(f);
  // Pair-internal consistency, so mistakes surface where the LoRA is built.
  for (int pair = 0; pair < 2; ++pair) {
    const NamedView& a = f.items[2 * pair];
    const NamedView& b = f.items[2 * pair + 1];
    if (!a.view) continue;
    const bool gate_up = pair == 0;
    const std::int64_t E = a.view.shape[0], r = a.view.shape[1];
    if (r < 1) raise_value(std::string(a.name) + ": rank (dimension 1) must be >= 1; pass None for no LoRA");
    if (b.view.shape[0] != E || b.view.shape[2] != r)
      raise_value(std::string(b.name) + ": expected shape (" + std::to_string(E) + ", " + (gate_up ? "2I" : "H") +
                  ", " + std::to_string(r) + ") to match " + a.name + " " + shape_text(a.view) + ", got " +
                  shape_text(b.view));
    if (gate_up && b.view.shape[1] % 2 != 0)
      raise_value(std::string(b.name) + ": dimension 1 is 2I (gate rows, then up rows) and must be even, got " +
                  std::to_string(b.view.shape[1]));
  }
}

void validate_lora_grads(const LoRAGradViews& grads) { check_four(named(grads)); }

void validate_lora_for(const LoRAViews& lora, const MoEConfig& c) {
  const std::int64_t E = c.num_experts, H = c.hidden, I = c.intermediate;
  const Four f = named(lora);
  if (f.has_gate_up()) {
    check_shape(f.items[0], {E, -1, H}, "r");
    check_shape(f.items[1], {E, 2 * I, lora.a_gu.shape[1]});
  }
  if (f.has_down()) {
    check_shape(f.items[2], {E, -1, I}, "r");
    check_shape(f.items[3], {E, H, lora.a_d.shape[1]});
  }
}

std::int64_t validate_forward(const MoEConfig& c, const View& x, const View& ids, const View& weights,
                              const View& out, const LoRAViews& lora) {
  const std::int64_t H = c.hidden, k = c.top_k;
  const NamedView nx{x, "x"}, nids{ids, "ids"}, nweights{weights, "weights"}, nout{out, "out"};
  for (const NamedView* a : {&nx, &nids, &nweights, &nout}) expect_present(a->view, a->name);
  expect_dtype(x, "x", DType::bf16, DType::f32);
  expect_dtype(ids, "ids", DType::i32, DType::i64);
  expect_dtype(weights, "weights", DType::f32, DType::bf16);
  expect_dtype(out, "out", DType::bf16, DType::f32);
  check_shape(nx, {-1, H});
  const std::int64_t T = x.shape[0];
  check_shape(nids, {T, k});
  check_shape(nweights, {T, k});
  check_shape(nout, {T, H});
  const bool has_lora = lora.has_gate_up() || lora.has_down() || lora.b_gu || lora.b_d;
  std::vector<NamedView> inputs = {nx, nids, nweights};
  if (has_lora) {
    validate_lora(lora);
    validate_lora_for(lora, c);
    for (const NamedView& a : named(lora).items) inputs.push_back(a);
  }
  check_no_overlap({nout}, inputs);
  return T;
}

void validate_backward(const MoEConfig& c, std::int64_t T, const View& x, const LoRAViews& lora,
                       const View& grad_out, const View& grad_x, const View& grad_weights,
                       const LoRAGradViews& grads, bool all_lora_grads) {
  const std::int64_t H = c.hidden, k = c.top_k;
  const NamedView ngo{grad_out, "grad_out"}, ngx{grad_x, "grad_x"}, ngw{grad_weights, "grad_weights"};
  expect_present(grad_out, "grad_out");
  expect_dtype(grad_out, "grad_out", DType::bf16, DType::f32);
  expect_dtype(grad_x, "grad_x", DType::bf16, DType::f32);
  expect_dtype(grad_weights, "grad_weights", DType::f32, DType::bf16);
  check_shape(ngo, {T, H});
  if (grad_x) check_shape(ngx, {T, H});
  if (grad_weights) check_shape(ngw, {T, k});

  std::vector<NamedView> outputs, inputs = {ngo, {x, "x"}};
  for (const NamedView* o : {&ngx, &ngw})
    if (o->view) outputs.push_back(*o);
  const Four w = named(lora), g = named(grads);
  for (int i = 0; i < 4; ++i) {
    const NamedView& wi = w.items[i];
    const NamedView& gi = g.items[i];
    if (!wi.view && gi.view)
      raise_value(std::string("lora_grads: ") + gi.name + " must be None: the forward's LoRA has no " + wi.name);
    if (wi.view && !gi.view && all_lora_grads)
      raise_value(std::string("lora_grads: ") + gi.name + " is required: the forward's LoRA has " + wi.name);
    if (!wi.view || !gi.view) continue;
    if (gi.view.dtype != wi.view.dtype)
      raise_type(std::string(gi.name) + ": expected dtype " + dtype_name(wi.view.dtype) + " (the dtype of " + wi.name +
                 "), got " + dtype_name(gi.view.dtype));
    if (gi.view.ndim != wi.view.ndim || gi.view.shape[0] != wi.view.shape[0] ||
        gi.view.shape[1] != wi.view.shape[1] || gi.view.shape[2] != wi.view.shape[2])
      raise_value(std::string(gi.name) + ": expected shape " + shape_text(wi.view) + " (the shape of " + wi.name +
                  "), got " + shape_text(gi.view));
    inputs.push_back(wi);
    outputs.push_back(gi);
  }
  check_no_overlap(outputs, inputs);
}

void check_unchanged(const View& before, const View& now, const char* name, const char* taken_at) {
  bool same = before.dtype == now.dtype && before.ndim == now.ndim;
  for (int i = 0; same && i < now.ndim; ++i) same = before.shape[i] == now.shape[i];
  if (!same)
    raise_value(std::string(name) + ": changed after " + taken_at + ": it was " + shape_text(before) + " " +
                dtype_name(before.dtype) + ", it is now " + shape_text(now) + " " + dtype_name(now.dtype) +
                " (an array's shape and dtype must stay as they were; its storage may move)");
}

}  // namespace kt::moe
