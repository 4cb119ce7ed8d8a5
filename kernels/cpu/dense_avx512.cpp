// The small-m product (see dense_small_m.h) for AVX-512: a block of MB <= 4 rows of a times a
// 64-column block of b keeps its MB x 4 vector accumulators in registers; b is read once per
// row block (from L2 after the first), a's values are broadcast.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/dense_small_m.h"

namespace distattn::kernels::cpu {

namespace {

template <int MB>
void block(int64_t nb, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
           float* c, int64_t ldc, bool accumulate) {
  __mmask16 mask[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t left = std::clamp<int64_t>(nb - 16 * v, 0, 16);
    mask[v] = static_cast<__mmask16>((1u << left) - 1u);
  }
  __m512 acc[MB][4];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[i][v] =
          accumulate ? _mm512_maskz_loadu_ps(mask[v], c + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    __m512 bv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], bp + 16 * v);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(c + i * ldc + 16 * v, mask[v], acc[i][v]);
}

}  // namespace

void sgemm_small_m_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kCols = small_m::kCols;
  const int64_t col_blocks = (n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * k > (int64_t{1} << 18))
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    const int64_t j0 = cb * kCols, nb = std::min<int64_t>(kCols, n - j0);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      block<4>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
    switch (m - i) {
      case 3:
        block<3>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
        break;
      case 2:
        block<2>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
        break;
      case 1:
        block<1>(nb, k, a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, accumulate);
        break;
      default:
        break;
    }
  }
}

}  // namespace distattn::kernels::cpu
