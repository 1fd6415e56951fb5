// Testing hook: the amx tier's tuning knobs (src/isa/amx/amx_tier.hpp) from Python, for the
// bitwise-invariance test and benchmarks/tune_sweep.py. Only knobs that cannot change a result are
// exposed (prefetch distances and levels, loop orders and chunkings over exact accumulations); small_m
// is not (it selects another summation path, and the packed activation layout).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "bindings.hpp"
#ifdef KT_SFT_HAVE_ISA_AMX
#include "../isa/amx/amx_tier.hpp"
#endif

namespace kt::bindings {

#ifdef KT_SFT_HAVE_ISA_AMX
namespace {

using isa_amx::Tuning;

// One knob: a bool field, or an int field with its accepted range.
struct Knob {
  const char* name;
  bool Tuning::*flag;
  int Tuning::*number;
  int lo, hi;
};

const Knob kKnobs[] = {
    {"prefetch", &Tuning::prefetch, nullptr, 0, 0},
    {"kc_steps", nullptr, &Tuning::kc_steps, 1, isa_amx::kMaxKcSteps},
    {"act_prefetch_steps", nullptr, &Tuning::act_prefetch_steps, 0, 64},
    {"nt_panel_in_l2_bytes", nullptr, &Tuning::nt_panel_in_l2_bytes, 0, INT_MAX},
    {"weight_prefetch_items", nullptr, &Tuning::weight_prefetch_items, 1, 64},
    {"weight_prefetch_l2", &Tuning::weight_prefetch_l2, nullptr, 0, 0},
    {"nn_single_pair_kc_steps", nullptr, &Tuning::nn_single_pair_kc_steps, 1, isa_amx::kMaxKcSteps},
    {"weight_prefetch_burst", &Tuning::weight_prefetch_burst, nullptr, 0, 0},
    {"weight_prefetch_first", &Tuning::weight_prefetch_first, nullptr, 0, 0},
    {"int8_strip_prefetch_groups", nullptr, &Tuning::int8_strip_prefetch_groups, 0, 256},
    {"int8_strip_prefetch_l2", &Tuning::int8_strip_prefetch_l2, nullptr, 0, 0},
    {"int8_strip_far_groups", nullptr, &Tuning::int8_strip_far_groups, 0, 1024},
    {"int8_nt_prefetch_pairs", nullptr, &Tuning::int8_nt_prefetch_pairs, 0, 64},
    {"int8_nt_prefetch_l2", &Tuning::int8_nt_prefetch_l2, nullptr, 0, 0},
    {"int8_nt_prefetch_burst", &Tuning::int8_nt_prefetch_burst, nullptr, 0, 0},
};

const Knob& find_knob(const std::string& name) {
  for (const Knob& knob : kKnobs)
    if (name == knob.name) return knob;
  std::string known;
  for (const Knob& knob : kKnobs) known += (known.empty() ? "" : ", ") + std::string(knob.name);
  throw std::invalid_argument("set_amx_tuning: unknown knob '" + name + "' (known: " + known + ")");
}

// The value `value` for `knob`, checked: a bool for a flag, an int in range for a number.
int checked_value(const Knob& knob, nb::handle value) {
  const std::string what = std::string("set_amx_tuning: ") + knob.name;
  if (knob.flag) {
    if (!nb::isinstance<nb::bool_>(value)) throw std::invalid_argument(what + " must be True or False");
    return nb::cast<bool>(value) ? 1 : 0;
  }
  const std::string range = " must be an int in [" + std::to_string(knob.lo) + ", " + std::to_string(knob.hi) + "]";
  if (nb::isinstance<nb::bool_>(value) || !nb::isinstance<nb::int_>(value)) throw std::invalid_argument(what + range);
  long long v = 0;
  if (!nb::try_cast<long long>(value, v) || v < knob.lo || v > knob.hi)
    throw std::invalid_argument(what + range + ", got " + nb::cast<std::string>(nb::str(value)));
  return static_cast<int>(v);
}

nb::dict current_tuning() {
  const Tuning& t = isa_amx::tuning();
  nb::dict out;
  for (const Knob& knob : kKnobs) {
    if (knob.flag) out[knob.name] = t.*knob.flag;
    else out[knob.name] = t.*knob.number;
  }
  return out;
}

void set_tuning(const nb::kwargs& fields) {
  Tuning next = isa_amx::tuning();  // all checked before any is applied
  for (auto [key, value] : fields) {
    const Knob& knob = find_knob(nb::cast<std::string>(key));
    const int v = checked_value(knob, value);
    if (knob.flag) next.*knob.flag = v != 0;
    else next.*knob.number = v;
  }
  isa_amx::tuning() = next;
}

}  // namespace
#endif

void bind_amx_tuning(nb::module_& m) {
  nb::module_ testing = nb::borrow<nb::module_>(m.attr("_testing"));
  constexpr const char* kSetDoc =
      "Sets amx-tier tuning knobs by name (amx_tuning() lists them); the others keep their values. Unknown "
      "names and bad values raise ValueError, and then nothing changes. Process-wide, for tests and "
      "benchmarks only: never call it while a kernel runs (a layer call on any thread). None of the knobs "
      "changes a result (prefetches, loop orders over exact accumulations).";
  constexpr const char* kGetDoc = "The amx tier's tuning knobs that set_amx_tuning() accepts, as a dict.";
#ifdef KT_SFT_HAVE_ISA_AMX
  testing.def("set_amx_tuning", &set_tuning, kSetDoc);
  testing.def("amx_tuning", &current_tuning, kGetDoc);
#else
  const auto missing = [] { throw std::runtime_error("the amx tier is not compiled into this build"); };
  testing.def("set_amx_tuning", [missing](const nb::kwargs&) { missing(); }, kSetDoc);
  testing.def("amx_tuning", [missing] { missing(); }, kGetDoc);
#endif
}

}  // namespace kt::bindings
