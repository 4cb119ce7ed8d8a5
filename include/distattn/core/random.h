#pragma once
// Deterministic pseudo-random values: a pure function of (seed, stream id, global index), so
// every rank can generate exactly its own slice of a tensor (model weights, test inputs) and a
// reference can rebuild the whole of it.
#include <cstdint>

#include "distattn/core/tensor_view.h"

namespace distattn {

// Uniform in [-1, 1) (53-bit resolution) from a splitmix64 mix of (seed, stream, index).
double hash_uniform(uint64_t seed, uint64_t stream, uint64_t index);

// Block [row0, row0 + rows) x [col0, col0 + cols) of the virtual matrix
//   M[i][j] = bound * hash_uniform(seed, stream, i * full_cols + j)
// as a packed fp32 host tensor [rows, cols].
Tensor uniform_matrix_block(uint64_t seed, uint64_t stream, int64_t rows, int64_t cols,
                            int64_t full_cols, int64_t row0, int64_t col0, double bound);

}  // namespace distattn
