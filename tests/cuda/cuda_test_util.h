#pragma once
// Shared helpers of the CUDA kernel tests: the bound GPU (or a skip), NaN-poisoned device
// outputs, host <-> device copies. Every rank of an MPI run tests on its bound GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"

namespace distattn::testing {

// The GPU this rank is bound to; tests skip (on every rank alike) without one.
inline bool have_gpu() {
  return cuda_device_count() > 0 && runtime_info().device.is_cuda();
}
inline Device gpu() {
  return runtime_info().device;
}

#define DISTATTN_SKIP_WITHOUT_GPU()                                          \
  do {                                                                       \
    if (!::distattn::testing::have_gpu()) GTEST_SKIP() << "skipped: no GPU"; \
  } while (0)

// A device tensor of `shape` whose every element is NaN: a kernel that skips an output
// element leaves a NaN the checks catch.
inline Tensor poisoned(std::initializer_list<int64_t> shape, DType dtype, Device dev) {
  Tensor d = Tensor::empty(shape, DType::kFloat64);
  for (int64_t i = 0; i < d.numel(); ++i)
    d.data_as<double>()[i] = std::numeric_limits<double>::quiet_NaN();
  Tensor h = Tensor::empty(shape, dtype);
  convert_dtype_cpu(d.view(), h.view());
  return to_device(h.view(), dev);
}

}  // namespace distattn::testing
