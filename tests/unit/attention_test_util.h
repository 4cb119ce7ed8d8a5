#pragma once
// Shared helpers of the tests/unit/test_attention_*.cpp binaries: deterministic BSHD inputs,
// strided views, and per-dtype tolerances (relative to max |reference|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"
#include "kernels/cpu/reference.h"

namespace distattn::testing {

// fp32 ~1e-5 relative (accumulation error only: the reference reads the same rounded
// inputs); bf16/fp16 are dominated by rounding the result to storage (2^-8, 2^-11 relative).
inline double tolerance(DType t) {
  switch (t) {
    case DType::kBFloat16:
      return 2e-2;
    case DType::kFloat16:
      return 5e-3;
    default:
      return 1e-5;
  }
}

inline Tensor make_input(std::initializer_list<int64_t> shape, DType dtype, uint64_t seed,
                         uint64_t id, double scale = 1.0) {
  Tensor t = Tensor::empty(shape, dtype);
  if (scale == 1.0) {
    fill_test_data(t, seed, id);
    return t;
  }
  Tensor d = Tensor::empty(shape, DType::kFloat64);
  fill_test_data(d, seed, id);
  for (int64_t i = 0; i < d.numel(); ++i) d.data_as<double>()[i] *= scale;
  convert_dtype_cpu(d.view(), t.view());
  return t;
}

// A view of `shape` inside a larger zero-initialized buffer whose seq (dim 1) and head
// (dim 2) strides are padded, so kernels that assume packed rows fail.
struct PaddedTensor {
  Tensor storage;
  TensorView view;
};
inline PaddedTensor make_padded(std::initializer_list<int64_t> shape4, DType dtype,
                                int64_t head_pad = 3, int64_t seq_pad = 5) {
  std::vector<int64_t> s(shape4);
  const int64_t head_stride = s[3] + head_pad;
  const int64_t seq_stride = s[2] * head_stride + seq_pad;
  const int64_t batch_stride = s[1] * seq_stride + 7;
  PaddedTensor p;
  p.storage = Tensor::zeros({s[0] * batch_stride + 1}, dtype);
  const int64_t strides[4] = {batch_stride, seq_stride, head_stride, 1};
  p.view = TensorView(p.storage.data(), dtype, Device::cpu(), std::span<const int64_t>(s),
                      std::span<const int64_t>(strides, 4));
  return p;
}

// Copies a packed tensor into a (possibly strided) view of equal shape and dtype.
inline void copy_into(const TensorView& src, const TensorView& dst) {
  ASSERT_TRUE(src.is_contiguous());
  ASSERT_EQ(src.numel(), dst.numel());
  const size_t es = src.element_size();
  std::array<int64_t, kMaxDims> idx{};
  for (int64_t lin = 0; lin < src.numel(); ++lin) {
    std::memcpy(dst.element_ptr(std::span<const int64_t>(idx.data(), dst.ndim)),
                static_cast<const char*>(src.data) + lin * static_cast<int64_t>(es), es);
    for (int d = dst.ndim - 1; d >= 0; --d) {
      if (++idx[d] < dst.shape[d]) break;
      idx[d] = 0;
    }
  }
}

inline std::vector<double> as_vector(const Tensor& fp64) {
  return std::vector<double>(fp64.data_as<double>(), fp64.data_as<double>() + fp64.numel());
}

// Asserts max |got - ref| <= tol * max(max |ref|, floor) and no unexpected NaN/Inf.
// `floor` is the magnitude of the terms that cancel when the reference itself is ~0 (e.g.
// dq = dk = 0 exactly when every row sees one key), so roundoff there is judged on that scale.
inline void expect_close(const TensorView& got, const Tensor& ref, double tol,
                         const std::string& what, double floor = 0) {
  const ErrorStats s = compare(to_double_vector(got), as_vector(ref));
  EXPECT_EQ(s.non_finite, 0) << what << ": non-finite values where the reference is finite";
  EXPECT_LE(s.max_abs_err, tol * std::max({s.max_ref, floor, 1e-30}))
      << what << ": max abs error " << s.max_abs_err << " vs max |ref| " << s.max_ref
      << " (relative " << s.rel() << ", tolerance " << tol << ")";
}

}  // namespace distattn::testing
