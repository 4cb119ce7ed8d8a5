#include "common/test_data.h"

#include <cmath>
#include <cstring>

#include "distattn/core/half.h"
#include "distattn/core/random.h"

namespace distattn::testing {

double test_value(uint64_t seed, uint64_t tensor_id, uint64_t index) {
  return hash_uniform(seed, tensor_id, index);
}

void fill_test_data(const TensorView& t, uint64_t seed, uint64_t tensor_id,
                    uint64_t global_offset) {
  DISTATTN_CHECK(t.device.is_cpu() && t.is_contiguous(),
                 "fill_test_data needs a packed CPU tensor");
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const double v = test_value(seed, tensor_id, global_offset + static_cast<uint64_t>(i));
    switch (t.dtype) {
      case DType::kFloat32:
        t.data_as<float>()[i] = static_cast<float>(v);
        break;
      case DType::kFloat64:
        t.data_as<double>()[i] = v;
        break;
      case DType::kBFloat16:
        t.data_as<uint16_t>()[i] = bf16_t::from_float(static_cast<float>(v));
        break;
      case DType::kFloat16:
        t.data_as<uint16_t>()[i] = fp16_t::from_float(static_cast<float>(v));
        break;
      case DType::kInt32:
        t.data_as<int32_t>()[i] = static_cast<int32_t>(std::floor(v * 100));
        break;
      case DType::kInt64:
        t.data_as<int64_t>()[i] = static_cast<int64_t>(std::floor(v * 100));
        break;
      case DType::kUInt8:
        t.data_as<uint8_t>()[i] = static_cast<uint8_t>(std::floor((v + 1) * 100));
        break;
    }
  }
}

std::vector<double> to_double_vector(const TensorView& t) {
  Tensor host = to_device(t, Device::cpu());
  Tensor d = Tensor::empty(std::span<const int64_t>(t.shape.data(), t.ndim), DType::kFloat64);
  convert_dtype_cpu(host.view(), d.view());
  return std::vector<double>(d.data_as<double>(), d.data_as<double>() + d.numel());
}

ErrorStats compare(const std::vector<double>& got, const std::vector<double>& ref) {
  ErrorStats s;
  DISTATTN_CHECK(got.size() == ref.size(), "compare: sizes ", got.size(), " and ", ref.size(),
                 " differ");
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (!(std::isinf(got[i]) && std::isinf(ref[i]) && (got[i] > 0) == (ref[i] > 0)))
        ++s.non_finite;
      continue;
    }
    if (!std::isfinite(ref[i])) {
      ++s.non_finite;
      continue;
    }
    s.max_abs_err = std::max(s.max_abs_err, std::abs(got[i] - ref[i]));
    s.max_ref = std::max(s.max_ref, std::abs(ref[i]));
  }
  return s;
}

}  // namespace distattn::testing
