#include "kt/runtime/build_info.hpp"

namespace kt::runtime {

const char* build_version() { return KT_SFT_VERSION; }
const char* build_compiler() { return KT_SFT_COMPILER; }
const char* build_type() { return KT_SFT_BUILD_TYPE; }

}  // namespace kt::runtime
