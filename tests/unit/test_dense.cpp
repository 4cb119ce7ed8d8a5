// Dense ops (distattn/ops/dense.h) against naive fp64 loops, and their input validation.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/test_data.h"
#include "distattn/ops/dense.h"

namespace distattn {
namespace {

using testing::test_value;

std::vector<float> values(int64_t n, uint64_t id) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = static_cast<float>(test_value(7, id, i));
  return v;
}

TensorView matrix(std::vector<float>& buf, int64_t rows, int64_t cols, int64_t ld) {
  const int64_t shape[] = {rows, cols}, strides[] = {ld, 1};
  return TensorView(buf.data(), DType::kFloat32, Device::cpu(), shape, strides);
}

TEST(DenseOps, MatmulMatchesFp64OnStridedViewsWithAndWithoutTranspose) {
  // m 1, 5 and 32 take the small-m streaming kernel (decode batches), 37 the general one.
  for (int64_t m : {1, 5, 32, 37})
    for (int64_t n : {53, 130}) {
      const int64_t k = 70, lda = 75, ldb = 140, ldc = 141;
      for (bool tb : {false, true}) {
        for (bool acc : {false, true}) {
          std::vector<float> a = values(m * lda, 1),
                             b = values((tb ? n : k) * (tb ? k + 3 : ldb), 2);
          std::vector<float> c = values(m * ldc, 3);
          const std::vector<float> c0 = c;
          const int64_t ldb_eff = tb ? k + 3 : ldb;
          ops::matmul(matrix(a, m, k, lda), matrix(b, tb ? n : k, tb ? k : n, ldb_eff),
                      matrix(c, m, n, ldc), {.accumulate = acc, .transpose_b = tb});
          double worst = 0;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
              double ref = acc ? c0[static_cast<size_t>(i * ldc + j)] : 0.0;
              for (int64_t p = 0; p < k; ++p)
                ref += static_cast<double>(a[static_cast<size_t>(i * lda + p)]) *
                       b[static_cast<size_t>(tb ? j * ldb_eff + p : p * ldb_eff + j)];
              worst = std::max(worst, std::abs(ref - c[static_cast<size_t>(i * ldc + j)]));
            }
          EXPECT_LT(worst, 1e-4) << "m=" << m << " n=" << n << " transpose_b=" << tb
                                 << " accumulate=" << acc;
          // Padding between rows is never written.
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = n; j < ldc; ++j)
              ASSERT_EQ(c[static_cast<size_t>(i * ldc + j)], c0[static_cast<size_t>(i * ldc + j)]);
        }
      }
    }
}

TEST(DenseOps, RmsNormRopeSiluMatchFp64) {
  const int64_t m = 5, heads = 3, dim = 16, n = heads * dim;
  std::vector<float> x = values(m * n, 4), w = values(n, 5), y(static_cast<size_t>(m * n));
  ops::rms_norm(matrix(x, m, n, n), TensorView(w.data(), DType::kFloat32, Device::cpu(), {n}),
                matrix(y, m, n, n), 1e-6f);
  for (int64_t i = 0; i < m; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < n; ++j) ss += static_cast<double>(x[i * n + j]) * x[i * n + j];
    const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
    for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(y[i * n + j], x[i * n + j] * inv * w[j], 1e-5);
  }
  // RoPE: positions per row, every head rotated alike.
  std::vector<float> r = x;
  const std::vector<int64_t> pos = {0, 1, 7, 100, 4095};
  ops::rope(TensorView(r.data(), DType::kFloat32, Device::cpu(), {m, heads, dim}), pos, 10000.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < dim / 2; ++j) {
        const double ang = pos[i] * std::pow(10000.0, -2.0 * j / dim);
        const double a = x[i * n + h * dim + j], b = x[i * n + h * dim + j + dim / 2];
        EXPECT_NEAR(r[i * n + h * dim + j], a * std::cos(ang) - b * std::sin(ang), 1e-6);
        EXPECT_NEAR(r[i * n + h * dim + j + dim / 2], a * std::sin(ang) + b * std::cos(ang), 1e-6);
      }
  std::vector<float> out(static_cast<size_t>(m * n));
  ops::silu_mul(matrix(x, m, n, n), matrix(y, m, n, n), matrix(out, m, n, n));
  for (int64_t i = 0; i < m * n; ++i) {
    const double g = x[i];
    EXPECT_NEAR(out[i], g / (1 + std::exp(-g)) * y[i], 1e-6);
  }
}

TEST(DenseOps, EmbeddingAndArgmaxRows) {
  std::vector<float> table = values(10 * 4, 6), out(3 * 4);
  const std::vector<int32_t> ids = {9, 0, 4};
  ops::embedding(matrix(table, 10, 4, 4), ids, matrix(out, 3, 4, 4));
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_EQ(out[i * 4 + j], table[ids[i] * 4 + j]);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = {1, 3, 3, 2, nan, -1, nan, -2, nan, nan, nan, nan};
  std::vector<int32_t> best(3);
  ops::argmax_rows(matrix(x, 3, 4, 4), best);
  EXPECT_EQ(best[0], 1);  // first of the tied maxima
  EXPECT_EQ(best[1], 1);  // NaN never wins
  EXPECT_EQ(best[2], 0);  // all NaN
}

TEST(DenseOps, BadInputsThrowNamingWhatToChange) {
  std::vector<float> a(12), b(12), c(12);
  auto expect_msg = [](auto&& fn, const char* needle) {
    try {
      fn();
      FAIL() << "expected an Error mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_msg([&] { ops::matmul(matrix(a, 3, 4, 4), matrix(b, 3, 4, 4), matrix(c, 3, 4, 4)); },
             "inner dims");
  expect_msg([&] { ops::matmul(matrix(a, 3, 4, 4), matrix(b, 4, 3, 3), matrix(c, 3, 4, 4)); },
             "c is [3, 4]");
  std::vector<int32_t> ids = {0, 5};
  expect_msg([&] { ops::embedding(matrix(a, 3, 4, 4), ids, matrix(c, 2, 4, 4)); },
             "the table has 3 rows");
  const std::vector<int64_t> pos = {0};
  expect_msg(
      [&] {
        ops::rope(TensorView(a.data(), DType::kFloat32, Device::cpu(), {2, 1, 6}), pos, 1e4);
      },
      "1 positions for 2 rows");
}

}  // namespace
}  // namespace distattn
