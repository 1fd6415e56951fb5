#include "arrays.hpp"

#include <cstring>
#include <optional>
#include <stdexcept>

namespace kt::bindings {
namespace {

// Stand-in data pointer for empty arrays (some producers hand out nullptr for them), so that an
// empty view is still "present" and never confused with an absent optional argument.
alignas(64) unsigned char empty_array_storage[64];

std::optional<DType> kt_dtype(const nb::dlpack::dtype& dt) {
  using Code = nb::dlpack::dtype_code;
  if (dt.lanes != 1) return std::nullopt;
  if (dt.code == static_cast<std::uint8_t>(Code::Bfloat) && dt.bits == 16) return DType::bf16;
  if (dt.code == static_cast<std::uint8_t>(Code::UInt) && dt.bits == 16) return DType::bf16;  // raw bf16 bits
  if (dt.code == static_cast<std::uint8_t>(Code::Float) && dt.bits == 32) return DType::f32;
  if (dt.code == static_cast<std::uint8_t>(Code::Int) && dt.bits == 32) return DType::i32;
  if (dt.code == static_cast<std::uint8_t>(Code::Int) && dt.bits == 64) return DType::i64;
  if (dt.code == static_cast<std::uint8_t>(Code::Int) && dt.bits == 8) return DType::i8;
  if (dt.code == static_cast<std::uint8_t>(Code::UInt) && dt.bits == 8) return DType::u8;
  return std::nullopt;
}

std::string dlpack_dtype_name(const nb::dlpack::dtype& dt) {
  using Code = nb::dlpack::dtype_code;
  std::string prefix;
  switch (static_cast<Code>(dt.code)) {
    case Code::Int: prefix = "int"; break;
    case Code::UInt: prefix = "uint"; break;
    case Code::Float: prefix = "float"; break;
    case Code::Bfloat: prefix = "bfloat"; break;
    case Code::Complex: prefix = "complex"; break;
    case Code::Bool: return "bool";
    default: prefix = "dtype(code=" + std::to_string(dt.code) + ")"; break;
  }
  std::string name = prefix + std::to_string(dt.bits);
  if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
  return name;
}

std::string allowed_names(unsigned mask) {
  std::string text;
  const auto add = [&](unsigned bit, const char* name) {
    if (!(mask & bit)) return;
    if (!text.empty()) text += " or ";
    text += name;
  };
  add(kBF16, "bfloat16 (torch.bfloat16, ml_dtypes.bfloat16, or uint16 holding bf16 bits)");
  add(kF32, "float32");
  add(kI32, "int32");
  add(kI64, "int64");
  add(kI8, "int8");
  add(kU8, "uint8");
  return text;
}

std::string device_name(std::int32_t type, std::int32_t id) {
  const char* name = nullptr;
  switch (type) {
    case 2: name = "cuda"; break;
    case 4: name = "opencl"; break;
    case 7: name = "vulkan"; break;
    case 8: name = "metal"; break;
    case 10: name = "rocm"; break;
    case 13: name = "cuda_managed"; break;
    case 14: name = "oneapi"; break;
    default: break;
  }
  return (name ? std::string(name) : "device_type " + std::to_string(type)) + ":" + std::to_string(id);
}

bool is_host_memory(std::int32_t device_type) {
  return device_type == 1 /* kDLCPU */ || device_type == 3 /* kDLCUDAHost: pinned host memory */;
}

// NumPy has no bf16 DLPack/buffer export: an ml_dtypes.bfloat16 NumPy array is re-viewed as its
// uint16 bits (zero copy). Detected by name so neither NumPy nor ml_dtypes is imported here.
bool is_numpy_bfloat16(nb::handle obj) {
  const char* type_name = Py_TYPE(obj.ptr())->tp_name;
  if (std::strcmp(type_name, "numpy.ndarray") != 0 && std::strcmp(type_name, "numpy.memmap") != 0) return false;
  nb::object dtype_name = nb::getattr(nb::getattr(obj, "dtype", nb::none()), "name", nb::none());
  return nb::isinstance<nb::str>(dtype_name) && std::strcmp(nb::str(dtype_name).c_str(), "bfloat16") == 0;
}

std::string type_name_of(nb::handle obj) {
  nb::handle type = obj.type();
  return std::string(nb::str(type.attr("__module__")).c_str()) + "." + nb::str(type.attr("__qualname__")).c_str();
}

// Why the producer refused to export, where it says so (e.g. a torch tensor that requires grad).
std::string export_failure_reason(nb::handle obj) {
  if (!nb::hasattr(obj, "__dlpack__")) return "";
  try {
    obj.attr("__dlpack__")();
  } catch (nb::python_error& e) {
    return std::string(" (its __dlpack__() raised: ") + nb::str(e.value()).c_str() + ")";
  }
  return "";
}

bool c_contiguous(const nb::ndarray<nb::ro>& a) {
  if (a.size() <= 1) return true;  // no element is reached through a stride
  std::int64_t expected_stride = 1;
  for (int i = static_cast<int>(a.ndim()) - 1; i >= 0; --i) {
    const auto extent = static_cast<std::int64_t>(a.shape(static_cast<std::size_t>(i)));
    if (extent != 1 && a.stride(static_cast<std::size_t>(i)) != expected_stride) return false;
    expected_stride *= extent;
  }
  return true;
}

}  // namespace

void raise_type(const std::string& message) { throw kt::TypeError(message); }
void raise_value(const std::string& message) { throw std::invalid_argument(message); }

Array import_array(nb::handle obj, const char* name, unsigned allowed_dtypes, int ndim, Access access,
                   bool optional) {
  Array out;
  out.name = name;
  const std::string arg = name;
  if (obj.is_none()) {
    if (optional) return out;
    raise_type(arg + ": required, got None");
  }

  nb::object source = nb::borrow(obj);
  if (is_numpy_bfloat16(source)) source = source.attr("view")("uint16");

  bool imported = false;
  if (access == Access::write) {
    nb::ndarray<> writable;
    imported = nb::try_cast(source, writable, false);
    if (imported) {
      out.array = nb::ndarray<nb::ro>(writable);
    } else if (nb::try_cast(source, out.array, false)) {
      raise_value(arg + ": is read-only, but it is an output (pass a writable array)");
    }
  } else {
    imported = nb::try_cast(source, out.array, false);
  }
  if (!imported) {
    raise_type(arg + ": expected an array (NumPy array, torch tensor, or any DLPack / buffer-protocol object), got " +
               type_name_of(obj) + export_failure_reason(source));
  }

  const nb::ndarray<nb::ro>& a = out.array;
  if (!is_host_memory(a.device_type()))
    raise_value(arg + ": expected a CPU array, got one on " + device_name(a.device_type(), a.device_id()));

  const std::optional<DType> dtype = kt_dtype(a.dtype());
  if (!dtype || !(allowed_dtypes & (1u << static_cast<unsigned>(*dtype))))
    raise_type(arg + ": expected dtype " + allowed_names(allowed_dtypes) + ", got " + dlpack_dtype_name(a.dtype()));

  if (static_cast<int>(a.ndim()) != ndim) {
    raise_value(arg + ": expected a " + std::to_string(ndim) + "-d array, got " + std::to_string(a.ndim()) +
                "-d");
  }

  out.view.dtype = *dtype;
  out.view.ndim = ndim;
  for (int i = 0; i < ndim; ++i) out.view.shape[i] = static_cast<std::int64_t>(a.shape(static_cast<std::size_t>(i)));

  if (!c_contiguous(a)) raise_value(arg + ": must be C-contiguous (row-major, dense); got strides that are not");

  const void* data = a.data();
  if (out.view.numel() == 0) {
    data = empty_array_storage;
  } else if (reinterpret_cast<std::uintptr_t>(data) % moe::dtype_bytes(*dtype) != 0) {
    raise_value(arg + ": data is not aligned to its " + std::to_string(moe::dtype_bytes(*dtype)) + "-byte element size");
  }
  out.view.data = const_cast<void*>(data);  // writability was checked above for outputs
  return out;
}

}  // namespace kt::bindings
