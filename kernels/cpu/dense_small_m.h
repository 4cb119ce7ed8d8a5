#pragma once
// Register-blocked c (+)= a b for a few rows of a (decode batches: m <= 32), included by
// dense.cpp (baseline ISA) and dense_avx512.cpp (AVX-512 flags). OpenBLAS packs all of b for
// every call, which for a handful of rows costs more than the product itself; here b (the
// weights) is streamed once from memory: a 64-column block of b stays in L2 while every 4-row
// block of a uses it, and each block's 4 x 64 accumulators live in registers.
#include <algorithm>
#include <cstdint>

namespace distattn::kernels::cpu::small_m {

constexpr int kRows = 4;
constexpr int kCols = 64;

template <int MB>
inline void block(int64_t nb, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                  float* c, int64_t ldc, bool accumulate) {
  float acc[MB][kCols];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < kCols; ++j) acc[i][j] = accumulate && j < nb ? c[i * ldc + j] : 0.0f;
  if (nb == kCols) {
    for (int64_t p = 0; p < k; ++p) {
      const float* bp = b + p * ldb;
      for (int i = 0; i < MB; ++i) {
        const float av = a[i * lda + p];
#pragma omp simd
        for (int j = 0; j < kCols; ++j) acc[i][j] += av * bp[j];
      }
    }
  } else {
    for (int64_t p = 0; p < k; ++p) {
      const float* bp = b + p * ldb;
      for (int i = 0; i < MB; ++i) {
        const float av = a[i * lda + p];
        for (int64_t j = 0; j < nb; ++j) acc[i][j] += av * bp[j];
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int64_t j = 0; j < nb; ++j) c[i * ldc + j] = acc[i][j];
}

// Threads split the columns (every thread streams its own part of b once).
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t col_blocks = (n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * k > (int64_t{1} << 18))
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    const int64_t j0 = cb * kCols, nb = std::min<int64_t>(kCols, n - j0);
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows)
      block<kRows>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
    for (; i < m; ++i)
      block<1>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
  }
}

}  // namespace distattn::kernels::cpu::small_m
