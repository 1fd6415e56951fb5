// How this binary was built, for `python -m kt_sft_kernels` and bug reports.
#pragma once

namespace kt::runtime {

const char* build_version();     // the wheel version
const char* build_compiler();    // e.g. "GNU 12.2.0"
const char* build_type();        // CMake build type

}  // namespace kt::runtime
