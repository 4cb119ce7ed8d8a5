#pragma once
// Deterministic test data: a pure function of (seed, tensor id, global index), so every rank
// can build its own shard and the reference can rebuild the whole tensor.
#include <cstdint>
#include <vector>

#include "distattn/core/tensor_view.h"

namespace distattn::testing {

// Uniform in [-1, 1), from a 64-bit mix of (seed, tensor_id, index).
double test_value(uint64_t seed, uint64_t tensor_id, uint64_t index);

// Fill a packed tensor (CPU) whose element i holds test_value(seed, id, global_offset + i),
// rounded to its dtype. For integer dtypes: floor(value * 100).
void fill_test_data(const TensorView& t, uint64_t seed, uint64_t tensor_id,
                    uint64_t global_offset = 0);

// Host copy of any float tensor (CPU or CUDA, strided ok) as fp64, packed row-major.
std::vector<double> to_double_vector(const TensorView& t);

// max |a-b| and max |b| over all elements; counts NaN/Inf in `a`.
struct ErrorStats {
  double max_abs_err = 0;
  double max_ref = 0;
  int64_t non_finite = 0;
  double rel() const { return max_ref > 0 ? max_abs_err / max_ref : max_abs_err; }
};
ErrorStats compare(const std::vector<double>& got, const std::vector<double>& ref);

}  // namespace distattn::testing
