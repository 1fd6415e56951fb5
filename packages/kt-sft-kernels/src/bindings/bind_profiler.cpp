// kk.profiler: the stage profiler (include/kt/runtime/profiler.hpp) as a submodule.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings.hpp"
#include "kt/runtime/profiler.hpp"

namespace kt::bindings {

void bind_profiler(nb::module_& m) {
  namespace prof = runtime::profiler;
  nb::module_ p = m.def_submodule("profiler", "Stage profiler: TSC-timed named stages per thread (DESIGN.md §3.5)");
  p.def("enable", &prof::enable, "Start recording (calibrates the TSC on first use).");
  p.def("disable", &prof::disable, "Stop recording; what was recorded is kept.");
  p.def("reset", &prof::reset, "Drop every counter and trace event.");
  p.def("is_enabled", &prof::enabled);
  p.def("tsc_hz", &prof::tsc_hz, "The calibrated TSC frequency in Hz.");
  p.def("stage_names", [] {
    nb::list names;
    for (int i = 0; i < prof::kStageCount; ++i) names.append(prof::stage_name(static_cast<prof::Stage>(i)));
    return names;
  });
  p.def("ring_events_per_thread", [] { return prof::kRingEvents; });
  p.def(
      "stats",
      [] {
        nb::dict out;
        for (const prof::StageStats& s : prof::stats()) {
          nb::dict d;
          d["calls"] = s.calls;
          d["total_s"] = s.total_s;
          d["mean_s"] = s.mean_s;
          d["imbalance"] = s.imbalance;
          d["tasks"] = s.tasks;
          d["busy_s"] = s.busy_s;
          d["threads"] = s.threads;
          out[s.name.c_str()] = d;
        }
        return out;
      },
      "dict stage -> {calls, total_s, mean_s, imbalance, tasks, busy_s, threads}. total_s is wall time of\n"
      "the stage's calls (caller thread); busy_s sums its task times over threads; imbalance is the busiest\n"
      "thread's busy time over the mean of the threads that ran its tasks (1.0 = balanced).");
  p.def(
      "dump_chrome_trace",
      [](const std::string& path) {
        nb::gil_scoped_release release;
        return prof::dump_chrome_trace(path);
      },
      nb::arg("path"), "Write the kept events as a Chrome/Perfetto trace (JSON); returns the event count.");
}

}  // namespace kt::bindings
