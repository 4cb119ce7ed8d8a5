// Batched in-place fast Walsh-Hadamard transform (Sylvester order), O(d log d) per row.
#include <omp.h>

#include <cstdint>

#include "kernels/cpu/mla_cpu.h"

namespace distattn::kernels::cpu {

namespace {

// Radix-2 butterflies: stage `len` combines x[i] and x[i + len] inside blocks of 2*len.
// For len >= 8 the inner loop is a contiguous vector add/sub.
void fwht_row(float* x, int64_t d, float scale) {
  for (int64_t len = 1; len < d; len <<= 1) {
    for (int64_t i = 0; i < d; i += 2 * len) {
      float* a = x + i;
      float* b = x + i + len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float u = a[j], v = b[j];
        a[j] = u + v;
        b[j] = u - v;
      }
    }
  }
  if (scale != 1.0f) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) x[j] *= scale;
  }
}

}  // namespace

void hadamard_transform(const TensorView& x, float scale) {
  const int64_t d = x.size(-1);
  // Rows: every index of the leading dims, addressed through their strides.
  int64_t rows = 1;
  for (int i = 0; i + 1 < x.ndim; ++i) rows *= x.size(i);
  float* base = x.data_as<float>();
  const int lead = x.ndim - 1;
#pragma omp parallel for schedule(static) if (rows * d >= (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rem = r, off = 0;
    for (int i = lead - 1; i >= 0; --i) {
      const int64_t n = x.size(i);
      off += (rem % n) * x.stride(i);
      rem /= n;
    }
    fwht_row(base + off, d, scale);
  }
}

}  // namespace distattn::kernels::cpu
