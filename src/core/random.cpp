// Deterministic pseudo-random values (distattn/core/random.h).
#include "distattn/core/random.h"

namespace distattn {

namespace {
uint64_t mix(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

double hash_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t h = mix(mix(mix(seed) ^ stream) ^ index);
  return static_cast<double>(h >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

Tensor uniform_matrix_block(uint64_t seed, uint64_t stream, int64_t rows, int64_t cols,
                            int64_t full_cols, int64_t row0, int64_t col0, double bound) {
  DISTATTN_CHECK(rows >= 0 && cols >= 0 && row0 >= 0 && col0 >= 0 && col0 + cols <= full_cols,
                 "uniform_matrix_block: block [", row0, " +", rows, ", ", col0, " +", cols,
                 ") does not fit a matrix with ", full_cols, " columns");
  Tensor t = Tensor::empty({rows, cols}, DType::kFloat32);
  float* p = t.data_as<float>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const uint64_t g = static_cast<uint64_t>((row0 + i) * full_cols + col0 + j);
      p[i * cols + j] = static_cast<float>(bound * hash_uniform(seed, stream, g));
    }
  return t;
}

}  // namespace distattn
