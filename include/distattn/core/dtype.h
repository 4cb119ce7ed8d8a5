#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace distattn {

enum class DType : uint8_t { kFloat32, kFloat64, kBFloat16, kFloat16, kInt32, kInt64, kUInt8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kBFloat16:
      return 2;
    case DType::kFloat16:
      return 2;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
    case DType::kUInt8:
      return 1;
  }
  return 0;
}

constexpr bool dtype_is_floating(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat64 || t == DType::kBFloat16 ||
         t == DType::kFloat16;
}

// "fp32", "fp64", "bf16", "fp16", "int32", "int64", "uint8".
const char* dtype_name(DType t);
// Accepts the names above (and "float32", "float", "bfloat16", "half", "float16", "double").
// Throws distattn::Error listing the accepted names.
DType parse_dtype(std::string_view name);

}  // namespace distattn
