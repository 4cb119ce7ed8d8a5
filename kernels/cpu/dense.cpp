// CPU bodies of the dense ops (distattn/ops/dense.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "distattn/config.h"
#include "kernels/cpu/dense_cpu.h"
#include "kernels/cpu/dense_small_m.h"
#include "kernels/cpu/flash_cpu.h"
#if DISTATTN_WITH_BLAS
#include <cblas.h>
#endif

namespace distattn::kernels::cpu {

namespace {

// Work (m*n*k) below which the portable loops stay on one thread.
constexpr int64_t kParallelMinWork = int64_t{1} << 18;

// Portable c (+)= a b: tasks are rows x column blocks, so a single-row product (decode)
// also spreads over threads; the inner loop is a contiguous axpy the compiler vectorises.
void gemm_nn_portable(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kCols = 512;
  const int64_t col_blocks = (n + kCols - 1) / kCols;
  const int64_t tasks = m * col_blocks;
#pragma omp parallel for schedule(static) if (m * n * k > kParallelMinWork)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t i = task / col_blocks, j0 = (task % col_blocks) * kCols;
    const int64_t j1 = std::min(n, j0 + kCols);
    float* ci = c + i * ldc;
    if (!accumulate)
      for (int64_t j = j0; j < j1; ++j) ci[j] = 0.0f;
    for (int64_t p = 0; p < k; ++p) {
      const float av = a[i * lda + p];
      const float* bp = b + p * ldb;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) ci[j] += av * bp[j];
    }
  }
}

// Portable c (+)= a b^T: one dot product per element.
void gemm_nt_portable(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#pragma omp parallel for collapse(2) schedule(static) if (m * n * k > kParallelMinWork)
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float* ai = a + i * lda;
      const float* bj = b + j * ldb;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t p = 0; p < k; ++p) acc += ai[p] * bj[p];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc : acc;
    }
}

// Rows up to which the streaming small-m kernel beats packing b (OpenBLAS).
constexpr int64_t kSmallM = 32;

}  // namespace

#if DISTATTN_WITH_AVX512
void sgemm_small_m_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
#endif

bool sgemm_uses_blas() {
  return DISTATTN_WITH_BLAS != 0;
}

const char* sgemm_backend() {
#if DISTATTN_WITH_BLAS
  static const std::string name = std::string("OpenBLAS ") + openblas_get_corename();
  return name.c_str();
#else
  return "portable";
#endif
}

void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc, bool accumulate, bool transpose_b) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  if (m <= kSmallM && !transpose_b) {
#if DISTATTN_WITH_AVX512
    if (is_avx512_level(active_cpu_kernel_isa()))
      return sgemm_small_m_avx512(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
    return small_m::gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  }
#if DISTATTN_WITH_BLAS
  // BLAS ints are 32-bit here; the shapes of this project's models are far below that.
  if (m < INT32_MAX && n < INT32_MAX && k < INT32_MAX && lda < INT32_MAX && ldb < INT32_MAX &&
      ldc < INT32_MAX) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans,
                static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a,
                static_cast<int>(lda), b, static_cast<int>(ldb), accumulate ? 1.0f : 0.0f, c,
                static_cast<int>(ldc));
    return;
  }
#endif
  if (transpose_b)
    gemm_nt_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  else
    gemm_nn_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void rms_norm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy, int64_t m,
              int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (m * n > (int64_t{1} << 16))
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    float* yi = y + i * ldy;
    double ss = 0;
    for (int64_t j = 0; j < n; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    if (weight != nullptr) {
      for (int64_t j = 0; j < n; ++j) yi[j] = xi[j] * inv * weight[j];
    } else {
      for (int64_t j = 0; j < n; ++j) yi[j] = xi[j] * inv;
    }
  }
}

void rope(float* x, int64_t m, int64_t ldx, int64_t heads, int64_t ldh, int64_t dim,
          const int64_t* positions, double theta) {
  const int64_t half = dim / 2;
  std::vector<double> freq(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j)
    freq[static_cast<size_t>(j)] =
        std::pow(theta, -2.0 * static_cast<double>(j) / static_cast<double>(dim));
#pragma omp parallel for schedule(static) if (m * heads * dim > (int64_t{1} << 16))
  for (int64_t i = 0; i < m; ++i) {
    const double pos = static_cast<double>(positions[i]);
    for (int64_t j = 0; j < half; ++j) {
      const double ang = pos * freq[static_cast<size_t>(j)];
      const double cs = std::cos(ang), sn = std::sin(ang);
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + i * ldx + h * ldh;
        const double a = v[j], b = v[j + half];
        v[j] = static_cast<float>(a * cs - b * sn);
        v[j + half] = static_cast<float>(a * sn + b * cs);
      }
    }
  }
}

void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out, int64_t ldo,
              int64_t m, int64_t n) {
#pragma omp parallel for schedule(static) if (m * n > (int64_t{1} << 16))
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float g = gate[i * ldg + j];
      out[i * ldo + j] = g / (1.0f + std::exp(-g)) * up[i * ldu + j];
    }
}

void argmax_rows(const float* x, int64_t ldx, int64_t m, int64_t n, int32_t* out) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    int64_t best = 0;
    float bv = -INFINITY;
    bool found = false;
    for (int64_t j = 0; j < n; ++j) {
      const float v = xi[j];
      if (std::isnan(v)) continue;
      if (!found || v > bv) {
        bv = v;
        best = j;
        found = true;
      }
    }
    out[i] = static_cast<int32_t>(best);
  }
}

}  // namespace distattn::kernels::cpu
