#include "distattn/core/dtype.h"

#include "distattn/core/device.h"
#include "distattn/core/error.h"

namespace distattn {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "fp32";
    case DType::kFloat64:
      return "fp64";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat16:
      return "fp16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kUInt8:
      return "uint8";
  }
  return "unknown";
}

DType parse_dtype(std::string_view n) {
  if (n == "fp32" || n == "float32" || n == "float" || n == "f32") return DType::kFloat32;
  if (n == "fp64" || n == "float64" || n == "double" || n == "f64") return DType::kFloat64;
  if (n == "bf16" || n == "bfloat16") return DType::kBFloat16;
  if (n == "fp16" || n == "float16" || n == "half" || n == "f16") return DType::kFloat16;
  if (n == "int32" || n == "i32") return DType::kInt32;
  if (n == "int64" || n == "i64") return DType::kInt64;
  if (n == "uint8" || n == "u8") return DType::kUInt8;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown dtype '", n,
                 "' (supported: fp32, fp64, bf16, fp16, int32, int64, uint8)");
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Device parse_device(std::string_view n) {
  if (n == "cpu") return Device::cpu();
  if (n == "cuda" || n == "gpu") return Device::cuda(0);
  if (n.rfind("cuda:", 0) == 0) {
    const std::string idx(n.substr(5));
    try {
      size_t used = 0;
      const int i = std::stoi(idx, &used);
      if (used == idx.size() && i >= 0) return Device::cuda(i);
    } catch (const std::exception&) {
    }
  }
  DISTATTN_THROW(Status::kInvalidArgument, "unknown device '", n,
                 "' (supported: cpu, cuda, cuda:N)");
}

}  // namespace distattn
