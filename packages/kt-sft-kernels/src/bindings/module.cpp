// The extension module `kt_sft_kernels._core`. Python-facing names live in the package __init__.
#include <nanobind/nanobind.h>

#include <exception>

#include "bindings.hpp"
#include "kt/core/errors.hpp"

NB_MODULE(_core, m) {
  m.doc() = "kt-sft-kernels native core (use the kt_sft_kernels package, not this module)";
  nanobind::register_exception_translator([](const std::exception_ptr& error, void*) {
    try {
      std::rethrow_exception(error);
    } catch (const kt::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    } catch (const kt::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const kt::MemoryError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
  kt::bindings::bind_runtime(m);
  kt::bindings::bind_moe(m);
  kt::bindings::bind_profiler(m);
  kt::bindings::bind_topology(m);
  kt::bindings::bind_amx_tuning(m);
}
